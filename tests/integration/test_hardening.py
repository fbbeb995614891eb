"""Bad input that once failed silently or with a raw exception (issue "Hardening"), through the nodes in process.
Each test fails without its fix; the numbers are the issue's items. Item 11 (UVR state per sampling run) is
tests/integration/test_uvr.py::test_mask_carries_to_the_next_startup_step_of_the_same_run_only."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from bench import comfyui_env
from bench.comfyui_env import run_node

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def parts(comfy, pack):
    """A tiny FLUX.1 dev, its tiny CLIP, a prompt set, statistics, subspaces and UVR anchors."""
    n = pack.nodes
    with torch.inference_mode():
        model, clip = comfyui_env.tiny_flux("dev"), comfyui_env.tiny_flux_clip()
    prompts, _ = run_node(n.SafeRoPEPromptSet.execute, "pikachu", "", "", "", "", 6, 4, 0)
    stats, _ = run_node(n.CollectQK.execute, model, clip, prompts, "1.0", 64, 64, 0, 16)
    subspaces, _ = run_node(n.BuildSubspaces.execute, stats, 2, 0.7, -1.0)
    anchors, _ = run_node(n.CollectUVRAnchors.execute, model, clip, prompts, 0, "1.0", 64, 64, 1, 0)
    return {
        "model": model,
        "clip": clip,
        "prompts": prompts,
        "stats": stats,
        "subspaces": subspaces,
        "anchors": anchors,
    }


@pytest.fixture
def input_dir(comfy, tmp_path):
    """ComfyUI's input folder, redirected to a temp dir for one test."""
    import folder_paths

    before = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    os.makedirs(tmp_path / "input")
    yield tmp_path / "input"
    folder_paths.set_input_directory(before)


def refused(pack, input_name, method, *args, **kwargs) -> str:
    """The node raises the pack's own input error, naming `input_name` (never another exception type)."""
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as err:
        run_node(method, *args, **kwargs)
    assert err.value.input_name == input_name, str(err.value)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Items 1, 2, 10: numbers that are not finite or out of range (ComfyUI's own check lets NaN through, and does not
# see values that arrive through links)


@pytest.mark.parametrize("bad", [NAN, INF, -1000.0, 1e6])
def test_non_finite_or_out_of_range_numbers_are_refused(pack, parts, bad):
    n, m = pack.nodes, parts["model"]
    rotation = parts["subspaces"]
    images = torch.rand(1, 16, 16, 3)
    cases = [
        ("strength", n.ApplyRiskRotation.execute, (m, rotation, bad, "both")),
        ("strength", n.RestrictUnsafeFlow.execute, (m, parts["anchors"], bad, -1.0, 0.85, -1)),
        ("threshold", n.RestrictUnsafeFlow.execute, (m, parts["anchors"], 1.0, bad, 0.85, -1)),
        ("sigma_start", n.RestrictUnsafeFlow.execute, (m, parts["anchors"], 1.0, -1.0, bad, -1)),
        ("threshold", n.SafetyReport.execute, (images, bad, "none", "FEMALE_BREAST_EXPOSED")),
        ("sigma", n.LRSVisualize.execute, (m, rotation, parts["clip"], "a red fox", bad, 0)),
        (
            "learning_rate",
            n.TrainRiskRotations.execute,
            (m, parts["clip"], rotation, parts["prompts"], 2, bad, 1.0, 1.0, 0, 64, 64, "numbers", 1, False, False),
        ),
        ("lrs_threshold", n.BuildSubspaces.execute, (parts["stats"], 2, bad, 0.5)),
    ]
    for input_name, method, args in cases:
        message = refused(pack, input_name, method, *args)
        assert "is not a number from" in message, message


def test_only_exactly_minus_one_means_calibrated(pack, parts):
    """Item 3: a negative threshold other than -1 is a threshold (cosine scores go down to -1), not 'calibrated'."""
    import comfy.patcher_extension

    def threshold_of(value):
        (patched,) = run_node(
            pack.nodes.RestrictUnsafeFlow.execute, parts["model"], parts["anchors"], 1.0, value, 0.85, -1
        )
        wrapper = patched.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL]["saferope"][-1]
        return wrapper.editor.threshold

    assert threshold_of(-1.0) == parts["anchors"].threshold
    assert threshold_of(-0.99) == -0.99 and threshold_of(-0.01) == -0.01


# ---------------------------------------------------------------------------------------------------------------
# Items 7, 8: training names and resumed runs


@pytest.mark.parametrize("name", ["bad\x00name", "x" * 300, "", "  ", "\x1b[31mred"])
def test_run_name_is_checked_before_training(pack, parts, folders, name):
    """Item 7: an unusable run_name fails at once (100,000 steps asked: nothing trains), naming run_name; ComfyUI's
    validation says the same before the graph runs."""
    start = time.perf_counter()
    refused(
        pack,
        "run_name",
        pack.nodes.TrainRiskRotations.execute,
        parts["model"],
        parts["clip"],
        parts["subspaces"],
        parts["prompts"],
        100000,
        0.01,
        1.0,
        1.0,
        0,
        64,
        64,
        name,
        100,
        False,
        False,
    )
    assert time.perf_counter() - start < 5
    assert "run_name" in str(pack.nodes.TrainRiskRotations.validate_inputs(run_name=name))


def test_resuming_with_fewer_steps_records_what_was_trained(pack, parts, folders):
    """Item 8: a checkpoint of 6 steps resumed by a run asking 3 returns the 6-step rotations labelled 6 steps."""

    def train(steps):
        return run_node(
            pack.nodes.TrainRiskRotations.execute,
            parts["model"],
            parts["clip"],
            parts["subspaces"],
            parts["prompts"],
            steps,
            0.01,
            1.0,
            1.0,
            0,
            64,
            64,
            "more_steps",
            1,
            True,
            False,
        )[0]

    six = train(6)
    again = train(3)
    assert six.recipe["steps"] == 6 and again.recipe["steps"] == 6
    for name, block in six.blocks.items():
        assert torch.equal(block.w_txt, again.blocks[name].w_txt)


def test_truncated_checkpoint_names_run_name(pack, parts, folders):
    """Item 10: a damaged checkpoint (truncated file) is refused on run_name, with the way out."""
    path = folders["saferope_training"] / "truncated.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"__metadata__"')
    message = refused(
        pack,
        "run_name",
        pack.nodes.TrainRiskRotations.execute,
        parts["model"],
        parts["clip"],
        parts["subspaces"],
        parts["prompts"],
        2,
        0.01,
        1.0,
        1.0,
        0,
        64,
        64,
        "truncated",
        1,
        True,
        False,
    )
    assert "turn resume off" in message


# ---------------------------------------------------------------------------------------------------------------
# Items 9, 10: files the nodes read and write


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../../etc/passwd", "..\\..\\x.txt", "/proc/self/environ", "a\x00b.txt", "missing.txt"]
)
def test_prompt_files_come_from_the_input_folder_only(pack, input_dir, name):
    """Item 9: safe_prompt_file names a file inside ComfyUI's input folder; any other path is refused without
    saying whether it exists or how many lines it has."""
    message = refused(
        pack, "safe_prompt_file", pack.nodes.SafeRoPEPromptSet.execute, "nudity", "", "", "", "", 4, 4, 0, name
    )
    assert "safe prompts" not in message and "root:" not in message


@pytest.mark.parametrize("how", ["traversal", "link"])
def test_a_prompt_file_beside_the_input_folder_is_never_read(pack, input_dir, how):
    """A file that exists just outside ComfyUI's input folder, named through '..' or reached through a link inside
    the folder, is refused, and none of its lines reaches the prompt set or the message."""
    outside = input_dir.parent / "outside.txt"
    outside.write_text("an outside line that must not be read\n")
    name = "../outside.txt"
    if how == "link":
        (input_dir / "inside.txt").symlink_to(outside)
        name = "inside.txt"
    message = refused(
        pack, "safe_prompt_file", pack.nodes.SafeRoPEPromptSet.execute, "nudity", "", "", "", "", 4, 4, 0, name
    )
    assert "outside line" not in message and "outside ComfyUI's input folder" in message


def test_prompt_file_in_the_input_folder_is_read_and_capped(pack, input_dir):
    (input_dir / "captions.txt").write_text("a red car\na blue boat\n# a comment\na tree\n")
    prompts, summary = run_node(
        pack.nodes.SafeRoPEPromptSet.execute, "nudity", "", "", "", "one safe line", 4, 3, 0, "captions.txt"
    )
    assert set(prompts.safe) <= {"one safe line", "a red car", "a blue boat", "a tree"} and len(prompts.safe) == 3
    huge = input_dir / "huge.txt"
    with huge.open("wb") as f:  # a sparse 65 MiB file: refused before anything is read
        f.truncate(65 * 2**20)
    assert "MiB" in refused(
        pack, "safe_prompt_file", pack.nodes.SafeRoPEPromptSet.execute, "nudity", "", "", "", "", 4, 4, 0, "huge.txt"
    )


def test_fid_folder_comes_from_the_input_folder_only(pack, input_dir):
    images = torch.rand(1, 16, 16, 3)
    for name in ("/tmp", "../..", "nope"):
        refused(
            pack,
            "fid_reference_folder",
            pack.nodes.SafetyReport.execute,
            images,
            0.65,
            "none",
            "FEMALE_BREAST_EXPOSED",
            name,
        )


@pytest.mark.parametrize("name", ["a\x00b", "x" * 300, "..", ".hidden", "\u202eevil"])
def test_save_names_are_checked(pack, parts, folders, name):
    """Item 10: NUL, over-long, dot and control-character names are refused on 'name', in validation too."""
    n = pack.nodes
    for node, value in (
        (n.SaveSafeRoPEPack, parts["subspaces"]),
        (n.SaveStatistics, parts["stats"]),
        (n.SaveUVRAnchors, parts["anchors"]),
    ):
        refused(pack, "name", node.execute, value, name, True)
        assert node.validate_inputs(name=name) is not True


@pytest.mark.parametrize(
    "repo, filename, input_name",
    [
        ("no-owner", "pack.safetensors", "hf_repo_id"),
        ("a/b/c", "pack.safetensors", "hf_repo_id"),
        ("../up", "pack.safetensors", "hf_repo_id"),
        ("user/packs", "../escape.safetensors", "hf_filename"),
        ("user/packs", "/abs.safetensors", "hf_filename"),
        ("user/packs", "pack.pt", "hf_filename"),
    ],
)
def test_hub_names_are_validated_by_the_node(pack, folders, repo, filename, input_name):
    refused(pack, input_name, pack.nodes.LoadSafeRoPEPack.execute, "none", repo, filename)


def test_hub_offline_and_unreachable_fail_fast_and_leave_nothing(pack, folders, monkeypatch):
    """Item 10: with HF_HUB_OFFLINE, and with the Hub unreachable, Load SafeRoPE Pack fails at once with the
    reason on hf_repo_id and leaves no empty folder; downloads have a place per repo, so a local file of the same
    name from another repo is never taken for it."""
    import huggingface_hub.constants

    (folders["saferope"] / "pack.safetensors").parent.mkdir(parents=True, exist_ok=True)
    (folders["saferope"] / "pack.safetensors").write_bytes(b"not the repo's file")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = refused(pack, "hf_repo_id", pack.nodes.LoadSafeRoPEPack.execute, "none", "user/packs", "pack.safetensors")
    assert "HF_HUB_OFFLINE" in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(
        huggingface_hub.constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}",
    )
    start = time.perf_counter()
    message = refused(pack, "hf_repo_id", pack.nodes.LoadSafeRoPEPack.execute, "none", "user/packs", "pack.safetensors")
    assert time.perf_counter() - start < 30 and "could not download" in message
    assert not (folders["saferope"] / "hub").exists() or not any((folders["saferope"] / "hub").rglob("*"))


def test_malformed_statistics_and_empty_lists_say_what_to_do(pack, parts, folders):
    """Item 10: a statistics file with broken metadata is refused on 'name' as a statistics error; the 'none'
    entries of Load Statistics / Load UVR Anchors (shown when a folder is empty) say how to make a file."""
    n = pack.nodes
    path = folders["saferope_statistics"] / "broken_counts.safetensors"
    parts["stats"].save(path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["saferope"] = meta["saferope"].replace('"count": {', '"count": {"unsafe/x": "many", ')
    save_file(tensors, str(path), metadata=meta)
    import folder_paths

    folder_paths.filename_list_cache.pop("saferope_statistics", None)
    assert "broken_counts.safetensors" in comfyui_env.node_input(n.LoadStatistics, "name").options
    refused(pack, "name", n.LoadStatistics.execute, "broken_counts.safetensors")
    assert "Save Statistics" in refused(pack, "name", n.LoadStatistics.execute, "none")
    assert "Save UVR Anchors" in refused(pack, "name", n.LoadUVRAnchors.execute, "none")


# ---------------------------------------------------------------------------------------------------------------
# Item 12: no host-device sync on the rotation's hot path


class SyncDetector:
    """Records calls of the host-device sync points (.item, bool / float / int of a tensor, .tolist, .cpu,
    nonzero, torch.linalg.eigh: it waits for its result on a GPU) made from this repository's code (nodes/,
    saferope_core/) while active."""

    PATCHED = [
        ("item", "Tensor"),
        ("tolist", "Tensor"),
        ("cpu", "Tensor"),
        ("nonzero", "Tensor"),
        ("__bool__", "Tensor"),
        ("__float__", "Tensor"),
        ("__int__", "Tensor"),
        ("nonzero", "torch"),
        ("any", "torch"),
        ("all", "torch"),
        ("eigh", "linalg"),
    ]

    def __init__(self, roots):
        self.roots = [str(r) for r in roots]
        self.calls = []

    def __enter__(self):
        import inspect

        self.saved = []
        for name, owner in self.PATCHED:
            target = {"Tensor": torch.Tensor, "torch": torch, "linalg": torch.linalg}[owner]
            original = getattr(target, name)
            self.saved.append((target, name, original))

            def spy(*args, _original=original, _name=name, **kwargs):
                frame = inspect.currentframe().f_back
                while frame is not None:
                    if any(frame.f_code.co_filename.startswith(r) for r in self.roots):
                        self.calls.append((_name, frame.f_code.co_filename, frame.f_lineno))
                        break
                    frame = frame.f_back
                return _original(*args, **kwargs)

            setattr(target, name, spy)
        return self

    def __exit__(self, *exc):
        for target, name, original in self.saved:
            setattr(target, name, original)


def test_rotation_makes_no_host_sync_per_block(pack, parts):
    """Item 12: once a pack is on the model's device (the first call), a model call through Apply Risk Rotation
    reaches no sync point in the pack's code: no nonzero for the head index, no bool of torch.any for the W
    check, no eigen-decomposition of the fixed rotations, per block or per call."""
    trained = parts["subspaces"].to("cpu")
    for block in trained.blocks.values():
        block.w_txt = torch.randn_like(block.w_txt)
        block.w_img = torch.randn_like(block.w_img)
    (patched,) = run_node(pack.nodes.ApplyRiskRotation.execute, parts["model"], trained, 1.0, "both")
    x = torch.randn(1, 16, 8, 8)
    context, pooled = comfyui_env.encode_text("a red fox")
    with torch.inference_mode():
        comfyui_env.run_model(patched, x, 0.9, context, pooled)  # the pack moves to the device once
        root = comfyui_env.REPO
        with SyncDetector([root / "nodes", root / "saferope_core"]) as detector:
            out = comfyui_env.run_model(patched, x, 0.9, context, pooled)
    assert math.isfinite(float(out.abs().sum()))
    assert detector.calls == [], detector.calls


def test_a_text_encoder_whose_tokens_do_not_line_up_is_named_as_the_clip_input(pack, parts, monkeypatch):
    """A text encoder whose conditioning has more tokens than its tokenizer gives (one made for another model) is
    refused as the node's 'clip' input with a fix, never as a bare exception."""
    clip = parts["clip"].clone()
    encode = clip.encode_from_tokens_scheduled

    def one_token_more(tokens, **kwargs):
        ((context, extra),) = encode(tokens, **kwargs)
        return [[torch.cat([context, context[:, :1]], dim=1), extra]]

    monkeypatch.setattr(clip, "encode_from_tokens_scheduled", one_token_more)
    n = pack.nodes
    message = refused(pack, "clip", n.CollectQK.execute, parts["model"], clip, parts["prompts"], "1.0", 64, 64, 0, 16)
    assert "do not line up" in message and "text encoder" in message
