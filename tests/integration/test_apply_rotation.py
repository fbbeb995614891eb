"""Load SafeRoPE Pack and Apply Risk Rotation against a real ComfyUI, in process, on tiny FLUX models (CPU).

The q/k checks are independent of the adapter's own token split: `QKRecorder` is a recorder of the test that
reaches q/k the way ComfyUI offers (an attn1_patch of its own on ComfyUI >= 0.33, else forward hooks on the QKNorm
modules) and records them whole. A recorder added before Apply sees the q/k entering the rotation, one added after
Apply sees what reaches attention, in the same model call; the expected values come from
`saferope_core.rotate_tokens` applied by hand, with the text/image split taken from the call's context length.
"""

import pytest
import torch

from bench import comfyui_env

RANK = 3
HEADS = {"double.0": [1, 0, 1, 0], "double.1": [0, 1, 1, 0], "single.1": [1, 1, 0, 1]}  # single.0: not in pack
PROMPT, NEGATIVE = "a red fox in the snow", "blurry photo"


@pytest.fixture(scope="module", autouse=True)
def _comfy(comfy):
    return comfy


@pytest.fixture(scope="module")
def base():
    """One tiny FLUX.1-dev (2 double + 2 single blocks, 4 heads x 16), shared: no test may change it."""
    return comfyui_env.tiny_flux("dev", seed=0)


# --------------------------------------------------------------------------------------------------------------
# Helpers


def make_pack(pack, shape, seed=0, heads=None, scale=2.0, zero=False, concept="planted", rank=RANK):
    """A seeded pack: random orthonormal bases [H, D, r], the given head masks, random W (or W = 0)."""
    core = pack.saferope_core
    g = torch.Generator().manual_seed(seed)
    h, d = shape.heads, shape.head_dim

    def bases():
        return torch.linalg.qr(torch.randn(h, d, rank, generator=g))[0].contiguous()

    def w():
        return torch.zeros(h, rank, rank) if zero else scale * torch.randn(h, rank, rank, generator=g)

    blocks = {
        name: core.BlockRotation(bases(), bases(), torch.tensor(mask, dtype=torch.bool), w(), w())
        for name, mask in (heads or HEADS).items()
    }
    return core.SafeRoPEPack(shape, [concept], rank, blocks, name=f"{concept}.safetensors")


def planted(pack, patcher, **kw):
    return make_pack(pack, pack.saferope_comfy.flux_adapter.model_shape(patcher), **kw)


def apply(pack, model, rotation_pack, strength=1.0, apply_to="both"):
    return pack.nodes.rotation_nodes.ApplyRiskRotation.execute(model, rotation_pack, strength, apply_to)[0]


class QKRecorder:
    """Records, per model call, every block's q/k as they leave the editors added before it: {(block, stream): (q,
    k)} with stream 'txt'/'img' (double blocks) or 'joint' (single blocks). A DIFFUSION_MODEL wrapper starts each
    call's record; q/k come from an attn1_patch where FLUX's blocks run one (ComfyUI >= 0.33: patches run in the
    order they were added), else from QKNorm hooks (hooks of outer wrappers run first)."""

    def __init__(self, mechanism: str):
        self.mechanism, self.calls = mechanism, []

    def __deepcopy__(self, memo):
        return self

    def patch(self, q, k, v, pe=None, attn_mask=None, extra_options=None, **kwargs):
        block = f"{extra_options['block_type']}.{extra_options['block_index']}"
        record = self.calls[-1]["qk"]
        if extra_options["block_type"] == "single":
            record[block, "joint"] = (q.clone(), k.clone())
        else:
            n = extra_options["img_slice"][0]
            record[block, "txt"] = (q[:, :, :n].clone(), k[:, :, :n].clone())
            record[block, "img"] = (q[:, :, n:].clone(), k[:, :, n:].clone())
        return {}

    def __call__(self, executor, x, timestep, context, *args, **kwargs):
        model, record = executor.class_obj, {}
        self.calls.append({"txt": context.shape[1], "qk": record})
        if self.mechanism == "attn1_patch":
            return executor(x, timestep, context, *args, **kwargs)
        sites = [(b.txt_attn.norm, f"double.{i}", "txt") for i, b in enumerate(model.double_blocks)]
        sites += [(b.img_attn.norm, f"double.{i}", "img") for i, b in enumerate(model.double_blocks)]
        sites += [(b.norm, f"single.{i}", "joint") for i, b in enumerate(model.single_blocks)]

        def hook(key):
            return lambda _m, _a, out: record.__setitem__(key, (out[0].clone(), out[1].clone()))

        handles = [m.register_forward_hook(hook((block, stream))) for m, block, stream in sites]
        try:
            return executor(x, timestep, context, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def with_wrapper(patcher, key, wrapper):
    import comfy.patcher_extension

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, wrapper)
    if getattr(wrapper, "mechanism", None) == "attn1_patch":
        clone.set_model_attn1_patch(wrapper.patch)
    return clone


def recorder(pack) -> QKRecorder:
    return QKRecorder(pack.saferope_comfy.flux_adapter.qk_mechanism())


def instrumented(pack, base, *applies):
    """base -> recorder 'pre' -> Apply Risk Rotation for each (pack, strength, apply_to) -> recorder 'post'."""
    pre, post = recorder(pack), recorder(pack)
    model = with_wrapper(base, "test-pre", pre)
    for rotation_pack, strength, apply_to in applies:
        model = apply(pack, model, rotation_pack, strength, apply_to)
    return with_wrapper(model, "test-post", post), pre, post


TOKENS = {"both": ("txt", "img"), "text": ("txt",), "image": ("img",)}


def rotate_by_hand(pack, x, block, qk, stream, applies):
    """The core library's rotation of x [B, H, L, D] for each applied (pack, strength, apply_to), in order;
    also returns the heads some pack rotated."""
    touched = torch.zeros(x.shape[1], dtype=torch.bool)
    for rotation_pack, strength, apply_to in applies:
        rot = rotation_pack.blocks.get(block)
        if rot is None or stream not in TOKENS[apply_to] or strength == 0:
            continue
        idx = rot.head_index()
        basis = (rot.basis_q if qk == "q" else rot.basis_k)[idx]
        w = (rot.w_txt if stream == "txt" else rot.w_img)[idx]
        x = x.clone()
        x[:, idx] = pack.saferope_core.rotate_tokens(x[:, idx], basis, w, strength)
        touched[idx] = True
    return x, touched


def check_rotations(pack, pre, post, applies):
    """post == hand rotation of pre at every QKNorm of every call; heads no pack selects are bit-identical;
    returns {(block, stream): True if rotated heads changed} for the pieces with rotated heads."""
    assert len(pre.calls) == len(post.calls) > 0
    changed = {}
    for before, after in zip(pre.calls, post.calls, strict=True):
        assert before["qk"].keys() == after["qk"].keys() and before["qk"]
        n = before["txt"]
        for (block, stream), pair in before["qk"].items():
            for i, qk in enumerate("qk"):
                x, y = pair[i], after["qk"][block, stream][i]
                assert y.shape == x.shape and y.dtype == x.dtype
                pieces = (
                    [("txt", slice(0, n)), ("img", slice(n, None))] if stream == "joint" else [(stream, slice(None))]
                )
                for part, sl in pieces:
                    src, got = x[:, :, sl], y[:, :, sl]
                    want, touched = rotate_by_hand(pack, src, block, qk, part, applies)
                    torch.testing.assert_close(got, want, msg=lambda m, b=block, p=part, q=qk: f"{b} {p} {q}: {m}")
                    assert torch.equal(got[:, ~touched], src[:, ~touched]), f"{block} {part} {qk}: untouched head"
                    if touched.any():
                        moved = not torch.equal(got[:, touched], src[:, touched])
                        changed[block, part] = changed.get((block, part), True) and moved
    return changed


def inputs(batch=1, h=8, w=6, text=PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    context, pooled = comfyui_env.encode_text(text)
    return torch.randn(batch, 16, h, w, generator=g), context.expand(batch, -1, -1), pooled.expand(batch, -1)


def run(patcher, latent, context, pooled, sigma=0.7, **kw):
    with torch.no_grad():
        return comfyui_env.run_model(patcher, latent, sigma, context, pooled, **kw)


class LayoutObserver:
    """A q/k editor that changes nothing and records the token layout the adapter computed for each call."""

    def __init__(self):
        self.layouts = []

    def edit_qk(self, call, block, tokens, q, k):
        if not self.layouts or self.layouts[-1] is not call.layout:
            self.layouts.append(call.layout)
        return q, k


# --------------------------------------------------------------------------------------------------------------
# 1. Nothing to rotate -> bit-identical


def test_zero_pack_and_zero_strength_change_nothing(pack, base):
    """W = 0, and a planted pack at strength 0, give exactly the base output, in one call and through KSampler."""
    zero = planted(pack, base, zero=True)
    strong = planted(pack, base)
    models = [apply(pack, base, zero), apply(pack, base, strong, strength=0.0)]
    latent, context, pooled = inputs(h=9, w=7)
    reference = run(base, latent, context, pooled)
    sampled = comfyui_env.sample(base, PROMPT, NEGATIVE, steps=2, cfg=2.0, seed=5)
    for model in models:
        assert (run(model, latent, context, pooled) - reference).abs().max().item() == 0.0
        assert torch.equal(comfyui_env.sample(model, PROMPT, NEGATIVE, steps=2, cfg=2.0, seed=5), sampled)
    assert not torch.equal(run(apply(pack, base, strong), latent, context, pooled), reference)  # it could differ


# --------------------------------------------------------------------------------------------------------------
# 2. What reaches attention is the core library's rotation


@pytest.mark.parametrize("apply_to", ["both", "text", "image"])
def test_rotation_reaches_attention(pack, base, apply_to):
    """Selected heads of listed blocks are rotated by rotate_tokens with the text/image W, double blocks per
    stream, single blocks split at the text length; every other head, block and token type is untouched; the
    model output changes."""
    rotation_pack = planted(pack, base)
    applies = [(rotation_pack, 1.0, apply_to)]
    model, pre, post = instrumented(pack, base, *applies)
    latent, context, pooled = inputs()
    out = run(model, latent, context, pooled)
    changed = check_rotations(pack, pre, post, applies)
    unpatched = recorder(pack)
    base_out = run(with_wrapper(base, "test-base", unpatched), latent, context, pooled)
    for stream in ("txt", "img"):  # the first block's q/k before the rotation are the base model's own
        assert torch.equal(pre.calls[0]["qk"]["double.0", stream][0], unpatched.calls[0]["qk"]["double.0", stream][0])
    parts = TOKENS[apply_to]
    assert set(changed) == {(b, p) for b in HEADS for p in parts} and all(changed.values())
    assert pre.calls[0]["txt"] == len(PROMPT.split())
    assert post.calls[0]["qk"]["single.1", "joint"][0].shape[2] == len(PROMPT.split()) + 12
    assert (out - base_out).abs().max() > 1e-4


def test_rotation_strength_scales_the_angle(pack, base):
    """strength s rotates by exp(s * LRS * A): half strength is rotate_tokens at 0.5, not the full rotation."""
    applies = [(planted(pack, base), 0.5, "both")]
    model, pre, post = instrumented(pack, base, *applies)
    run(model, *inputs())
    assert all(check_rotations(pack, pre, post, applies).values())


# --------------------------------------------------------------------------------------------------------------
# 3. The input model is never modified


def test_input_model_is_not_modified(pack):
    """Sampling the base after sampling the patched clone is bit-identical to sampling it first; the base's
    wrappers and model_options are unchanged by Apply; no hook stays on the shared modules."""
    base = comfyui_env.tiny_flux("dev", seed=2)
    options, wrappers = repr(base.model_options), repr(base.wrappers)
    first = comfyui_env.sample(base, PROMPT, NEGATIVE, steps=2, cfg=2.0, seed=1)
    patched = apply(pack, base, planted(pack, base))
    assert repr(base.model_options) == options and repr(base.wrappers) == wrappers
    assert patched.wrappers != base.wrappers and patched.model is base.model  # a clone, sharing the weights
    rotated = comfyui_env.sample(patched, PROMPT, NEGATIVE, steps=2, cfg=2.0, seed=1)
    again = comfyui_env.sample(base, PROMPT, NEGATIVE, steps=2, cfg=2.0, seed=1)
    assert not torch.equal(rotated, first)
    assert torch.equal(again, first)
    assert repr(base.model_options) == options and repr(base.wrappers) == wrappers
    model = base.model.diffusion_model
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_are_removed_when_a_call_fails(pack, base):
    """An error inside the model call (here ComfyUI's cancel exception, raised mid-model) leaves no hook on the
    shared model, and the base runs as before."""
    import comfy.model_management

    class Failing:
        def edit_qk(self, call, block, tokens, q, k):
            if block == "single.0":
                raise comfy.model_management.InterruptProcessingException()
            return q, k

    failing = pack.saferope_comfy.flux_adapter.with_qk_editor(base, comfyui_env.editor(Failing)())
    model = apply(pack, failing, planted(pack, base))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(model, *inputs())
    assert not any(m._forward_hooks for m in base.model.diffusion_model.modules())
    latent, context, pooled = inputs()
    assert torch.equal(run(base, latent, context, pooled), run(base, latent, context, pooled))


# --------------------------------------------------------------------------------------------------------------
# 4. Layouts: Kontext references, batch + CFG, odd sizes, half precision


@pytest.mark.parametrize("method", ["offset", "index", "uxo"])
@pytest.mark.parametrize("n_refs", [1, 2])
def test_kontext_reference_tokens_are_image_tokens(pack, method, n_refs):
    """The layout counts every reference image's tokens (odd sizes rounded up to the patch) and the image
    rotation covers them, in the image stream of double blocks and after the text in single blocks."""
    kontext = comfyui_env.tiny_flux("kontext", seed=1)
    rotation_pack = planted(pack, kontext, seed=3)
    applies = [(rotation_pack, 1.0, "both")]
    observer = comfyui_env.editor(LayoutObserver)()
    model, pre, post = instrumented(pack, kontext, *applies)
    model = pack.saferope_comfy.flux_adapter.with_qk_editor(model, observer)
    g = torch.Generator().manual_seed(7)
    refs = [torch.randn(1, 16, 6, 10, generator=g), torch.randn(1, 16, 5, 3, generator=g)][:n_refs]
    latent, context, pooled = inputs(batch=2)
    out = run(model, latent, context, pooled, ref_latents=refs, ref_latents_method=method)
    ref_tokens = (15, 6)[:n_refs]  # 3x5, and 3x2 for the 5x3 latent (padded to 6x4)
    layout = observer.layouts[0]
    assert layout.refs == ref_tokens and layout.ref_hw == ((3, 5), (3, 2))[:n_refs]
    assert (layout.batch, layout.txt, layout.img, layout.img_hw) == (2, len(PROMPT.split()), 12, (4, 3))
    assert layout.total == layout.txt + 12 + sum(ref_tokens)
    assert pre.calls[0]["qk"]["double.0", "img"][0].shape[2] == 12 + sum(ref_tokens)
    assert all(check_rotations(pack, pre, post, applies).values())
    for block, stream, start in (("double.0", "img", 12), ("single.1", "joint", layout.txt + 12)):
        ref_q = post.calls[0]["qk"][block, stream][0][:, :, start:]
        assert ref_q.shape[2] == sum(ref_tokens)
        assert not torch.equal(ref_q, pre.calls[0]["qk"][block, stream][0][:, :, start:])  # references rotated
    plain = run(kontext, latent, context, pooled, ref_latents=refs, ref_latents_method=method)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4


def test_kontext_sampling_with_reference(pack):
    """End to end: a Kontext reference through conditioning (uxo) and KSampler; rotation checked per call."""
    kontext = comfyui_env.tiny_flux("kontext", seed=1)
    applies = [(planted(pack, kontext, seed=4), 1.0, "image")]
    model, pre, post = instrumented(pack, kontext, *applies)
    ref = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    cond = comfyui_env.conditioning(PROMPT, reference_latents=[ref], reference_latents_method="uxo")
    out = comfyui_env.sample(model, cond, steps=2, seed=2)
    assert len(pre.calls) == 2 and pre.calls[0]["qk"]["double.0", "img"][0].shape[2] == 16 + 9
    assert all(check_rotations(pack, pre, post, applies).values())
    assert torch.isfinite(out).all() and not torch.equal(out, comfyui_env.sample(kontext, cond, steps=2, seed=2))


@pytest.mark.parametrize("negative, calls", [("blurry photo of it", [(4, 4)] * 2), (NEGATIVE, [(2, 4), (2, 2)] * 2)])
def test_batch_with_cfg(pack, base, negative, calls):
    """A batch of 2 latents, CFG > 1 and a negative prompt: with a negative as long as the positive, cond and
    uncond run as one batch of 4; with a shorter one, as separate calls with their own text length. Every call's
    q/k are rotated per token type."""
    applies = [(planted(pack, base, seed=5), 1.0, "both")]
    model, pre, post = instrumented(pack, base, *applies)
    latent, positive = torch.zeros(2, 16, 8, 8), "a red fox running"
    out = comfyui_env.sample(model, positive, negative, steps=2, cfg=3.0, seed=4, latent=latent)
    assert [(c["qk"]["double.0", "txt"][0].shape[0], c["txt"]) for c in pre.calls] == calls  # (batch, text)
    assert all(check_rotations(pack, pre, post, applies).values())
    plain = comfyui_env.sample(base, positive, negative, steps=2, cfg=3.0, seed=4, latent=latent)
    assert out.shape == (2, 16, 8, 8) and torch.isfinite(out).all() and not torch.equal(out, plain)


def test_odd_resolution(pack, base):
    """A 9x13 latent (not divisible by the patch size): 5x7 image tokens, split and rotated correctly."""
    applies = [(planted(pack, base, seed=6), 1.0, "both")]
    observer = comfyui_env.editor(LayoutObserver)()
    model, pre, post = instrumented(pack, base, *applies)
    model = pack.saferope_comfy.flux_adapter.with_qk_editor(model, observer)
    latent, context, pooled = inputs(h=9, w=13)
    out = run(model, latent, context, pooled)
    assert observer.layouts[0].img_hw == (5, 7) and observer.layouts[0].img == 35
    assert pre.calls[0]["qk"]["single.0", "joint"][0].shape[2] == len(PROMPT.split()) + 35
    assert all(check_rotations(pack, pre, post, applies).values())
    assert out.shape == latent.shape and torch.isfinite(out).all()
    sampled = comfyui_env.sample(apply(pack, base, applies[0][0]), PROMPT, width=72, height=104, steps=2)
    assert sampled.shape == (1, 16, 13, 9) and torch.isfinite(sampled).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(pack, dtype):
    """fp16 / bf16 models: q/k keep the model's dtype through the rotation (computed in fp32), match
    rotate_tokens, and the output is finite and changed."""
    model16 = comfyui_env.tiny_flux("dev", seed=0, dtype=dtype)
    applies = [(planted(pack, model16, seed=7), 1.0, "both")]
    model, pre, post = instrumented(pack, model16, *applies)
    latent, context, pooled = inputs()
    out = run(model, latent, context, pooled)
    assert pre.calls[0]["qk"]["double.0", "txt"][0].dtype == dtype
    assert all(check_rotations(pack, pre, post, applies).values())
    assert torch.isfinite(out).all() and (out - run(model16, latent, context, pooled)).abs().max() > 1e-3
    sampled = comfyui_env.sample(apply(pack, model16, applies[0][0]), PROMPT, NEGATIVE, steps=2, cfg=2.0)
    assert torch.isfinite(sampled).all()


# --------------------------------------------------------------------------------------------------------------
# 5. Stacking


def test_two_apply_nodes_stack_in_order(pack, base):
    """Apply(A) -> Apply(B): q/k equal B's rotation of A's rotation; the reverse order gives other q/k."""
    a = planted(pack, base, seed=10, concept="a")
    b = planted(pack, base, seed=11, concept="b", heads={"double.1": [1, 1, 0, 0], "single.1": [1, 0, 0, 1]})
    applies = [(a, 1.0, "both"), (b, 0.8, "both")]
    model, pre, post = instrumented(pack, base, *applies)
    latent, context, pooled = inputs()
    out = run(model, latent, context, pooled)
    assert all(check_rotations(pack, pre, post, applies).values())
    x = pre.calls[0]["qk"]["double.1", "img"][0]
    reverse = rotate_by_hand(pack, x, "double.1", "q", "img", applies[::-1])[0]
    assert not torch.allclose(post.calls[0]["qk"]["double.1", "img"][0], reverse, atol=1e-4)  # order matters
    only_a = run(apply(pack, base, a), latent, context, pooled)
    assert (out - only_a).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------------------
# 6. ComfyUI's own pre-attention patch and the QK-norm hooks


def test_attn1_patch_and_hooks_give_the_same_velocity(pack, base):
    """Where FLUX's blocks run attn1_patch (ComfyUI >= 0.33) Apply Risk Rotation uses it, registers no hook, and
    gives the same velocity as the QK-norm hooks, for one pack and for two stacked (in order), on text and image
    tokens; where they do not (older ComfyUI), the hooks are used and the patch is refused."""
    import comfyui_version

    adapter = pack.saferope_comfy.flux_adapter
    newer = tuple(int(x) for x in comfyui_version.__version__.split(".")[:2]) >= (0, 33)
    assert adapter.flux_blocks_call_attn1_patch() is newer
    assert adapter.qk_mechanism() == ("attn1_patch" if newer else "hooks")
    a = planted(pack, base, seed=12, concept="a")
    b = planted(pack, base, seed=13, concept="b", heads={"double.1": [1, 1, 0, 0], "single.0": [1, 0, 0, 1]})
    latent, context, pooled = inputs()
    base_out = run(base, latent, context, pooled)

    def through(mechanism, *packs):
        model = base
        for p in packs:
            model = adapter.with_qk_editor(
                model, pack.saferope_comfy.editors.RiskRotation(p, 1.0, ("txt", "img")), mechanism
            )
        return run(model, latent, context, pooled)

    if not newer:
        with pytest.raises(ValueError, match="attn1_patch"):
            through("attn1_patch", a)
        assert (through(None, a) - base_out).abs().max() > 1e-4
        return

    class NoHooks:
        def edit_qk(self, call, block, tokens, q, k):
            assert not any(m._forward_hooks for m in base.model.diffusion_model.modules())
            return q, k

    patched = apply(pack, base, a)
    patches = patched.model_options["transformer_options"]["patches"]["attn1_patch"]
    assert [type(p).__name__ for p in patches] == ["QKEditPatch"]
    run(adapter.with_qk_editor(patched, comfyui_env.editor(NoHooks)()), latent, context, pooled)
    for packs in ((a,), (a, b), (b, a)):
        hooked, patched_out = through("hooks", *packs), through("attn1_patch", *packs)
        torch.testing.assert_close(patched_out, hooked, rtol=1e-5, atol=1e-6)
        assert (hooked - base_out).abs().max() > 1e-4
    assert (through("attn1_patch", a, b) - through("attn1_patch", b, a)).abs().max() > 1e-5  # order is kept


def test_attention_override_takes_tensor_containers(pack):
    """ComfyUI 0.33 may hand attention its q/k/v in single-use AttentionTensorContainers. The pack's attention
    override (Restrict Unsafe Flow, Collect UVR Anchors), chained over an override of another node that has a
    container_function, gets plain tensors, and gives what the same edit gives on plain tensors."""
    import comfy.ldm.modules.attention as attention
    import comfyui_version

    if not hasattr(attention, "AttentionTensorContainer"):  # older ComfyUI: no containers to take
        assert tuple(int(x) for x in comfyui_version.__version__.split(".")[:2]) < (0, 33)
        return
    adapter = pack.saferope_comfy.flux_adapter
    seen = []

    class HalveValues:
        needs_attention = True

        def edit_attention(self, call, block, q, k, v, heads, attend):
            seen.append(("editor", type(q), type(v)))
            return attend(q, k, 0.5 * v)

    def other_override(func, q, k, v, heads, *args, **kwargs):
        seen.append(("other", type(q), type(v)))
        return func(q, k, v, heads, *args, **kwargs)

    other_override.container_function = lambda *args, **kwargs: pytest.fail("containers reached the chained one")
    layout = adapter.TokenLayout(1, 2, 3, (1, 3))
    call = adapter.ModelCall(layout, torch.ones(1))
    options = adapter._with_attention_editor(
        {"optimized_attention_override": other_override}, comfyui_env.editor(HalveValues)(), call
    )
    q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    plain = attention.optimized_attention(q, k, 0.5 * v, 2, skip_reshape=True)
    boxed = [attention.AttentionTensorContainer(t.clone()) for t in (q, k, v)]
    got = attention.optimized_attention(*boxed, 2, skip_reshape=True, transformer_options=options)
    torch.testing.assert_close(got, plain)
    assert seen == [("editor", torch.Tensor, torch.Tensor), ("other", torch.Tensor, torch.Tensor)]


# --------------------------------------------------------------------------------------------------------------
# 7. Errors a user reads


@pytest.mark.parametrize("field, value", [("heads", 8), ("double_blocks", 3), ("head_dim", 8)])
def test_pack_for_another_model_is_refused(pack, base, field, value):
    """A pack built for another shape: SafeRoPEInputError naming the node, the input 'pack' and the dimension."""
    shape = pack.saferope_comfy.flux_adapter.model_shape(base)
    other = pack.saferope_core.ModelShape(**{**shape.to_dict(), field: value})
    heads = {"double.0": [1] + [0] * (other.heads - 1)}
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as info:
        apply(pack, base, make_pack(pack, other, heads=heads))
    message = str(info.value)
    assert (info.value.node, info.value.input_name) == ("Apply Risk Rotation", "pack")
    assert "Apply Risk Rotation" in message and "'pack'" in message and f"{field}: {value} here" in message
    assert base.wrappers == {}


def test_non_flux_model_is_refused(pack, base):
    """A non-FLUX diffusion model, a Nunchaku-like transformer and a non-model each get an error naming what
    was found, on the input 'model'."""
    import comfy.model_patcher

    class PlainModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.diffusion_model = inner

    class ComfyFluxWrapper(torch.nn.Module):  # the name Nunchaku's transformer has
        pass

    def patcher(inner):
        return comfy.model_patcher.ModelPatcher(PlainModel(inner), torch.device("cpu"), torch.device("cpu"))

    cases = [
        (patcher(torch.nn.Linear(2, 2)), "the model is torch.nn.modules.linear.Linear, not a FLUX"),
        (patcher(ComfyFluxWrapper()), "Nunchaku transformer"),
        ("not a model", "expected a diffusion MODEL, got str"),
    ]
    rotation_pack = planted(pack, base)
    for model, found in cases:
        with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as info:
            apply(pack, model, rotation_pack)
        assert info.value.input_name == "model" and "Apply Risk Rotation" in str(info.value)
        assert found in str(info.value)


@pytest.fixture
def pack_folder(pack, tmp_path):
    """A temp folder registered as the 'saferope' models folder (restored afterwards)."""
    import folder_paths

    saved = folder_paths.folder_names_and_paths.get("saferope")
    folder_paths.folder_names_and_paths["saferope"] = ([str(tmp_path)], {".safetensors"})
    folder_paths.filename_list_cache.pop("saferope", None)
    yield tmp_path
    folder_paths.filename_list_cache.pop("saferope", None)
    if saved is None:
        folder_paths.folder_names_and_paths.pop("saferope", None)
    else:
        folder_paths.folder_names_and_paths["saferope"] = saved


def test_load_pack_from_the_saferope_folder(pack, base, pack_folder):
    """A saved pack is listed, loads with the same tensors, its 'ui' text names concept, rank and heads, and
    the loaded pack drives Apply exactly like the original."""
    loader = pack.nodes.rotation_nodes.LoadSafeRoPEPack
    original = planted(pack, base, concept="nudity")
    original.save(pack_folder / "nudity.safetensors")
    assert comfyui_env.node_input(loader, "pack_name").options == ["none", "nudity.safetensors"]
    answer = comfyui_env.run_node(loader.execute, "nudity.safetensors")
    loaded, info = answer["result"]
    assert answer["ui"]["text"] == [info]
    assert "nudity" in info and f"rank {RANK}" in info and f"{original.heads_rotated()} heads" in info
    assert loaded.blocks.keys() == original.blocks.keys()
    for name, rot in original.blocks.items():
        assert torch.equal(loaded.blocks[name].w_img, rot.w_img) and torch.equal(loaded.blocks[name].heads, rot.heads)
    latent, context, pooled = inputs()
    assert torch.equal(
        run(apply(pack, base, loaded), latent, context, pooled),
        run(apply(pack, base, original), latent, context, pooled),
    )


def test_load_pack_errors(pack, pack_folder):
    """No file chosen, a corrupt file, and only one of hf_repo_id / hf_filename: each names node and input."""
    loader = pack.nodes.rotation_nodes.LoadSafeRoPEPack
    (pack_folder / "corrupt.safetensors").write_bytes(b"\x07garbage, not a safetensors header" * 3)
    cases = [
        ({"pack_name": "none"}, "pack_name", "no pack chosen"),
        ({"pack_name": "corrupt.safetensors"}, "pack_name", "corrupt.safetensors is not a readable safetensors"),
        ({"pack_name": "none", "hf_repo_id": "user/packs"}, "hf_filename", "needs both a repo id and a file name"),
        ({"pack_name": "none", "hf_filename": "a.safetensors"}, "hf_repo_id", "needs both a repo id and a file name"),
    ]
    for kwargs, input_name, problem in cases:
        with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as info:
            loader.execute(**kwargs)
        assert info.value.input_name == input_name, kwargs
        assert str(info.value).startswith(f"Load SafeRoPE Pack, input '{input_name}'") and problem in str(info.value)
