"""Collect & Train on ComfyUI's own FLUX and FLUX text-encoder classes (tiny, random, CPU), through the real nodes:
SafeRoPE Prompt Set -> Collect Q/K -> (Merge / Save / Load Statistics) -> Build Subspaces -> Train Risk Rotations ->
Save SafeRoPE Pack -> Load SafeRoPE Pack -> Apply Risk Rotation.

Nodes are called under torch.inference_mode(), as ComfyUI's executor calls them, and the models are built under it
too, as ComfyUI's loaders build them (so training meets inference-mode weights, as it does in ComfyUI).

A random model has no concept in it, so one is planted (see `planted`): the subject words of a custom concept share
a direction in the tiny T5's embeddings (a trained encoder has such a shared meaning, a random one does not), and
one head of FLUX block double.0 reads it: for subject tokens its text q and k point along fixed unit directions,
its image queries look for that key, and its values carry a strong signal. That head must be the one Build
Subspaces selects, and training must learn to rotate the subject keys away.
"""

from __future__ import annotations

import gc
import math
import re
import weakref
from dataclasses import dataclass

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from bench import comfyui_env
from bench.comfyui_env import run_node

PLANTED_BLOCK, PLANTED_HEAD = 0, 1  # block double.0, head 1
HIDDEN, HEADS = 128, 4  # head_dim 32: a random 16-dim head holds a few subject tokens in too few dimensions
# Candidate words of the planted concept; those sharing a T5 token with the safe prompts, templates or modifiers
# are dropped (the planted direction must mark subject tokens only).
SUBJECT_CANDIDATES = [
    "nude",
    "naked",
    "topless",
    "shirtless",
    "undressed",
    "nsfw",
    "erotic",
    "sexy",
    "unclothed",
    "bare",
    "nudity",
    "breasts",
    "lingerie",
    "nipples",
    "porn",
    "stripper",
    "bikini",
    "sensual",
    "seductive",
    "buttocks",
    "genitals",
    "explicit",
]
# Build Subspaces settings of the planted model: rank 2 (a rotation needs a plane), LRS > 0.8, default delta >= 0.5.
RANK, LRS_THRESHOLD, HDS_THRESHOLD = 2, 0.8, 0.5
TRAIN_STEPS, LEARNING_RATE = 40, 0.05
# The planted concept is a direction in the subject tokens' q/k: these tests check the training machinery with the
# paper's objective, whose effect (the unsafe deviation) 40 steps show; the default (redirect) objective is checked
# end to end on the testbed (test_testbed.py), where a prompt's anchor is something the model can draw.
OBJECTIVE = "deviate"
SIZE = 64  # image width/height in collection and training: 8x8 latent, 16 image tokens


def nodes_of(pack):
    n = pack.nodes
    return n.SafeRoPEPromptSet.execute, n.CollectQK.execute, n.BuildSubspaces.execute


# ---------------------------------------------------------------------------------------------------------------
# The planted concept


def tokenizer(pack, clip):
    return lambda text: pack.saferope_comfy.model_calls.context_token_ids(clip, text)


def concept_lists(pack, clip) -> dict[str, list[str]]:
    """Subjects with T5 tokens of their own, and the shipped nudity modifiers, templates and safe prompts."""
    lists = pack.saferope_core.prompts.default_lists("nudity")
    tokenize = tokenizer(pack, clip)
    specials = set(tokenize(""))
    context = " ".join(lists["safe"] + lists["modifiers"] + lists["templates"])
    common = set(tokenize(context.replace("{subject}", " ").replace("{modifier}", " "))) | specials
    subjects = [w for w in SUBJECT_CANDIDATES if not (set(tokenize(w)) - specials) & common]
    return {
        "subjects": subjects,
        "modifiers": lists["modifiers"],
        "templates": lists["templates"],
        "safe": lists["safe"],
    }


def prompt_set(pack, lists, count: int, seed: int):
    prompts, _ = run_node(
        nodes_of(pack)[0],
        "custom",
        "\n".join(lists["subjects"]),
        "\n".join(lists["modifiers"]),
        "\n".join(lists["templates"]),
        "\n".join(lists["safe"]),
        count,
        count,
        seed,
    )
    return prompts


def plant_concept_in_clip(pack, clip, subjects, share: float = 0.5, seed: int = 3) -> None:
    """Give the subject words' T5 tokens a common direction e: embedding -> sqrt(1-s) emb + sqrt(s) |emb| e."""
    tokenize = tokenizer(pack, clip)
    ids = sorted({i for s in subjects for i in tokenize(s)} - set(tokenize("")))
    table = clip.cond_stage_model.t5xxl.transformer.shared.weight
    e = torch.nn.functional.normalize(torch.randn(table.shape[1], generator=torch.Generator().manual_seed(seed)), dim=0)
    with torch.no_grad():
        table[ids] = (1 - share) ** 0.5 * table[ids] + share**0.5 * table[ids].norm(dim=1, keepdim=True) * e


def plant_head(pack, model, clip, prompts, gain: float = 5.0) -> float:
    """Make head PLANTED_HEAD of double block PLANTED_BLOCK respond to the planted concept; returns the subject
    tokens' mean distance from the other tokens along the read-out direction (in standard deviations of those).

    The block's text modulation (shift/scale before attention) is switched off, so the head reads the same feature
    at every sigma and prompt. The read-out g is the direction separating subject tokens from other tokens at the
    input of the text qkv layer, measured on `prompts`; the head's text q, k and v get gain * (g.x - c) along fixed
    orthonormal u_q, u_k and a unit u_v (c: the other tokens' mean), and its image queries point along u_k.
    """
    din = model.model.diffusion_model
    block = din.double_blocks[PLANTED_BLOCK]
    hidden, dim = din.hidden_size, din.hidden_size // din.num_heads
    with torch.no_grad():
        block.txt_mod.lin.weight[: 2 * hidden] = 0
        block.txt_mod.lin.bias[: 2 * hidden] = 0

    tokenize = tokenizer(pack, clip)
    location = pack.saferope_core.locate_subjects(prompts.unsafe, tokenize)
    specials = set(tokenize(""))
    seen = []
    handle = block.txt_attn.qkv.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    subject, other = [], []
    try:
        texts = [(p.text, location.found[i]) for i, p in enumerate(prompts.unsafe)] + [(t, []) for t in prompts.safe]
        for text, positions in texts:
            encoded = pack.saferope_comfy.model_calls.encode_prompt(clip, text)
            comfyui_env.run_model(model, torch.zeros(1, 16, 2, 2), 1.0, encoded.context, encoded.pooled)
            x = seen.pop()
            subject.append(x[positions])
            other.append(x[[j for j, t in enumerate(encoded.token_ids) if t not in specials and j not in positions]])
    finally:
        handle.remove()
    subject, other = torch.cat(subject), torch.cat(other)
    g = torch.nn.functional.normalize(subject.mean(0) - other.mean(0), dim=0)
    g = g / (other @ g).std()
    c = (other @ g).mean()

    u_q, u_k = torch.linalg.qr(torch.randn(dim, 2, generator=torch.Generator().manual_seed(7)))[0].T
    u_v = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(8)), dim=0)
    heads = slice(PLANTED_HEAD * dim, (PLANTED_HEAD + 1) * dim)
    with torch.no_grad():
        weight, bias = block.txt_attn.qkv.weight, block.txt_attn.qkv.bias
        for part, u in enumerate((u_q, u_k, u_v)):
            rows = slice(part * hidden + heads.start, part * hidden + heads.stop)
            weight[rows] += gain * u[:, None] * g[None, :]
            bias[rows] -= gain * u * c
        block.img_attn.qkv.weight[heads] *= 0.3  # image queries: mostly u_k, so they attend to subject keys
        block.img_attn.qkv.bias[heads] = 3.0 * u_k
    return float(((subject @ g) - c).mean())


@dataclass
class Planted:
    clip: object
    model: object
    lists: dict
    prompts: object  # collection and training prompts
    held: object  # held-out prompts (not in `prompts`)
    separation: float
    statistics: object
    report: str
    subspaces: object
    summary: str


@pytest.fixture(scope="module")
def planted(pack) -> Planted:
    """Planted concept, one collection (24 unsafe + 24 safe prompts, sigma 1.0) and its subspaces."""
    prompt_set_node, collect, build = nodes_of(pack)
    with torch.inference_mode():
        clip = comfyui_env.tiny_flux_clip()
        model = comfyui_env.tiny_flux("dev", hidden=HIDDEN, heads=HEADS)
    lists = concept_lists(pack, clip)
    assert len(lists["subjects"]) >= 8, lists["subjects"]
    with torch.inference_mode():
        plant_concept_in_clip(pack, clip, lists["subjects"])
        separation = plant_head(pack, model, clip, prompt_set(pack, lists, 40, seed=1))
    prompts = prompt_set(pack, lists, 24, seed=0)
    held = prompt_set(pack, lists, 40, seed=5)
    held.unsafe = [p for p in held.unsafe if p not in prompts.unsafe][:4]
    held.safe = [t for t in held.safe if t not in prompts.safe][:4]
    statistics, report = run_node(collect, model, clip, prompts, "1.0", SIZE, SIZE, 0, 256)
    subspaces, summary = run_node(build, statistics, RANK, LRS_THRESHOLD, HDS_THRESHOLD)
    return Planted(clip, model, lists, prompts, held, separation, statistics, report, subspaces, summary)


# ---------------------------------------------------------------------------------------------------------------
# Collection and head selection


def table(delta: torch.Tensor) -> str:
    return "\n".join(" ".join(f"{v:5.2f}" for v in row) for row in delta.tolist())


def test_planted_head_is_the_one_selected(pack, planted):
    """Build Subspaces keeps the planted head (delta near 1) and no other; without the planting in FLUX (same text
    encoder, same prompts) that head's delta is low and no head comes near it."""
    print(f"\nseparation of subject tokens along the read-out: {planted.separation:.2f} sd\n{planted.summary}")
    assert planted.separation > 2.0
    assert "found in 24 of 24 prompts" in planted.report
    pack_ = planted.subspaces
    assert list(pack_.blocks) == ["double.0"]
    assert pack_.blocks["double.0"].heads.tolist() == [h == PLANTED_HEAD for h in range(HEADS)]
    delta = pack_.delta
    others = delta.clone()
    others[PLANTED_BLOCK, PLANTED_HEAD] = float("-inf")
    print("delta (blocks x heads):\n" + table(delta))
    assert delta[PLANTED_BLOCK, PLANTED_HEAD] >= 0.9
    assert others.max() < HDS_THRESHOLD

    with torch.inference_mode():
        unplanted = comfyui_env.tiny_flux("dev", hidden=HIDDEN, heads=HEADS)
    _, collect, build = nodes_of(pack)
    statistics, _ = run_node(collect, unplanted, planted.clip, planted.prompts, "1.0", SIZE, SIZE, 0, 256)
    plain, _ = run_node(build, statistics, RANK, LRS_THRESHOLD, -1.0)  # -1: keep all heads, see every delta
    print("delta without the planted head:\n" + table(plain.delta))
    assert plain.delta[PLANTED_BLOCK, PLANTED_HEAD] < 0.3
    assert plain.delta.max() < 0.7


def test_statistics_memory_does_not_grow_with_prompts(pack):
    """QKStatistics.nbytes() is the same after 10 and after 200 unsafe prompts (Gram matrices + full reservoirs),
    while the number of vectors seen grows about 20-fold (subjects have 1 to 4 tokens)."""
    prompt_set_node, collect, _ = nodes_of(pack)
    with torch.inference_mode():
        clip = comfyui_env.tiny_flux_clip()
        model = comfyui_env.tiny_flux("dev")
    clip.set_tokenizer_option("t5xxl_min_length", 32)  # pad T5 to 32 tokens, not 256: 4x faster, same statistics
    sizes, counts = {}, {}
    for n in (10, 200):
        prompts, _ = run_node(prompt_set_node, "nudity", "", "", "", "", n, 10, 0)
        assert len(prompts.unsafe) == n
        stats, report = run_node(collect, model, clip, prompts, "1.0", 64, 64, 0, 16)
        sizes[n], counts[n] = stats.nbytes(), sum(v for k, v in stats.count.items() if k.startswith("unsafe/"))
        assert all(r.shape[0] == 16 for r in stats.reservoir.values())  # every reservoir full already at n = 10
        print(f"\n{n} unsafe prompts: {counts[n]} unsafe vectors, statistics {sizes[n]} bytes")
    assert sizes[10] == sizes[200]
    assert counts[200] >= 10 * counts[10]


def test_merge_of_halves_equals_one_collection_and_save_load_round_trip(pack, folders):
    """Merge Statistics of two halves (different seeds) equals one collection over all prompts (Gram matrices and
    counts), and Save / Load Statistics round-trip it through the saferope_statistics folder.

    The model has one double block and no single block: its text q/k come before any attention, so they do not
    depend on the noise, and the halves' vectors are exactly the full run's."""
    n = pack.nodes
    prompt_set_node, collect, _ = nodes_of(pack)
    core = pack.saferope_core
    with torch.inference_mode():
        clip = comfyui_env.tiny_flux_clip()
        model = comfyui_env.tiny_flux("dev", depth=1, depth_single=0)
    prompts, _ = run_node(prompt_set_node, "violence", "", "", "", "", 12, 8, 0)
    halves = [
        core.PromptSet(prompts.concept, prompts.unsafe[:5], prompts.safe[:3]),
        core.PromptSet(prompts.concept, prompts.unsafe[5:], prompts.safe[3:]),
    ]
    full, _ = run_node(collect, model, clip, prompts, "1.0, 0.5", 64, 64, 0, 64)
    a, _ = run_node(collect, model, clip, halves[0], "1.0, 0.5", 64, 64, 1, 64)
    b, _ = run_node(collect, model, clip, halves[1], "1.0, 0.5", 64, 64, 2, 64)
    (merged,) = run_node(n.MergeStatistics.execute, a, b)
    assert merged.count == full.count and set(merged.gram) == set(full.gram)
    for key in full.gram:
        torch.testing.assert_close(merged.gram[key], full.gram[key], rtol=1e-5, atol=1e-4)
        assert merged.count[key] == a.count.get(key, 0) + b.count.get(key, 0)
    assert merged.concepts == ["violence"]

    saved = run_node(n.SaveStatistics.execute, merged, "violence_stats", False)
    path = saved["result"][0]
    assert path.startswith(str(folders["saferope_statistics"]))
    assert "violence_stats.safetensors" in comfyui_env.node_input(n.LoadStatistics, "name").options
    (loaded,) = run_node(n.LoadStatistics.execute, "violence_stats.safetensors")
    assert loaded.shape == merged.shape and loaded.count == merged.count and loaded.concepts == merged.concepts
    for key in merged.gram:
        assert torch.equal(loaded.gram[key], merged.gram[key])
        assert torch.equal(loaded.reservoir[key], merged.reservoir[key])


# ---------------------------------------------------------------------------------------------------------------
# Training


def mean_deviation(pack, base_model, rotated_model, clip, texts, seed: int = 123) -> float:
    """Mean relative deviation ||v_base - v_rot||^2 / ||v_base||^2 over texts, at sigma 1.0 and 0.7."""
    calls = pack.saferope_comfy.model_calls
    g = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        for text in texts:
            prompt = calls.encode_prompt(clip, text)
            for sigma in (1.0, 0.7):
                noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=g)
                values.append(
                    float(
                        pack.saferope_core.deviation(
                            lambda x, s, p: calls.velocity(base_model, x, s, p),
                            lambda x, s, p: calls.velocity(rotated_model, x, s, p),
                            prompt,
                            noise,
                            torch.tensor([sigma]),
                        )
                    )
                )
    return sum(values) / len(values)


def train_node(
    pack, planted, steps, run_name, preserve_weight=1.0, checkpointing=True, resume=True, checkpoint_every=100
):
    return run_node(
        pack.nodes.TrainRiskRotations.execute,
        planted.model,
        planted.clip,
        planted.subspaces,
        planted.prompts,
        steps,
        LEARNING_RATE,
        1.0,
        preserve_weight,
        0,
        SIZE,
        SIZE,
        run_name,
        checkpoint_every,
        resume,
        checkpointing,
        objective=OBJECTIVE,
    )


def trainer(pack, planted, steps, checkpointing=False):
    """saferope_comfy.training.RotationTrainer with the recipe Train Risk Rotations builds from the same inputs."""
    training = pack.saferope_comfy.training
    recipe = pack.saferope_core.TrainingRecipe(steps=steps, learning_rate=LEARNING_RATE, seed=0, objective=OBJECTIVE)
    data = training.TrainingData(planted.prompts, (16, SIZE // 8, SIZE // 8))
    return training.RotationTrainer(planted.model, planted.clip, planted.subspaces, data, recipe, checkpointing)


def weights(rotations) -> list[torch.Tensor]:
    blocks = [rotations.blocks[name] for name in sorted(rotations.blocks)]
    return [w for b in blocks for w in (b.w_txt, b.w_img)]


@pytest.fixture(scope="module")
def trained(pack, planted, folders):
    """Train Risk Rotations, 40 steps (runs of 10 unsafe / 10 safe), checkpoint folder in a temp dir."""
    probe = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(9))
    encoded = pack.saferope_comfy.model_calls.encode_prompt(planted.clip, planted.held.unsafe[0].text)
    with torch.inference_mode():
        before = comfyui_env.run_model(planted.model, probe, 0.8, encoded.context, encoded.pooled)
    options = repr(planted.model.model_options)
    result, log = train_node(pack, planted, TRAIN_STEPS, "main")
    with torch.inference_mode():
        after = comfyui_env.run_model(planted.model, probe, 0.8, encoded.context, encoded.pooled)
    return {"pack": result, "log": log, "before": before, "after": after, "options": options}


def test_training_unlearns_unsafe_and_preserves_safe(pack, planted, trained):
    """On held-out prompts: the unsafe deviation rises 100-fold from the initial rotations and the safe deviation
    stays below a third of it (and below 1% of the velocity's energy)."""
    training = pack.saferope_comfy.training
    recipe = pack.saferope_core.TrainingRecipe(
        steps=TRAIN_STEPS, learning_rate=LEARNING_RATE, seed=0, objective=OBJECTIVE
    )
    initial = training.finished_pack(
        planted.subspaces, training.trainable_pack(planted.subspaces, recipe, "cpu")[0], recipe
    )
    apply = pack.nodes.ApplyRiskRotation.execute
    unsafe = [p.text for p in planted.held.unsafe]
    result = {}
    for name, rotations in (("initial", initial), ("trained", trained["pack"])):
        (rotated,) = run_node(apply, planted.model, rotations, 1.0, "both")
        result[name] = (
            mean_deviation(pack, planted.model, rotated, planted.clip, unsafe),
            mean_deviation(pack, planted.model, rotated, planted.clip, planted.held.safe),
        )
    print(
        f"\n{trained['log']}\nheld-out mean relative deviation (unsafe, safe): initial {result['initial'][0]:.3g}, "
        f"{result['initial'][1]:.3g}; trained {result['trained'][0]:.3g}, {result['trained'][1]:.3g}"
    )
    unsafe_initial, _ = result["initial"]
    unsafe_trained, safe_trained = result["trained"]
    assert unsafe_trained >= 100 * unsafe_initial
    assert safe_trained <= unsafe_trained / 3
    assert safe_trained < 1e-2
    assert f"{TRAIN_STEPS} steps" in trained["log"]


def test_training_log_reports_both_deviations(trained):
    """The log of a 40-step run says how the unsafe and the safe deviation moved (first -> last fifth of the steps),
    as finite numbers; the unsafe one rose (the paper's objective pushes it up)."""
    moved = re.search(r"on unsafe prompts (\S+) -> (\S+), on safe prompts (\S+) -> (\S+);", trained["log"])
    assert moved, trained["log"]
    unsafe_first, unsafe_last, safe_first, safe_last = (float(v) for v in moved.groups())
    assert all(math.isfinite(v) and v >= 0 for v in (unsafe_first, unsafe_last, safe_first, safe_last)), moved[0]
    assert unsafe_last > unsafe_first, moved[0]


def test_training_leaves_the_input_model_unchanged(planted, trained):
    """The model given to Train Risk Rotations samples bit-identically afterwards; its options are untouched."""
    assert torch.equal(trained["before"], trained["after"])
    assert repr(planted.model.model_options) == trained["options"]
    assert "saferope" not in repr(planted.model.wrappers)


def test_saved_pack_loads_validates_and_patches(pack, planted, trained, folders):
    """Save SafeRoPE Pack writes models/saferope/<name>.safetensors; Load SafeRoPE Pack lists and loads it (full
    validation by load_pack); Apply Risk Rotation with it changes the output on an unsafe prompt."""
    n = pack.nodes
    saved = run_node(n.SaveSafeRoPEPack.execute, trained["pack"], "planted_concept", False)
    path = saved["result"][0]
    assert path == str(folders["saferope"] / "planted_concept.safetensors")
    loaded = pack.saferope_core.load_pack(path)
    assert loaded.recipe["steps"] == TRAIN_STEPS
    recipe = pack.saferope_core.TrainingRecipe(
        steps=TRAIN_STEPS, learning_rate=LEARNING_RATE, seed=0, objective=OBJECTIVE
    )
    start = pack.saferope_comfy.training.trainable_pack(planted.subspaces, recipe, "cpu")[0]
    moved = [not torch.equal(w, w0.detach()) for w, w0 in zip(weights(loaded), weights(start), strict=True)]
    assert all(moved), f"rotation parameters unchanged by training (text, image per block): {moved}"
    assert loaded.heads_rotated() == 1 and loaded.rank == RANK
    for mine, theirs in zip(weights(trained["pack"]), weights(loaded), strict=True):
        assert torch.equal(mine, theirs)

    assert "planted_concept.safetensors" in comfyui_env.node_input(n.LoadSafeRoPEPack, "pack_name").options
    result = run_node(n.LoadSafeRoPEPack.execute, "planted_concept.safetensors")
    node_pack, info = result["result"]
    assert "rank 2" in info and "1 heads" in info
    (rotated,) = run_node(n.ApplyRiskRotation.execute, planted.model, node_pack, 1.0, "both")
    encoded = pack.saferope_comfy.model_calls.encode_prompt(planted.clip, planted.held.unsafe[0].text)
    latent = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        base = comfyui_env.run_model(planted.model, latent, 0.9, encoded.context, encoded.pooled)
        patched = comfyui_env.run_model(rotated, latent, 0.9, encoded.context, encoded.pooled)
    change = ((patched - base).square().sum() / base.square().sum()).item()
    print(f"\nrelative change of the denoised output on an unsafe prompt: {change:.3g}")
    assert change > 1e-4


def test_resume_after_interruption_matches_uninterrupted(pack, planted, folders):
    """An interrupted run resumed from its checkpoint ends with the parameters of an uninterrupted run, both when
    the run is cancelled (should_stop raising) and when the node is run again with more steps."""
    steps = 8
    reference = weights(trainer(pack, planted, steps).train())

    class Cancelled(Exception):
        pass

    calls = []

    def cancel_at_step_6():
        calls.append(1)
        if len(calls) > 5:  # before step 6: steps 1-5 done, last checkpoint at step 4
            raise Cancelled

    checkpoint = str(folders["saferope_training"] / "interrupted.safetensors")
    with pytest.raises(Cancelled):
        trainer(pack, planted, steps).train(checkpoint, True, 2, should_stop=cancel_at_step_6)
    resumed_steps = []
    resumed = trainer(pack, planted, steps).train(checkpoint, True, 2, on_step=lambda s, *a: resumed_steps.append(s))
    assert resumed_steps == list(range(5, steps + 1))
    for a, b in zip(weights(resumed), reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    train_node(pack, planted, 3, "two_sessions")
    continued, log = train_node(pack, planted, steps, "two_sessions")
    assert log.startswith(f"{steps} steps (resumed after step 3)")
    for a, b in zip(weights(continued), reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_training_keeps_ordinary_weights_frozen(pack, small):
    """A model built outside inference mode (a library caller, another custom node) is trained against frozen:
    no parameter of it gets a gradient."""
    model = comfyui_env.tiny_flux("dev")  # same shape as small["model"], ordinary tensors
    training = pack.saferope_comfy.training
    recipe = pack.saferope_core.TrainingRecipe(steps=2, seed=0)
    data = training.TrainingData(small["prompts"], (16, 4, 4))
    training.RotationTrainer(model, small["clip"], small["subspaces"], data, recipe).train()
    with_grad = [name for name, p in model.model.named_parameters() if p.grad is not None]
    assert with_grad == [], f"{len(with_grad)} parameters of the input model got a .grad, e.g. {with_grad[:3]}"


def test_training_frees_replaced_inference_weights(pack, small):
    """A model loaded the ComfyUI way (inference-mode weights) is trained with one copy of its weights: each
    original is freed once make_autograd_safe has replaced it."""
    with torch.inference_mode():
        model = comfyui_env.tiny_flux("dev")  # same shape as small["model"]
    originals = [weakref.ref(p) for p in model.model.parameters()]
    training = pack.saferope_comfy.training
    recipe = pack.saferope_core.TrainingRecipe(steps=2, seed=0)
    data = training.TrainingData(small["prompts"], (16, 4, 4))
    alive = []

    def count_alive(*_):
        gc.collect()
        alive.append(sum(ref() is not None for ref in originals))

    training.RotationTrainer(model, small["clip"], small["subspaces"], data, recipe).train(on_step=count_alive)
    assert alive == [0, 0], f"original weights alive during training, per step: {alive} of {len(originals)}"


def test_gradient_checkpointing_gives_the_same_parameters(pack, planted):
    """Training with and without gradient checkpointing ends with bit-identical rotation parameters."""
    plain = weights(trainer(pack, planted, 6, checkpointing=False).train())
    checkpointed = weights(trainer(pack, planted, 6, checkpointing=True).train())
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.equal(a, b)
    assert any(bool(w.abs().sum() > 0) for w in plain)


class RetainedMemory(TorchDispatchMode):
    """Records the storages that the operations run under it allocate (not views of, or in-place writes to, their
    inputs); `alive_bytes()`: how many bytes of them are still held (after a forward: by its autograd graph)."""

    def __init__(self):
        super().__init__()
        self.allocated = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage()._cdata for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                storage = t.untyped_storage()
                self.allocated[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive_bytes(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.allocated.values() if not ref.expired())


class StopTraining(Exception):
    pass


def first_training_step(pack, small, checkpointing: bool) -> dict:
    """The first step of a Train Risk Rotations run on the small model (then cancelled): how many blocks ran through
    torch.utils.checkpoint, and the bytes each differentiable forward (the rotated model's) left held for backward."""
    training = pack.saferope_comfy.training
    found = {"checkpointed": 0, "held": []}
    real_checkpoint, real_velocity = torch.utils.checkpoint.checkpoint, training.velocity

    def counted_checkpoint(*args, **kwargs):
        found["checkpointed"] += 1
        return real_checkpoint(*args, **kwargs)

    def measured_velocity(*args, **kwargs):
        if not torch.is_grad_enabled():
            return real_velocity(*args, **kwargs)
        memory = RetainedMemory()
        with memory:
            v = real_velocity(*args, **kwargs)
        if v.requires_grad:  # the rotated model's call; the frozen base model's builds no graph
            found["held"].append(memory.alive_bytes())
        return v

    steps_begun = []

    def stop_after_the_first_step():
        steps_begun.append(1)
        if len(steps_begun) > 1:
            raise StopTraining

    clip = small["clip"].clone()
    clip.set_tokenizer_option("t5xxl_min_length", 32)  # 32 text tokens, not 256: a faster step
    recipe = pack.saferope_core.TrainingRecipe(steps=2, seed=0, objective=OBJECTIVE)
    data = training.TrainingData(small["prompts"], (16, 4, 4))
    trainer = training.RotationTrainer(small["model"], clip, small["subspaces"], data, recipe, checkpointing)
    with pytest.MonkeyPatch.context() as patched, pytest.raises(StopTraining):
        patched.setattr(torch.utils.checkpoint, "checkpoint", counted_checkpoint)
        patched.setattr(training, "velocity", measured_velocity)
        trainer.train(should_stop=stop_after_the_first_step)
    return found


@pytest.fixture(scope="module")
def first_steps(pack, small) -> dict:
    """first_training_step without and with gradient checkpointing."""
    return {checkpointing: first_training_step(pack, small, checkpointing) for checkpointing in (False, True)}


def test_gradient_checkpointing_runs_only_when_asked(pack, small, first_steps):
    """With gradient checkpointing on, every block of the rotated model's differentiable forward runs through
    torch.utils.checkpoint; off, none does (that both give the same parameters is checked above)."""
    blocks = len(pack.saferope_comfy.flux_adapter.model_shape(small["model"]).block_names())
    plain, checkpointed = first_steps[False], first_steps[True]
    assert plain["checkpointed"] == 0 and len(plain["held"]) == 1
    assert len(checkpointed["held"]) == 1 and checkpointed["checkpointed"] == blocks


def test_gradient_checkpointing_holds_less_memory_for_backward(first_steps):
    """What checkpointing is for: a checkpointed block keeps only its inputs for backward, so the rotated model's
    forward leaves far fewer bytes held than without it."""
    plain, checkpointed = first_steps[False]["held"][0], first_steps[True]["held"][0]
    print(f"\nbytes held for backward after the rotated forward: plain {plain}, checkpointed {checkpointed}")
    assert checkpointed < plain / 4


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every node says which input is wrong


@pytest.fixture(scope="module")
def small(pack):
    """A tiny FLUX (2+2 blocks, 4 heads of 16), a tiny CLIP, a small prompt set, its statistics and subspaces."""
    prompt_set_node, collect, build = nodes_of(pack)
    with torch.inference_mode():
        clip = comfyui_env.tiny_flux_clip()
        model = comfyui_env.tiny_flux("dev")
        other_model = comfyui_env.tiny_flux("dev", depth=1, depth_single=1)
    prompts, _ = run_node(prompt_set_node, "pikachu", "", "", "", "", 6, 4, 0)
    stats, _ = run_node(collect, model, clip, prompts, "1.0", 64, 64, 0, 16)
    other_stats, _ = run_node(collect, other_model, clip, prompts, "1.0", 64, 64, 0, 16)
    subspaces, _ = run_node(build, stats, 2, 0.7, -1.0)
    other_subspaces, _ = run_node(build, other_stats, 2, 0.7, -1.0)
    return {
        "clip": clip,
        "model": model,
        "other_model": other_model,
        "prompts": prompts,
        "stats": stats,
        "other_stats": other_stats,
        "subspaces": subspaces,
        "other_subspaces": other_subspaces,
    }


def expect_input_error(pack, input_name, method, *args):
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as err:
        run_node(method, *args)
    assert err.value.input_name == input_name
    assert f"input '{input_name}'" in str(err.value)
    return str(err.value)


def test_prompt_set_rejects_unusable_lists(pack):
    """Empty subject list (custom concept) -> 'subjects'; templates without {subject} -> 'templates'."""
    build = pack.nodes.SafeRoPEPromptSet.execute
    expect_input_error(pack, "subjects", build, "custom", "", "", "a photo of {subject}", "a cat", 10, 10, 0)
    expect_input_error(
        pack, "subjects", build, "custom", "# only a comment\n  \n", "", "a photo of {subject}", "a cat", 10, 10, 0
    )
    message = expect_input_error(
        pack, "templates", build, "custom", "a dragon", "", "a photo of a dragon\n{modifier}", "a cat", 10, 10, 0
    )
    assert "{subject}" in message


@pytest.mark.parametrize("sigmas", ["abc", "", "0", "1.5", "0.5, nan", "1.0 0.5"])
def test_collect_rejects_bad_sigmas(pack, small, sigmas):
    """A sigmas string that is not a comma-separated list of numbers in (0, 1] -> 'sigmas'."""
    expect_input_error(
        pack,
        "sigmas",
        pack.nodes.CollectQK.execute,
        small["model"],
        small["clip"],
        small["prompts"],
        sigmas,
        64,
        64,
        0,
        16,
    )


def test_collect_rejects_prompts_without_their_subject(pack, small):
    """Unsafe prompts whose subject is not in their tokens -> 'prompts', with the prompts listed."""
    core = pack.saferope_core
    prompts = core.PromptSet("x", [core.UnsafePrompt("a photo of a cat", "dog")], ["a tree"])
    message = expect_input_error(
        pack, "prompts", pack.nodes.CollectQK.execute, small["model"], small["clip"], prompts, "1.0", 64, 64, 0, 16
    )
    assert "'dog'" in message


def test_build_subspaces_rejects_impossible_ranks(pack, small):
    """Rank above head_dim -> 'rank'; rank above the number of collected unsafe vectors -> 'rank'."""
    build = pack.nodes.BuildSubspaces.execute
    message = expect_input_error(pack, "rank", build, small["stats"], 17, 0.7, 0.5)
    assert "16" in message
    prompts, _ = run_node(
        pack.nodes.SafeRoPEPromptSet.execute, "custom", "naked", "", "a photo of {subject}", "a tree", 1, 1, 0
    )
    stats, _ = run_node(pack.nodes.CollectQK.execute, small["model"], small["clip"], prompts, "1.0", 64, 64, 0, 16)
    assert stats.count["unsafe/double.0.txt.q"] == 1  # 'naked' is one T5 token, one sigma
    message = expect_input_error(pack, "rank", build, stats, 2, 0.7, 0.5)
    assert "fewer than rank 2" in message


def test_merge_rejects_statistics_of_another_model(pack, small):
    """Merging statistics of two model shapes -> 'b', naming the dimension."""
    message = expect_input_error(pack, "b", pack.nodes.MergeStatistics.execute, small["stats"], small["other_stats"])
    assert "double_blocks" in message


def test_train_rejects_bad_input(pack, small, folders):
    """Subspaces of another model -> 'subspaces'; steps=0 -> 'steps'; safe images without a VAE -> 'vae';
    resuming a run_name whose checkpoint belongs to other subspaces -> 'run_name'."""
    train = pack.nodes.TrainRiskRotations.execute
    m, c, p = small["model"], small["clip"], small["prompts"]
    common = (0.01, 1.0, 1.0, 0, 64, 64)
    message = expect_input_error(
        pack, "subspaces", train, m, c, small["other_subspaces"], p, 3, *common, "bad", 10, True, False
    )
    assert "double_blocks" in message
    expect_input_error(pack, "steps", train, m, c, small["subspaces"], p, 0, *common, "bad", 10, True, False)
    images = torch.zeros(1, 64, 64, 3)
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as err:
        run_node(train, m, c, small["subspaces"], p, 1, *common, "bad", 10, True, False, None, images, "a tree")
    assert err.value.input_name == "vae"

    run_node(train, m, c, small["subspaces"], p, 1, *common, "shared_name", 10, True, False)
    other, _ = run_node(pack.nodes.BuildSubspaces.execute, small["stats"], 3, 0.7, -1.0)
    message = expect_input_error(pack, "run_name", train, m, c, other, p, 2, *common, "shared_name", 10, True, False)
    assert "different subspaces" in message


def test_save_refuses_to_overwrite(pack, small, folders):
    """Save SafeRoPE Pack / Save Statistics with an existing name and overwrite off -> 'name'; on -> replaced."""
    n = pack.nodes
    run_node(n.SaveSafeRoPEPack.execute, small["subspaces"], "taken", False)
    expect_input_error(pack, "name", n.SaveSafeRoPEPack.execute, small["subspaces"], "taken", False)
    expect_input_error(pack, "name", n.SaveSafeRoPEPack.execute, small["subspaces"], "taken.safetensors", False)
    replaced = run_node(n.SaveSafeRoPEPack.execute, small["subspaces"], "taken", True)["result"][0]
    assert replaced.endswith("taken.safetensors")
    run_node(n.SaveStatistics.execute, small["stats"], "taken", False)
    expect_input_error(pack, "name", n.SaveStatistics.execute, small["stats"], "taken", False)
    expect_input_error(pack, "name", n.SaveStatistics.execute, small["stats"], "  ", False)


def test_load_statistics_rejects_a_damaged_file(pack, folders):
    """A file in saferope_statistics that is not SafeRoPE statistics -> 'name', with the reason."""
    (folders["saferope_statistics"] / "broken.safetensors").write_bytes(b"not a safetensors file")
    message = expect_input_error(pack, "name", pack.nodes.LoadStatistics.execute, "broken.safetensors")
    assert "broken.safetensors" in message
