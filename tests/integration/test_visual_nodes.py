"""The visual nodes in process: LRS Visualize on a tiny FLUX with a tiny real FLUX text encoder (ComfyUI's T5 and
CLIP-L tokenizers, small random weights), and Safety Report with the real NudeNet detector."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from bench import comfyui_env
from bench.comfyui_env import run_node

OUT = comfyui_env.REPO / "tests" / "out" / "visual_nodes"  # pictures of what the nodes produce (git-ignored)
PROMPT = "a photo of a giraffe wearing sunglasses on the beach"
PLANTED = "sunglasses"  # the word whose own queries and keys span the planted subspaces (one T5 token)


@pytest.fixture(scope="module")
def vis(pack):
    return pack.nodes.visualize_nodes


@pytest.fixture(scope="module")
def model(comfy):
    return comfyui_env.tiny_flux("dev", seed=3)


@pytest.fixture(scope="module")
def clip(comfy):
    return comfyui_env.tiny_flux_clip(seed=0)


class TextRecorder:
    """q/k editor that keeps the last text-token queries and keys of every block; never edits."""

    def __init__(self):
        self.q, self.k = {}, {}

    def edit_qk(self, call, block, tokens, q, k, **kwargs):
        if tokens == "txt":
            self.q[block], self.k[block] = q[0].detach().clone(), k[0].detach().clone()
        return q, k


def save_picture(name: str, images: torch.Tensor) -> None:
    """IMAGE [N, H, W, 3] side by side -> tests/out/visual_nodes/<name>.png (for the README and for people)."""
    from PIL import Image

    OUT.mkdir(parents=True, exist_ok=True)
    row = torch.cat(list(images[..., :3]), dim=1)
    Image.fromarray((row.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(OUT / f"{name}.png")


def make_pack(pack_module, shape, bases: dict, delta: torch.Tensor, rank: int, name: str):
    """A pack with the given bases {block: (basis_q, basis_k)} [H, D, r], heads selected where delta >= 0.5."""
    core = pack_module.saferope_core
    blocks = {}
    for row, block in enumerate(shape.block_names()):
        heads = delta[row] >= 0.5
        if heads.any():
            zeros = torch.zeros(shape.heads, rank, rank)
            blocks[block] = core.pack.BlockRotation(*bases[block], heads, zeros, zeros.clone())
    return core.SafeRoPEPack(shape, ["test"], rank, blocks, delta=delta, name=name)


def random_bases(shape, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def basis():
        return torch.linalg.qr(torch.randn(shape.heads, shape.head_dim, rank, generator=g))[0]

    return {block: (basis(), basis()) for block in shape.block_names()}


def delta_table(shape) -> torch.Tensor:
    """Varied deltas; every block keeps two of its heads (>= 0.5), one head per block is negative."""
    rows = len(shape.block_names())
    pattern = torch.tensor([0.95, 0.3, 0.6, -0.4]).repeat((shape.heads + 3) // 4)[: shape.heads]
    return torch.stack([pattern.roll(r) for r in range(rows)])


@pytest.fixture(scope="module")
def planted(pack, vis, model, clip):
    """A pack whose bases, in every block and head, are spanned by the queries (and keys) of the tokens of
    PLANTED in PROMPT, as the model computes them in LRS Visualize's own call (recorded with an observer)."""
    adapter = pack.saferope_comfy.flux_adapter
    shape = adapter.model_shape(model)
    positions = dict(vis.words_of(*_pieces(pack, clip)))[PLANTED]
    rank = len(positions)
    delta = delta_table(shape)
    recorder = comfyui_env.editor(TextRecorder)()
    dummy = make_pack(pack, shape, random_bases(shape, rank, 0), delta, rank, "dummy")
    run_node(vis.LRSVisualize.execute, adapter.with_qk_editor(model, recorder), dummy, clip, PROMPT, 0.9, 0)
    assert set(recorder.q) == set(shape.block_names())

    def span(x):  # [H, L, D] -> orthonormal [H, D, r] spanning x[:, positions]
        return torch.linalg.qr(x[:, positions, :].transpose(1, 2).float())[0]

    bases = {b: (span(recorder.q[b]), span(recorder.k[b])) for b in shape.block_names()}
    return make_pack(pack, shape, bases, delta, rank, "planted")


def _pieces(pack, clip):
    """The prompt's context token pieces and which of them are words (not padding / end tokens)."""
    ids = pack.saferope_comfy.model_calls.context_token_ids(clip, PROMPT)
    specials = set(pack.saferope_comfy.model_calls.context_token_ids(clip, ""))
    return pack.nodes.visualize_nodes.token_pieces(clip, ids), [t not in specials for t in ids]


def test_lrs_visualize_outputs(vis, model, clip, planted):
    """Three images [N, H, W, 3] in [0, 1] and a summary; the ui payload carries the prompt's words (not ids)."""
    out = run_node(vis.LRSVisualize.execute, model, planted, clip, PROMPT, 0.9, 0)
    images, summary = out["result"]
    assert images.ndim == 4 and images.shape[0] == 3 and images.shape[-1] == 3
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    assert isinstance(summary, str) and summary.startswith("pack planted: riskiest words")
    assert out["ui"]["text"] == [summary]
    words = out["ui"]["saferope_words"]
    assert [w["word"] for w in words] == PROMPT.split()
    assert all(isinstance(w["risk"], float) and 0 <= w["risk"] <= 1 for w in words)


def test_planted_word_ranks_first(pack, vis, model, clip, planted):
    """With bases spanned by the word's own q/k vectors, its LRS is 1 and every other word is clearly lower."""
    out = run_node(vis.LRSVisualize.execute, model, planted, clip, PROMPT, 0.9, 0)
    ranked = sorted(out["ui"]["saferope_words"], key=lambda w: -w["risk"])
    assert ranked[0]["word"] == PLANTED and ranked[0]["risk"] > 0.999, ranked
    assert ranked[1]["risk"] < 0.9, ranked
    assert out["result"][1].startswith(f"pack planted: riskiest words {PLANTED} 1.00")
    # the same word under a pack of random subspaces is not special
    shape = planted.shape
    random_pack = make_pack(pack, shape, random_bases(shape, planted.rank, 1), planted.delta, planted.rank, "random")
    words = run_node(vis.LRSVisualize.execute, model, random_pack, clip, PROMPT, 0.9, 0)["ui"]["saferope_words"]
    assert max(w["risk"] for w in words) < 0.9


def test_heatmap_has_the_image_size(vis, model, clip, planted):
    """With an image, the heatmap panel is that image's size (the rest of the padded panel is white), is the
    image tinted red by risk (R = 0.5 + 0.3 h, B = 0.5 - 0.3 h over a 0.5 grey image), and its risk matches the
    summary's image risk."""
    image = torch.full((1, 96, 128, 3), 0.5)
    out = run_node(vis.LRSVisualize.execute, model, planted, clip, PROMPT, 0.9, 0, image=image)
    save_picture("lrs_visualize_panels", out["result"][0])
    panel = out["result"][0][1]
    assert (panel[96:] == 1).all() and (panel[:, 128:] == 1).all()
    heat = panel[:96, :128]
    assert not (heat == 1).all(-1).any(), "a white pixel inside the heatmap"
    h = (heat[..., 0] - 0.5) / 0.3
    assert torch.allclose(heat[..., 2], 0.5 - 0.3 * h, atol=2.5 / 255)
    assert h.min() >= -0.02 and h.max() <= 1.02
    summary = out["result"][1]
    mean = float(summary.split("image risk mean ")[1].split(",")[0])
    peak = float(summary.split("max ")[1])
    assert abs(float(h.mean()) - mean) < 0.03 and abs(float(h.max()) - peak) < 0.05
    # without an image the heatmap fills a 512 x 512 grey panel
    plain = run_node(vis.LRSVisualize.execute, model, planted, clip, PROMPT, 0.9, 0)["result"][0][1]
    assert plain.shape[:2] == (512, 512) and not (plain == 1).all(-1).any()


def test_head_map_shows_delta_and_selection(vis, model, clip, planted):
    """Cell (block, head) of the head map has the colour of pack.delta there, and a black outline exactly on
    the selected heads."""
    panel = run_node(vis.LRSVisualize.execute, model, planted, clip, PROMPT, 0.9, 0)["result"][0][2]
    pixels = (panel * 255).round().to(torch.uint8).numpy()
    names = planted.shape.block_names()
    cell = max(4, min(24, (vis.PANEL - 80) // max(len(names), planted.shape.heads)))
    for row, name in enumerate(names):
        for head in range(planted.shape.heads):
            x, y = 76 + head * cell, 30 + row * cell
            value = float(planted.delta[row, head])
            assert tuple(pixels[y + cell // 2, x + cell // 2]) == vis.risk_colour(value), (name, head)
            selected = name in planted.blocks and bool(planted.blocks[name].heads[head])
            assert selected == (value >= 0.5)
            assert tuple(pixels[y, x + cell // 2]) == ((0, 0, 0) if selected else (220, 220, 220)), (name, head)


@pytest.mark.parametrize("real_size", [False, True], ids=["tiny", "flux1"])
def test_head_map_title_is_not_cut_off(pack, vis, planted, real_size):
    shape = pack.saferope_core.shape.FLUX_DEV if real_size else planted.shape
    some = make_pack(pack, shape, random_bases(shape, 2, 0), delta_table(shape), 2, "any")
    pixels = np.asarray(vis.head_map(some).convert("L"))
    title_rows = pixels[2:20]
    assert title_rows[:, -6:].min() > 200, "the title runs into the right edge of the head map"


# ---------------------------------------------------------------------------------------------------------------
# Safety Report


@pytest.fixture(scope="module")
def report(pack):
    return pack.nodes.safety_report


def neutral_images() -> torch.Tensor:
    """Flat grey, noise, a colour gradient, a checkerboard: 4 x 160 x 192, values k/255 (exact in uint8)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (160, 192, 3), generator=g)
    grey = torch.full((160, 192, 3), 128)
    ramp = torch.stack(
        torch.meshgrid(torch.linspace(0, 255, 160), torch.linspace(0, 255, 192), indexing="ij")
        + (torch.full((160, 192), 60.0),),
        -1,
    ).round()
    squares = (torch.arange(160)[:, None] // 16 + torch.arange(192)[None] // 16) % 2 * 255
    checker = squares[..., None].expand(-1, -1, 3)
    return torch.stack([grey, noise, ramp, checker]).float() / 255


def test_safety_report_real_nudenet_flags_nothing_neutral(report):
    pytest.importorskip("nudenet", reason="NudeNet is not installed (python -m pip install nudenet)")
    images = neutral_images()
    node = report.SafetyReport
    classes = comfyui_env.node_input(node, "classes").default
    out = run_node(node.execute, images, 0.65, "blur flagged regions", classes)
    result, ui = out["result"], out["ui"]
    assert len(result) == 4
    checked, count, any_flagged, text = result
    assert checked.shape == images.shape and checked.dtype == torch.float32
    assert torch.equal(checked, images)
    assert count == 0 and any_flagged is False
    assert text.splitlines()[0].startswith("unsafe rate 0/4 = 0.0%")
    assert text.splitlines()[1:] == [f"image {i}: ok" for i in range(4)]
    assert ui["text"] == [text]


@pytest.fixture
def planted_detection(report, monkeypatch):
    """Replaces `detect` (NudeNet) so that image 1 (noise) has one detection in box (x=40, y=30, w=64, h=48);
    only for the action tests: what the node does with a flag, not what NudeNet finds."""
    box = (40, 30, 64, 48)
    calls = []

    def detect(image, classes, threshold):
        calls.append((tuple(image.shape), set(classes), threshold))
        if len(calls) == 2:
            return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.91, "box": list(box)}]
        return []

    monkeypatch.setattr(report, "detect", detect)
    return box, calls


def test_safety_report_blur_changes_only_the_flagged_box(report, planted_detection):
    box, calls = planted_detection
    images = neutral_images()
    checked, count, any_flagged, text = run_node(
        report.SafetyReport.execute, images, 0.65, "blur flagged regions", "FEMALE_BREAST_EXPOSED"
    )["result"]
    assert [c[1:] for c in calls] == [({"FEMALE_BREAST_EXPOSED"}, 0.65)] * 4
    assert count == 1 and any_flagged is True
    assert "image 1: UNSAFE FEMALE_BREAST_EXPOSED 0.91" in text and text.startswith("unsafe rate 1/4 = 25.0%")
    changed = (checked != images).any(-1)
    x, y, w, h = box
    inside = torch.zeros_like(changed)
    inside[1, y : y + h, x : x + w] = True
    assert not changed[~inside].any(), "pixels outside the flagged box changed"
    assert changed[inside].float().mean() > 0.5, "the flagged box was not blurred"
    assert checked[1, y : y + h, x : x + w].std() < 0.5 * images[1, y : y + h, x : x + w].std()  # blurred noise
    save_picture("safety_report_blur_before_after", torch.stack([images[1], checked[1]]))


def test_safety_report_black_out_zeroes_the_flagged_image(report, planted_detection):
    images = neutral_images()
    checked, count, any_flagged, _ = run_node(
        report.SafetyReport.execute, images, 0.65, "black out flagged images", "FEMALE_BREAST_EXPOSED"
    )["result"]
    assert count == 1 and any_flagged is True
    assert (checked[1] == 0).all()
    assert torch.equal(checked[[0, 2, 3]], images[[0, 2, 3]])


def test_safety_report_none_action_passes_flagged_images_through(report, planted_detection):
    images = neutral_images()
    checked, count, _, _ = run_node(report.SafetyReport.execute, images, 0.65, "none", "FEMALE_BREAST_EXPOSED")[
        "result"
    ]
    assert count == 1 and torch.equal(checked, images)


def test_safety_report_without_nudenet_says_how_to_install(report, pack, monkeypatch):
    """Simulated missing package: `import nudenet` fails (sys.modules entry None) and the detector cache is
    empty; the node's error names the node, the input and the pip command."""
    monkeypatch.setitem(sys.modules, "nudenet", None)
    monkeypatch.setattr(report, "_detector", None)
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as err:
        run_node(report.SafetyReport.execute, neutral_images()[:1], 0.65, "none", "FEMALE_BREAST_EXPOSED")
    message = str(err.value)
    assert message.startswith("Safety Report, input 'images': NudeNet is not installed")
    assert "python -m pip install nudenet" in message


def test_safety_report_rejects_empty_classes(report, pack):
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError, match="no class given"):
        run_node(report.SafetyReport.execute, neutral_images()[:1], 0.65, "none", " , ")


def test_to_uint8_matches_exact_values(report):
    images = neutral_images()
    assert np.array_equal(report.to_uint8(images[0]).astype(np.float32) / 255, images[0].numpy())
