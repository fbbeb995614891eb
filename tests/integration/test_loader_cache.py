"""Every loader reloads a file saved again under the same name, under every cache mode the running ComfyUI offers.

One headless server per mode runs one graph twice: Load SafeRoPE Pack, Load Statistics (-> Build Subspaces), Load UVR
Anchors and Load Prompt Redirector, each shown by a Preview Any; between the runs every file is replaced by another
one under the same name. Without a loader's fingerprint_inputs, the cross-prompt caches (classic, LRU, RAM pressure)
would show the first file again. A version's default mode is one of these (classic up to 0.8.0, RAM pressure from
0.33.0 on), so it is covered by its flag.
"""

from pathlib import Path

import pytest
import torch

from bench import comfyui_env

CACHE_MODES = {  # ComfyUI's cache flags (comfy/cli_args.py); a version offers those its parser accepts
    "classic": ["--cache-classic"],
    "lru": ["--cache-lru", "20"],
    "none": ["--cache-none"],
    "ram": ["--cache-ram"],  # from 0.8.0 on
}
NAME = "saved_again.safetensors"
HEADS, HEAD_DIM, WIDTH = 2, 8, 8
VERSIONS = {"a": {"single_blocks": 1, "hidden": 8}, "b": {"single_blocks": 2, "hidden": 12}}


def preview(link) -> dict:
    return {"class_type": "PreviewAny", "inputs": {"source": link}}


GRAPH = {
    "pack": {"class_type": "LoadSafeRoPEPack", "inputs": {"pack_name": NAME}},
    "statistics": {"class_type": "LoadStatistics", "inputs": {"name": NAME}},
    "subspaces": {
        "class_type": "BuildSubspaces",
        "inputs": {"statistics": ["statistics", 0], "rank": 2, "lrs_threshold": 0.5, "hds_threshold": -1.0},
    },
    "anchors": {"class_type": "LoadUVRAnchors", "inputs": {"name": NAME}},
    "redirector": {"class_type": "LoadPromptRedirector", "inputs": {"name": NAME}},
    "show_pack": preview(["pack", 1]),
    "show_statistics": preview(["subspaces", 1]),
    "show_anchors": preview(["anchors", 0]),
    "show_redirector": preview(["redirector", 0]),
}

PREVIEWS = [key for key in GRAPH if key.startswith("show_")]


def offered_cache_modes() -> dict[str, list[str]]:
    """The cache modes whose flags this ComfyUI's command line accepts."""
    import comfy.cli_args

    return {mode: args for mode, args in CACHE_MODES.items() if not comfy.cli_args.parser.parse_known_args(args)[1]}


def save_files(pack, models: Path, version: str) -> dict[str, str]:
    """Save every loader's file of `version` under NAME with the pack's own save functions; returns, per loader,
    text that its Preview Any shows for this version only."""
    core = pack.saferope_core
    concept, hidden = f"concept_{version}", VERSIONS[version]["hidden"]
    shape = core.ModelShape("flux", 1, VERSIONS[version]["single_blocks"], HEADS, HEAD_DIM)
    statistics = core.QKStatistics(shape, reservoir_size=32, concepts=[concept])
    g = torch.Generator().manual_seed(0)
    for group in ("unsafe", "safe"):
        for block in shape.block_names():
            for kind in ("q", "k"):
                statistics.add(group, core.site_name(block, "txt", kind), torch.randn(16, HEADS, HEAD_DIM, generator=g))
    subspaces = core.build_subspaces(statistics, rank=2, lrs_threshold=0.5, hds_threshold=-1.0)
    anchors = torch.nn.functional.normalize(torch.randn(HEADS, 2, HEAD_DIM, generator=g), dim=-1)
    redirector = core.redirector.PromptRedirector(core.redirector.RedirectorConfig("flux", WIDTH, 4, hidden, 2))
    folders = {
        name: models / name for name in ("saferope", "saferope_statistics", "saferope_anchors", "saferope_redirectors")
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    core.SafeRoPEPack.from_subspaces(subspaces, shape, [concept]).save(folders["saferope"] / NAME)
    statistics.save(folders["saferope_statistics"] / NAME)
    core.uvr.UVRAnchors(shape, "single.0", anchors, torch.zeros(HEADS, HEAD_DIM), 0.5, 0.85, [concept]).save(
        folders["saferope_anchors"] / NAME
    )
    redirector.save(folders["saferope_redirectors"] / NAME, concept, {})
    heads = HEADS * len(shape.block_names())
    return {
        "pack": concept,  # the pack's info
        "statistics": f"selected {heads} of {heads} heads",  # Build Subspaces' summary (every head kept)
        "anchors": repr([concept]),  # the anchors' repr
        "redirector": f"in_features={WIDTH}, out_features={hidden}",  # the redirector's first layer
    }


def shown(entry: dict) -> dict[str, str]:
    """What each Preview Any showed, by loader."""
    return {key.removeprefix("show_"): "".join(out["text"]) for key, out in entry["outputs"].items() if key in PREVIEWS}


def test_this_comfyui_offers_the_cache_modes(comfy):
    assert {"classic", "lru", "none"} <= offered_cache_modes().keys()


@pytest.mark.parametrize(
    "mode", [m if m == "lru" else pytest.param(m, marks=pytest.mark.one_version) for m in CACHE_MODES]
)
def test_loaders_reload_files_saved_again(pack, mode):
    """Under each cache mode this ComfyUI offers (LRU on every version, the others with the newest: the loaders'
    fingerprints are the same code under every mode)."""
    from comfy_server import ComfyServer

    args = offered_cache_modes().get(mode)
    if args is None:  # 0.3.64 has no RAM-pressure cache
        return
    with ComfyServer({"ComfyUI-SafeRoPE": comfyui_env.REPO}, extra_args=args) as server:
        models = server.base / "models"
        first = save_files(pack, models, "a")
        before = shown(server.run(GRAPH))
        assert before.keys() == first.keys(), before
        assert all(first[loader] in text for loader, text in before.items()), before
        second = save_files(pack, models, "b")
        after = shown(server.run(GRAPH))
    assert after.keys() == second.keys(), after
    stale = sorted(loader for loader, text in after.items() if second[loader] not in text)
    assert not stale, f"loaders that showed the old file after it was saved again under --{mode}: {stale}"


def test_every_loaders_fingerprint_follows_its_file(pack, folders):
    """In process, without a server: each loader's fingerprint_inputs (what ComfyUI's caches key on besides the
    inputs) changes when its file is saved again under the same name, and stays while the file does."""
    n = pack.nodes
    loaders = {
        "pack": (n.rotation_nodes.LoadSafeRoPEPack, {"pack_name": NAME}),
        "statistics": (n.collect_nodes.LoadStatistics, {"name": NAME}),
        "anchors": (n.uvr_nodes.LoadUVRAnchors, {"name": NAME}),
        "redirector": (n.redirect_nodes.LoadPromptRedirector, {"name": NAME}),
    }
    models = next(iter(folders.values())).parent

    def fingerprints():
        return {key: node.fingerprint_inputs(**inputs) for key, (node, inputs) in loaders.items()}

    save_files(pack, models, "a")
    first = fingerprints()
    assert all(first.values()) and fingerprints() == first
    save_files(pack, models, "b")
    second = fingerprints()
    assert all(second[key] != first[key] for key in loaders), (first, second)
