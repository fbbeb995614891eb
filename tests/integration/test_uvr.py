"""Restrict Unsafe Flow (UVR) on ComfyUI's tiny FLUX: detection finds planted patches, identity where it must not act,
Kontext references with every reference method, and batch/CFG independence."""

import pytest
import torch

from bench import comfyui_env

SIGMA_START = 0.85


@pytest.fixture(scope="module")
def uvr(pack):
    return pack.nodes.uvr_nodes


@pytest.fixture(scope="module")
def model(comfy):
    return comfyui_env.tiny_flux("kontext", seed=3)


def text(words="a red fox in the snow", batch=1):
    context, pooled = comfyui_env.encode_text(words)
    return context.expand(batch, -1, -1), pooled.expand(batch, -1)


def latent(seed, batch=1, size=16):
    return torch.randn(batch, 16, size, size, generator=torch.Generator().manual_seed(seed))


def plant(x, chosen, seed=99):
    """x with a fixed, strong latent pattern written into the `chosen` patches [8, 8]: the 'unsafe concept'."""
    pattern = 3 * torch.randn(16, 2, 2, generator=torch.Generator().manual_seed(seed))
    cells = chosen.repeat_interleave(2, 0).repeat_interleave(2, 1)
    tiled = pattern.repeat(1, x.shape[-2] // 2, x.shape[-1] // 2)
    return torch.where(cells, tiled, x)


def detection_outputs(pack, uvr, model, x, sigma, refs=None):
    """Per-head attention outputs [B, img, H, D] of image tokens at single block 0, captured by the pack's collector."""
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    stats = pack.saferope_core.QKStatistics(shape, reservoir_size=100000)
    collector = pack.saferope_comfy.editors.AttentionOutputCollector(stats, "single.0")
    collector.group = "unsafe"
    observed = pack.saferope_comfy.flux_adapter.with_qk_editor(model, collector)
    comfyui_env.run_model(observed, x, sigma, *text(batch=x.shape[0]), ref_latents=refs)
    vectors = stats.reservoir["unsafe/single.0.img.o"]
    return vectors.reshape(x.shape[0], -1, shape.heads, shape.head_dim)


def planted_anchors(pack, model, outputs, chosen):
    """Anchors pointing at the outputs of the `chosen` patches of sample 0, threshold between chosen and the rest."""
    core = pack.saferope_core.uvr
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    sample = outputs[0]
    rest = torch.ones(sample.shape[0], dtype=torch.bool)
    rest[chosen] = False
    safe_mean = sample[rest].mean(0)
    direction = torch.nn.functional.normalize((sample[chosen] - safe_mean).mean(0), dim=-1)  # [H, D]
    anchors = direction.unsqueeze(1)
    scores = core.patch_scores(sample, anchors, safe_mean)
    assert scores[chosen].min() > scores[rest].max(), "the tiny model's patches are not separable"
    threshold = float(scores[chosen].min() + scores[rest].max()) / 2
    return core.UVRAnchors(shape, "single.0", anchors, safe_mean, threshold, SIGMA_START, ["planted"])


def region(hw, rows, cols):
    grid = torch.zeros(hw, dtype=torch.bool)
    grid[rows, cols] = True
    return grid


def watched(editor) -> list[dict]:
    """The detections `editor` makes from now on (scores, core and ring masks), newest last."""
    seen = []
    editor.on_detect = seen.append
    return seen


def test_mask_finds_planted_patches(pack, uvr, model):
    """Anchors planted on a 2x2 region of the image are found there, and nowhere else."""
    chosen = region((8, 8), slice(2, 4), slice(4, 6))
    x = plant(latent(0), chosen)
    outputs = detection_outputs(pack, uvr, model, x, 0.95)
    anchors = planted_anchors(pack, model, outputs, chosen.flatten())
    editor = pack.saferope_comfy.editors.UnsafeFlowRestriction(anchors, 1.0, anchors.threshold, SIGMA_START)
    seen = watched(editor)
    patched = pack.saferope_comfy.flux_adapter.with_qk_editor(model, editor)
    comfyui_env.run_model(patched, x, 0.95, *text())
    core, ring = seen[-1]["core"][0], seen[-1]["ring"][0]
    assert torch.equal(core, chosen)
    assert ring.sum() > 0 and not (ring & core).any()
    assert (ring <= torch.nn.functional.max_pool2d(chosen[None, None].float(), 3, 1, 1)[0, 0].bool()).all()


def test_identity_outside_startup_and_for_safe_inputs(pack, uvr, model):
    """After the start-up steps, or when no patch scores above the threshold, the output is bit-identical."""
    chosen = region((8, 8), slice(0, 2), slice(0, 2))
    x = plant(latent(1), chosen)
    anchors = planted_anchors(pack, model, detection_outputs(pack, uvr, model, x, 0.95), chosen.flatten())
    restricted = uvr.RestrictUnsafeFlow.execute(model, anchors, 1.0, -1.0, SIGMA_START, -1)[0]
    never = uvr.RestrictUnsafeFlow.execute(model, anchors, 1.0, 1.0, SIGMA_START, -1)[0]  # cosine never > 1
    for sigma in (0.84, 0.5, 0.1):
        assert torch.equal(
            comfyui_env.run_model(model, x, sigma, *text()), comfyui_env.run_model(restricted, x, sigma, *text())
        )
    assert torch.equal(comfyui_env.run_model(model, x, 0.95, *text()), comfyui_env.run_model(never, x, 0.95, *text()))
    assert not torch.equal(
        comfyui_env.run_model(model, x, 0.95, *text()), comfyui_env.run_model(restricted, x, 0.95, *text())
    )


def test_text_to_image_suppresses_flagged_tokens_only(pack, uvr, model):
    """In T2I the flagged patches' output changes far more than the others' (flow into them is cut)."""
    chosen = region((8, 8), slice(4, 7), slice(1, 4))
    x = plant(latent(2), chosen)
    anchors = planted_anchors(pack, model, detection_outputs(pack, uvr, model, x, 0.95), chosen.flatten())
    restricted = uvr.RestrictUnsafeFlow.execute(model, anchors, 1.0, -1.0, SIGMA_START, -1)[0]
    diff = comfyui_env.run_model(model, x, 0.95, *text()) - comfyui_env.run_model(restricted, x, 0.95, *text())
    per_patch = diff.abs().reshape(16, 8, 2, 8, 2).mean((0, 2, 4))  # latent 16x16 -> 8x8 patches of 2x2
    assert per_patch[chosen].mean() > 5 * per_patch[~chosen].mean()


class RecordedRestriction:
    """Restrict Unsafe Flow's editor, recording (sigma, block) wherever it restricts flow."""

    @staticmethod
    def make(editors, anchors, threshold):
        class Recorded(editors.UnsafeFlowRestriction):
            def __init__(self):
                super().__init__(anchors, 1.0, threshold, SIGMA_START)
                self.restricted = []

            def _suppress(self, call, out, core, block):
                self.restricted.append((round(float(call.sigma.max()), 3), call.block))
                return super()._suppress(call, out, core, block)

            def _reference_bias(self, call, core, ring, q):
                self.restricted.append((round(float(call.sigma.max()), 3), call.block))
                return super()._reference_bias(call, core, ring, q)

        return Recorded()


def test_mask_carries_to_the_next_startup_step_of_the_same_run_only(pack, uvr, model):
    """In a sampling run, a start-up step's mask restricts the blocks before the detection block at the next
    start-up step; a second run starts without it; model calls outside a sampling run carry nothing; and after a
    run the editor holds no tensor (its per-run state is dropped)."""
    chosen = region((8, 8), slice(2, 5), slice(3, 6))
    x = plant(latent(6), chosen)
    anchors = planted_anchors(pack, model, detection_outputs(pack, uvr, model, x, 0.95), chosen.flatten())
    editor = RecordedRestriction.make(pack.saferope_comfy.editors, anchors, -1.0)  # everything flagged (cosine >= -1)
    patched = pack.saferope_comfy.flux_adapter.with_qk_editor(model, editor)
    blocks = pack.saferope_comfy.flux_adapter.model_shape(model).block_names()
    after = blocks[blocks.index(anchors.block) + 1 :]
    every = [b for b in blocks if b != anchors.block]
    runs = []
    for sigmas in ([0.95, 0.9, 0.5, 0.0], [0.95, 0.9, 0.5, 0.0], [0.88, 0.5, 0.0]):
        editor.restricted = []
        comfyui_env.sample(patched, "a red fox", width=128, height=128, sigmas=sigmas)
        runs.append(editor.restricted)
    expected = [(0.95, b) for b in after] + [(0.9, b) for b in every]  # nothing at 0.5: not a start-up step
    assert runs[0] == expected and runs[1] == expected
    # a run that starts below where the run before detected last (denoise < 1) must not find that mask
    assert runs[2] == [(0.88, b) for b in after]
    assert not [v for v in vars(editor).values() if torch.is_tensor(v)]

    editor.restricted = []
    with torch.inference_mode():
        comfyui_env.run_model(patched, x, 0.95, *text())
        comfyui_env.run_model(patched, x, 0.9, *text())  # outside a sampling run: no mask carried in
    assert editor.restricted == [(0.95, b) for b in after] + [(0.9, b) for b in after]


@pytest.mark.parametrize("method", ["offset", "index", "uxo"])
@pytest.mark.parametrize("n_refs", [1, 2])
def test_kontext_restricts_reference_keys(pack, uvr, model, method, n_refs):
    """With reference images, flagged output patches lower attention to the reference tokens mapped onto them."""
    chosen = region((8, 8), slice(2, 5), slice(2, 5))
    x = plant(latent(3), chosen)
    refs = [latent(10 + i, size=16 if i == 0 else 12) for i in range(n_refs)]
    outputs = detection_outputs(pack, uvr, model, x, 0.95, refs)
    anchors = planted_anchors(pack, model, outputs, chosen.flatten())
    editor = pack.saferope_comfy.editors.UnsafeFlowRestriction(anchors, 1.0, anchors.threshold, SIGMA_START)
    seen = watched(editor)
    patched = pack.saferope_comfy.flux_adapter.with_qk_editor(model, editor)
    out = comfyui_env.run_model(patched, x, 0.95, *text(), ref_latents=refs, ref_latents_method=method)
    base = comfyui_env.run_model(model, x, 0.95, *text(), ref_latents=refs, ref_latents_method=method)
    assert torch.equal(seen[-1]["core"][0], chosen)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    # in a sampling run, the next start-up step's carried mask restricts every block, the double blocks included
    recorded = RecordedRestriction.make(pack.saferope_comfy.editors, anchors, -1.0)
    positive = comfyui_env.conditioning(
        "a red fox in the snow", reference_latents=refs, reference_latents_method=method
    )
    comfyui_env.sample(
        pack.saferope_comfy.flux_adapter.with_qk_editor(model, recorded),
        positive,
        width=128,
        height=128,
        sigmas=[0.95, 0.9, 0.0],
    )
    blocks = pack.saferope_comfy.flux_adapter.model_shape(model).block_names()
    assert [b for s, b in recorded.restricted if s == 0.9] == [b for b in blocks if b != anchors.block]
    late = comfyui_env.run_model(patched, x, 0.3, *text(), ref_latents=refs, ref_latents_method=method)
    assert torch.equal(late, comfyui_env.run_model(model, x, 0.3, *text(), ref_latents=refs, ref_latents_method=method))


class AttentionMassProbe:
    """An attention override to chain under the pack's (the pack calls any override already in transformer_options).
    Wherever the pack passes a mask, it runs the same attention twice more, with and without that mask, on values
    that are one-hot key groups (`key_groups()`: a group id per key, asked then), so each output is the attention mass
    every query puts on each group. `masses`: (with mask, without) [B, queries, heads, groups] per masked call."""

    def __init__(self, key_groups, groups: int):
        self.key_groups, self.groups, self.masses = key_groups, groups, []

    def __deepcopy__(self, memo):  # ModelPatcher.clone() may deep-copy model options: keep one probe
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        if kwargs.get("mask") is not None:
            b, h, keys, d = k.shape
            values = torch.zeros(b, h, keys, d, dtype=q.dtype)
            values[..., : self.groups] = torch.nn.functional.one_hot(self.key_groups(), self.groups).to(q.dtype)
            with_mask = func(q, k, values, heads, *args, **kwargs)
            without = func(q, k, values, heads, *args, **{**kwargs, "mask": None})
            self.masses.append(tuple(m.reshape(b, -1, h, d)[..., : self.groups] for m in (with_mask, without)))
        return func(q, k, v, heads, *args, **kwargs)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_kontext_scales_attention_to_flagged_reference_keys_by_the_uvr_factors(pack, uvr, model, strength):
    """With a reference image, the attention every query pays to the reference keys mapped onto flagged output
    patches falls by the UVR factors (core x(1 - 0.8 s), ring x(1 - 0.6 s)), to text and output-image keys it rises
    x(1 + 0.1 s), and to unflagged reference keys it stays x1: measured as attention mass per key group with and
    without the pack's bias, relative to the unflagged reference keys (the softmax's normalisation cancels there)."""
    chosen = region((8, 8), slice(2, 5), slice(2, 5))
    x = plant(latent(3), chosen)
    refs = [latent(10)]  # the output's size: reference token i lies on output patch i
    anchors = planted_anchors(pack, model, detection_outputs(pack, uvr, model, x, 0.95, refs), chosen.flatten())
    editor = pack.saferope_comfy.editors.UnsafeFlowRestriction(anchors, strength, anchors.threshold, SIGMA_START)
    seen = watched(editor)
    context, pooled = text()
    TEXT, OUTPUT, CORE, RING, OTHER = range(5)

    def key_groups():  # asked after this call's detection (the mask is used in the blocks after it)
        core, ring = seen[-1]["core"][0].flatten(), seen[-1]["ring"][0].flatten()
        references = torch.where(core, CORE, torch.where(ring, RING, OTHER))
        return torch.cat([torch.full((context.shape[1],), TEXT), torch.full((chosen.numel(),), OUTPUT), references])

    probe = AttentionMassProbe(key_groups, 5)
    probed = model.clone()
    probed.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
    comfyui_env.run_model(
        pack.saferope_comfy.flux_adapter.with_qk_editor(probed, editor), x, 0.95, context, pooled, ref_latents=refs
    )
    assert torch.equal(seen[-1]["core"][0], chosen) and seen[-1]["ring"][0].any()
    assert probe.masses, "the pack passed no mask to the attention"
    s = strength
    expected = torch.tensor([1 + 0.1 * s, 1 + 0.1 * s, 1 - 0.8 * s, 1 - 0.6 * s, 1.0])  # TEXT ... OTHER
    for with_mask, without in probe.masses:
        factors = with_mask / without  # per query and head: exp(the group's bias) / (the softmax's change of sum)
        torch.testing.assert_close(factors / factors[..., OTHER:], expected.expand_as(factors), rtol=1e-3, atol=0)


def test_reference_patches_follow_rope_ids(pack):
    """Reference tokens map onto output patches by their own (h, w) ids, whatever the offsets of the method."""
    core = pack.saferope_core.uvr
    h, w = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    first = torch.stack([torch.ones_like(h), h, w], -1).reshape(-1, 3)  # same size as the output, offset 0
    second = torch.stack(
        [torch.ones(2, 3, dtype=torch.long), *torch.meshgrid(torch.arange(2) + 4, torch.arange(3) + 10, indexing="ij")],
        -1,
    ).reshape(-1, 3)  # half size, placed beside the first
    mapped = core.reference_patches(torch.cat([first, second]), (4, 6), [24, 6])
    assert torch.equal(mapped[:24], torch.arange(24))
    assert mapped[24:].tolist() == [0, 2, 4, 12, 14, 16]


def test_batch_and_cfg_branches_are_independent(pack, uvr, model):
    """Masks are computed per sample: a batch [cond, uncond] gives each sample the mask it gets alone."""
    chosen = region((8, 8), slice(1, 3), slice(1, 3))
    x = torch.cat([plant(latent(4), chosen), latent(5)])
    anchors = planted_anchors(pack, model, detection_outputs(pack, uvr, model, x[:1], 0.95), chosen.flatten())
    editor = pack.saferope_comfy.editors.UnsafeFlowRestriction(anchors, 1.0, anchors.threshold, SIGMA_START)
    seen = watched(editor)
    patched = pack.saferope_comfy.flux_adapter.with_qk_editor(model, editor)
    comfyui_env.run_model(patched, x, 0.95, *text(batch=2))
    together = seen[-1]["core"].clone()
    alone = []
    for i in range(2):
        comfyui_env.run_model(patched, x[i : i + 1], 0.95, *text())
        alone.append(seen[-1]["core"][0])
    assert torch.equal(together, torch.stack(alone))
    sampled = comfyui_env.sample(
        uvr.RestrictUnsafeFlow.execute(model, anchors, 1.0, -1.0, SIGMA_START, -1)[0],
        "a red fox",
        "blurry",
        width=128,
        height=128,
        steps=3,
        cfg=2.0,
    )
    assert torch.isfinite(sampled).all()


def test_anchor_errors_and_round_trip(pack, uvr, model, tmp_path):
    """Anchors from another model or block are refused with the input named; save/load is exact."""
    errors = pack.nodes.errors
    chosen = region((8, 8), slice(0, 2), slice(0, 2))
    outputs = detection_outputs(pack, uvr, model, plant(latent(6), chosen), 0.95)
    anchors = planted_anchors(pack, model, outputs, chosen.flatten())
    with pytest.raises(errors.SafeRoPEInputError, match="detection_block"):
        uvr.RestrictUnsafeFlow.execute(model, anchors, 1.0, -1.0, SIGMA_START, 1)
    other = comfyui_env.tiny_flux("dev", heads=2)
    with pytest.raises(errors.SafeRoPEInputError, match="anchors.*heads"):
        uvr.RestrictUnsafeFlow.execute(other, anchors, 1.0, -1.0, SIGMA_START, -1)
    anchors.save(tmp_path / "a.safetensors")
    again = pack.saferope_core.uvr.UVRAnchors.load(tmp_path / "a.safetensors")
    assert torch.equal(again.anchors, anchors.anchors) and again.threshold == anchors.threshold
