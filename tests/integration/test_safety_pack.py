"""Save / Load / Apply Safety Pack on ComfyUI's own FLUX classes: every guard of a concept in one file, applied by one
node exactly as the separate nodes apply them, with one strength and a switch per guard."""

import pytest
import torch

from bench import comfyui_env
from bench.comfyui_env import run_node


@pytest.fixture(scope="module")
def parts(comfy, pack):
    """A tiny model, its text encoder, a Prompt Set, planted rotations, UVR anchors flagging every patch, and a
    redirector whose detector flags every sample."""
    n, core = pack.nodes, pack.saferope_core
    with torch.inference_mode():
        model, clip = comfyui_env.tiny_flux("dev", seed=1), comfyui_env.tiny_clip("dev")
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "nude\nnaked", "", "a photo of a {subject} woman", "a red car", 2, 1, 0
    )
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    g = torch.Generator().manual_seed(0)

    def bases():
        return torch.linalg.qr(torch.randn(shape.heads, shape.head_dim, 2, generator=g))[0].contiguous()

    heads = torch.ones(shape.heads, dtype=torch.bool)
    rotation = core.SafeRoPEPack(
        shape,
        ["nude"],
        2,
        {
            b: core.BlockRotation(
                bases(),
                bases(),
                heads,
                torch.randn(shape.heads, 2, 2, generator=g),
                torch.randn(shape.heads, 2, 2, generator=g),
            )
            for b in shape.block_names()
        },
    )
    direction = torch.nn.functional.normalize(torch.randn(shape.heads, 1, shape.head_dim, generator=g), dim=-1)
    anchors = core.uvr.UVRAnchors(shape, "single.0", direction, -1e4 * direction[:, 0], -0.5, 0.85, ["nude"])
    config = pack.saferope_comfy.prompt_redirect.redirector_config(model)
    torch.manual_seed(0)
    redirector = core.redirector.PromptRedirector(
        core.redirector.RedirectorConfig(**{**config.__dict__, "hidden": 32, "rank": 4})
    )
    with torch.no_grad():
        redirector.classify[-1].weight.zero_()
        redirector.classify[-1].bias.fill_(10.0)  # every sample flagged
    return {
        "model": model,
        "clip": clip,
        "prompts": prompts,
        "pack": rotation,
        "anchors": anchors,
        "redirector": redirector,
    }


def velocity(pack, model, clip, sigma=0.95):
    calls = pack.saferope_comfy.model_calls
    x = torch.randn((1, *calls.latent_shape(model, 64, 64)), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        return calls.velocity(model, x, torch.tensor([sigma]), calls.encode_prompt(clip, "a photo of a nude woman"))


def saved_and_loaded(module, parts, name, **guards):
    """Save Safety Pack with `guards`, then Load Safety Pack's answer ({"ui", "result"})."""
    n = module.nodes
    run_node(n.SaveSafetyPack.execute, parts["prompts"], name, True, **guards)
    return run_node(n.LoadSafetyPack.execute, f"{name}.safetensors")


def saved_with_check(module, parts, name, **guards):
    """Save Safety Pack with `guards`, the guard check run on the tiny model at 64 x 64: its answer."""
    run = module.nodes.SaveSafetyPack.execute
    return run_node(
        run, parts["prompts"], name, True, **guards, model=parts["model"], clip=parts["clip"], width=64, height=64
    )


def test_one_node_applies_every_guard_as_the_separate_nodes_do(pack, parts, folders):
    """Redirect -> rotate -> restrict, each at the strength given: the same velocity as the three separate nodes
    chained with their defaults; each switch leaves its guard out; strength 0 is the input model."""
    n = pack.nodes
    model, clip = parts["model"], parts["clip"]
    answer = saved_and_loaded(
        pack, parts, "all", pack=parts["pack"], anchors=parts["anchors"], redirector=parts["redirector"]
    )
    safety, info = answer["result"]
    assert safety.guards() == ["rotation", "uvr", "redirector"] and answer["ui"]["text"] == [info]
    assert "named wordings: naked, nude" in info
    apply = n.ApplySafetyPack.execute
    redirected = run_node(n.RedirectUnsafePrompts.execute, model, parts["redirector"], 0.5, 0.0, 3)[0]
    rotated = run_node(n.ApplyRiskRotation.execute, redirected, parts["pack"], 0.5, "both")[0]
    chained = run_node(n.RestrictUnsafeFlow.execute, rotated, parts["anchors"], 0.5, -1.0, 0.85, -1)[0]
    (one,) = run_node(apply, model, safety, 0.5, True, True, True)
    torch.testing.assert_close(velocity(pack, one, clip), velocity(pack, chained, clip), rtol=0, atol=0)
    base = velocity(pack, model, clip)
    alone = {
        "redirect": run_node(n.RedirectUnsafePrompts.execute, model, parts["redirector"], 1.0, 0.0, 3)[0],
        "rotate": run_node(n.ApplyRiskRotation.execute, model, parts["pack"], 1.0, "both")[0],
        "restrict": run_node(n.RestrictUnsafeFlow.execute, model, parts["anchors"], 1.0, -1.0, 0.85, -1)[0],
    }
    for guard, expected in alone.items():
        switches = [g == guard for g in ("redirect", "rotate", "restrict")]
        (only,) = run_node(apply, model, safety, 1.0, *switches)
        v = velocity(pack, only, clip)
        assert torch.equal(v, velocity(pack, expected, clip)) and not torch.equal(v, base), guard
    assert run_node(apply, model, safety, 0.0, True, True, True)[0] is model
    assert torch.equal(velocity(pack, model, clip), base)  # the input model is left as it was


def test_a_pack_with_some_guards_applies_those(pack, parts, folders):
    (safety, _) = saved_and_loaded(pack, parts, "uvr_only", anchors=parts["anchors"])["result"]
    assert safety.guards() == ["uvr"]
    (patched,) = run_node(pack.nodes.ApplySafetyPack.execute, parts["model"], safety, 1.0, True, True, True)
    restricted = run_node(pack.nodes.RestrictUnsafeFlow.execute, parts["model"], parts["anchors"], 1.0, -1.0, 0.85, -1)
    assert torch.equal(velocity(pack, patched, parts["clip"]), velocity(pack, restricted[0], parts["clip"]))


def test_errors_name_the_node_and_the_input(pack, parts, folders):
    """No guard connected, guards of another model, a pack applied to another model, no file chosen."""
    n = pack.nodes
    errors = pack.nodes.errors.SafeRoPEInputError
    with pytest.raises(errors, match="Save Safety Pack, input 'pack': no guard is connected"):
        run_node(n.SaveSafetyPack.execute, parts["prompts"], "x", True)
    with torch.inference_mode():
        other = comfyui_env.tiny_flux("dev", depth=1, depth_single=1)
    (safety, _) = saved_and_loaded(pack, parts, "rot", pack=parts["pack"])["result"]
    with pytest.raises(errors, match="Apply Safety Pack, input 'safety_pack': .*double_blocks: 2 here, 1 in the model"):
        run_node(n.ApplySafetyPack.execute, other, safety, 1.0, True, True, True)
    small_anchors = pack.saferope_core.uvr.UVRAnchors(
        pack.saferope_comfy.flux_adapter.model_shape(other),
        "single.0",
        parts["anchors"].anchors,
        parts["anchors"].safe_mean,
        0.1,
        0.85,
        [],
    )
    with pytest.raises(errors, match="Save Safety Pack, input 'pack': .*UVR anchors were built for another model"):
        run_node(n.SaveSafetyPack.execute, parts["prompts"], "x", True, pack=parts["pack"], anchors=small_anchors)
    with pytest.raises(errors, match="Load Safety Pack, input 'name': no safety pack chosen"):
        run_node(n.LoadSafetyPack.execute, "none")


def identity_rotation(pack, rotation):
    """The same heads and bases with zero rotation generators: the rotations change nothing."""
    core = pack.saferope_core
    blocks = {
        name: core.BlockRotation(b.basis_q, b.basis_k, b.heads, torch.zeros_like(b.w_txt), torch.zeros_like(b.w_img))
        for name, b in rotation.blocks.items()
    }
    return core.SafeRoPEPack(rotation.shape, rotation.concepts, rotation.rank, blocks)


def test_the_guard_check_samples_every_combination_and_records_its_choice(pack, parts, folders):
    """Save Safety Pack with the model and text encoder scores every combination of the guards on the Prompt Set's
    prompts; the file records the figures and the combination they choose, and Load Safety Pack shows it."""
    core = pack.saferope_core
    guards = {"pack": parts["pack"], "anchors": parts["anchors"], "redirector": parts["redirector"]}
    saved = saved_with_check(pack, parts, "checked", **guards)
    assert "guard check (2 unsafe prompts, 1 safe prompts)" in saved["ui"]["text"][0]
    safety, info = run_node(pack.nodes.LoadSafetyPack.execute, "checked.safetensors")["result"]
    check = safety.guard_check
    assert check["unsafe_prompts"] == 2 and check["safe_prompts"] == 1
    combinations = [tuple(s["guards"]) for s in check["scores"]]
    assert combinations == core.guard_check.guard_combinations(["rotation", "uvr", "redirector"])
    assert all(s["harm"] > 0 for s in check["scores"] if "uvr" in s["guards"])  # UVR here flags every patch
    figures = {tuple(s["guards"]): (s["erased"], s["harm"]) for s in check["scores"]}
    assert figures[("redirector",)] != figures[("rotation", "uvr", "redirector")]  # each sampled with its own guards
    scores = [core.guard_check.CombinationScore(tuple(s["guards"]), s["erased"], s["harm"]) for s in check["scores"]]
    chosen = core.guard_check.GuardCheck(scores, 2, 1).chosen()
    assert safety.applied_guards() == list(chosen) == check["applies"]
    assert f"applies: {' + '.join(core.guard_check.GUARD_NAMES[g] for g in chosen)}" in info


def test_apply_applies_the_guards_the_check_chose(pack, parts, folders):
    """A pack whose check chose the redirector and UVR: Apply Safety Pack applies those two (each switch still
    turns its guard off) and never the rotations it carries, unless its guards input says every guard."""
    n, core = pack.nodes, pack.saferope_core
    guards = {"rotation": parts["pack"], "anchors": parts["anchors"], "redirector": parts["redirector"]}
    shape = parts["pack"].shape
    checked = core.safety_pack.SafetyPack(shape, "nude", **guards, applies=["uvr", "redirector"])
    checked.save(folders["saferope"] / "chose_two.safetensors")
    (safety, _) = run_node(n.LoadSafetyPack.execute, "chose_two.safetensors")["result"]
    unchecked = saved_and_loaded(
        pack, parts, "unchecked", pack=parts["pack"], anchors=parts["anchors"], redirector=parts["redirector"]
    )["result"][0]
    apply, model, clip = n.ApplySafetyPack.execute, parts["model"], parts["clip"]
    for switches, expected in [
        ((True, True, True), (True, False, True)),
        ((False, True, True), (False, False, True)),
        ((True, True, False), (True, False, False)),
    ]:
        (applied,) = run_node(apply, model, safety, 1.0, *switches)
        (reference,) = run_node(apply, model, unchecked, 1.0, *expected)
        assert torch.equal(velocity(pack, applied, clip), velocity(pack, reference, clip)), switches
    (everything,) = run_node(apply, model, unchecked, 1.0, True, True, True)
    (applied,) = run_node(apply, model, safety, 1.0, True, True, True)
    assert not torch.equal(velocity(pack, applied, clip), velocity(pack, everything, clip))
    # guards "every guard": all the pack carries, the check's choice aside; the switches still turn each one off
    for switches in ((True, True, True), (True, False, True), (False, True, False)):
        (applied,) = run_node(apply, model, safety, 1.0, *switches, "every guard")
        (reference,) = run_node(apply, model, unchecked, 1.0, *switches)
        assert torch.equal(velocity(pack, applied, clip), velocity(pack, reference, clip)), switches
    unknown = "Apply Safety Pack, input 'guards': 'all' is not one of its choices"
    with pytest.raises(n.errors.SafeRoPEInputError, match=unknown):
        run_node(apply, model, safety, 1.0, True, True, True, "all")


def test_guards_that_change_nothing_score_nothing(pack, parts, folders):
    """Identity rotations and a redirector that flags nothing give bit-identical samples: erased 0 and harm 0 for
    every combination; with nothing to go by, the check keeps every guard."""
    silent = type(parts["redirector"])(parts["redirector"].config)
    silent.load_state_dict(parts["redirector"].state_dict())
    with torch.no_grad():
        silent.classify[-1].bias.fill_(-10.0)  # no sample flagged
    guards = {"pack": identity_rotation(pack, parts["pack"]), "redirector": silent}
    saved = saved_with_check(pack, parts, "silent", **guards)
    assert "no combination erased more than it changed" in saved["ui"]["text"][0]
    safety = run_node(pack.nodes.LoadSafetyPack.execute, "silent.safetensors")["result"][0]
    assert [(s["erased"], s["harm"]) for s in safety.guard_check["scores"]] == [(0.0, 0.0)] * 3
    assert safety.applied_guards() == ["rotation", "redirector"]


def test_a_pack_with_one_guard_has_nothing_to_check(pack, parts, folders):
    """One guard: no combination to choose, so no sampling; the pack applies its guard as one saved without it."""
    saved = saved_with_check(pack, parts, "one_guard", pack=parts["pack"])
    assert saved["ui"]["text"][0].startswith("guard check: one guard, nothing to choose (not run)\nsaved ")
    safety = run_node(pack.nodes.LoadSafetyPack.execute, "one_guard.safetensors")["result"][0]
    assert safety.applies is None and safety.guard_check == {} and safety.applied_guards() == ["rotation"]


def test_the_guard_check_needs_the_model_and_its_text_encoder(pack, parts, folders):
    n, errors = pack.nodes, pack.nodes.errors.SafeRoPEInputError
    needs_clip = "Save Safety Pack, input 'clip': the guard check needs both.*Connect clip too, or disconnect model"
    with pytest.raises(errors, match=needs_clip):
        run_node(n.SaveSafetyPack.execute, parts["prompts"], "x", True, pack=parts["pack"], model=parts["model"])
    with torch.inference_mode():
        other = comfyui_env.tiny_flux("dev", depth=1, depth_single=1)
    with pytest.raises(errors, match="Save Safety Pack, input 'model': .*does not fit this model"):
        run_node(
            n.SaveSafetyPack.execute, parts["prompts"], "x", True, pack=parts["pack"], model=other, clip=parts["clip"]
        )
