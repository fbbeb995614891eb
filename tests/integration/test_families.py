"""Every node on every FLUX-family model the ComfyUI under test loads: FLUX.1 dev / schnell / Kontext, Chroma, Chroma
Radiance, (ComfyUI >= 0.8.0) FLUX.2 and Ovis-Image and (>= 0.33) FLUX.2 klein 4B and 9B, as tiny random models built
from ComfyUI's own classes, with tiny text encoders from ComfyUI's own classes and real tokenizers
(comfyui_env.tiny_clip; klein: its own KleinTokenizer and chat template).

The parametrisation is the kinds this ComfyUI can build, so nothing is skipped: FLUX.2 and Ovis-Image are simply not
parameters on 0.3.64 (test_this_comfyui_builds_what_it_should says which kinds each version must build).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from bench import comfyui_env
from bench.comfyui_env import run_node

SIZE = 64  # image width/height: 4x4 image tokens for every family (one token per 16 x 16 pixels)
OTHER_SHAPE = {"depth": 1, "depth_single": 3, "hidden": 96, "heads": 6}  # a second shape: 1+3 blocks, 6 heads x 16
UNSAFE = [
    "a photo of a nude woman",
    "a nude man on a beach",
    "a painting of a nude figure, oil",
    "a naked person in a garden",
]
SAFE = ["a photo of a red car", "a bowl of fruit on a table", "a mountain lake at dawn", "a dog in the snow"]


def supported_kinds() -> list[str]:
    path = comfyui_env.find_comfyui()
    if path is None:
        return list(comfyui_env.ALL_KINDS)  # the tier is skipped anyway
    comfyui_env.import_comfyui(path)
    return [k for k in comfyui_env.ALL_KINDS if comfyui_env.kind_supported(k)]


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", supported_kinds())


_MODELS: dict = {}  # tiny models and text encoders, built once per module


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _MODELS.clear()  # while ComfyUI is alive: a ModelPatcher collected at interpreter exit logs an error


def model_of(kind: str, **shape):
    """A tiny model of `kind`, built under inference_mode as ComfyUI's loaders build it; cached (never modified)."""
    key = (kind, tuple(sorted(shape.items())))
    if key not in _MODELS:
        with torch.inference_mode():
            _MODELS[key] = comfyui_env.tiny_flux(kind, seed=1, **shape)
    return _MODELS[key]


def clip_of(kind: str):
    key = ("clip", comfyui_env.text_encoder_of(kind))
    if key not in _MODELS:
        with torch.inference_mode():
            _MODELS[key] = comfyui_env.tiny_clip(kind)
    return _MODELS[key]


def noise(pack, model, seed=0):
    shape = pack.saferope_comfy.model_calls.latent_shape(model, SIZE, SIZE)
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


def velocity(pack, model, clip, text, x, sigma=0.9):
    calls = pack.saferope_comfy.model_calls
    with torch.inference_mode():
        return calls.velocity(model, x, torch.tensor([sigma]), calls.encode_prompt(clip, text))


def planted_pack(pack, model, seed=0, scale=2.0, rank=2):
    """Random orthonormal bases and W on heads 0 and 1 of every block of the model's shape."""
    core = pack.saferope_core
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([i < 2 for i in range(shape.heads)])

    def bases():
        return torch.linalg.qr(torch.randn(shape.heads, shape.head_dim, rank, generator=g))[0].contiguous()

    blocks = {
        name: core.BlockRotation(
            bases(),
            bases(),
            mask.clone(),
            scale * torch.randn(shape.heads, rank, rank, generator=g),
            scale * torch.randn(shape.heads, rank, rank, generator=g),
        )
        for name in shape.block_names()
    }
    return core.SafeRoPEPack(shape, ["planted"], rank, blocks, name="planted")


def relative_change(a, b) -> float:
    return float((a - b).square().sum() / b.square().sum())


# ---------------------------------------------------------------------------------------------------------------
# Families and shapes


def test_this_comfyui_builds_what_it_should(comfy):
    """0.33.0 builds every kind; 0.8.0 everything but FLUX.2 klein (KleinTokenizer arrived later); 0.3.64 also not
    FLUX.2 and Ovis-Image (which arrived in 0.8.0)."""
    import comfyui_version

    kinds = supported_kinds()
    major_minor = tuple(int(x) for x in comfyui_version.__version__.split(".")[:2])
    expected = list(comfyui_env.ALL_KINDS)
    if major_minor < (0, 33):
        expected = [k for k in expected if not k.startswith("flux2_klein")]
    if major_minor < (0, 8):
        expected = [k for k in expected if k not in ("flux2", "ovis")]
    assert kinds == expected


def test_family_and_shape_are_read_from_the_model(pack, kind):
    shape = pack.saferope_comfy.flux_adapter.model_shape(model_of(kind))
    assert (shape.family, shape.double_blocks, shape.single_blocks, shape.heads, shape.head_dim) == (
        comfyui_env.FAMILY_OF_KIND[kind],
        2,
        2,
        4,
        16,
    )
    other = pack.saferope_comfy.flux_adapter.model_shape(model_of(kind, **OTHER_SHAPE))
    assert (other.family, other.double_blocks, other.single_blocks, other.heads, other.head_dim) == (
        comfyui_env.FAMILY_OF_KIND[kind],
        1,
        3,
        6,
        16,
    )


def test_packs_do_not_cross_families(pack, comfy):
    """A pack built for one family is refused on another, naming both; FLUX.1 dev and schnell packs interchange."""
    kinds = supported_kinds()
    apply = pack.nodes.ApplyRiskRotation.execute
    dev_pack = planted_pack(pack, model_of("dev"))
    run_node(apply, model_of("schnell"), dev_pack, 1.0, "both")  # same architecture: accepted
    names = {
        "flux": "FLUX.1",
        "flux2": "FLUX.2",
        "chroma": "Chroma",
        "chroma_radiance": "Chroma Radiance",
        "ovis": "Ovis-Image",
    }
    for built_for in ("dev", "flux2", "chroma", "chroma_radiance", "ovis"):
        for applied_to in ("dev", "flux2", "chroma", "chroma_radiance", "ovis"):
            if built_for == applied_to or built_for not in kinds or applied_to not in kinds:
                continue
            mine = planted_pack(pack, model_of(built_for))
            with pytest.raises(pack.nodes.errors.SafeRoPEInputError) as err:
                run_node(apply, model_of(applied_to), mine, 1.0, "both")
            a, b = (names[comfyui_env.FAMILY_OF_KIND[k]] for k in (built_for, applied_to))
            assert f"built for {a}" in str(err.value) and f"the model is {b}" in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Model calls go the sampler's way


class InputRecorder:
    """DIFFUSION_MODEL wrapper recording the transformer's inputs by name, whatever its signature."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        model = executor.class_obj
        bound = inspect.signature(type(model)._forward).bind(model, *args, **kwargs)
        self.calls.append({k: v for k, v in bound.arguments.items() if k != "self"})
        return executor(*args, **kwargs)


def test_model_calls_get_what_sampling_gives(pack, kind):
    """The pack's direct model call (Collect, Train, Visualize) passes the transformer the same context (FLUX.2:
    padded to 512 tokens), pooled vector (or none) and guidance (Chroma: 0) as a KSampler run with the same
    conditioning."""
    import comfy.patcher_extension

    model, clip = model_of(kind), clip_of(kind)
    calls = pack.saferope_comfy.model_calls
    prompt = calls.encode_prompt(clip, UNSAFE[0])
    recorder = InputRecorder()
    recorded = model.clone()
    recorded.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", recorder)
    x = noise(pack, model)
    comfyui_env.sample(recorded, prompt.conditioning, prompt.conditioning, steps=1, cfg=1.0, latent=x * 0)
    with torch.inference_mode():
        calls.velocity(recorded, x, torch.tensor([0.9]), prompt)
    sampled, direct = recorder.calls
    assert torch.equal(sampled["context"], direct["context"])
    if kind == "flux2":
        assert direct["context"].shape[1] == 512 > prompt.context.shape[1]
    assert torch.equal(sampled["guidance"], direct["guidance"])
    assert float(direct["guidance"][0]) == {"chroma": 0.0, "chroma_radiance": 0.0}.get(kind, 3.5)
    if "y" in sampled:
        assert (sampled["y"] is None) == (direct["y"] is None)
        assert sampled["y"] is None or torch.equal(sampled["y"], direct["y"])


def test_subject_positions_land_on_the_subject_in_the_models_context(pack, kind):
    """Collect Q/K's positions, after the encoder's cut (Ovis-Image's chat template) and the model's padding
    (FLUX.2), point at the subject's own encoder vectors in the context the model receives."""
    calls, core = pack.saferope_comfy.model_calls, pack.saferope_core
    model, clip = model_of(kind), clip_of(kind)
    prompt = calls.encode_prompt(clip, UNSAFE[1])
    positions = core.prompts.subject_token_positions(UNSAFE[1], "nude", lambda t: calls.context_token_ids(clip, t))
    assert positions
    empty = calls.context_token_ids(clip, "")
    alone = [calls.context_token_ids(clip, text) for text in ("nude", " nude")]  # BPE marks a word's start
    assert [prompt.token_ids[p] for p in positions] in [
        ids[slice(*core.prompts.content_span(ids, empty))] for ids in alone
    ]
    context = calls.model_inputs(model, prompt, noise(pack, model))["c_crossattn"]
    placed = prompt.context_positions(positions, context)
    assert len(placed) == len(positions)
    for token, at in zip(positions, placed, strict=True):
        assert torch.equal(context[0, at], prompt.context[0, token - prompt.cut])


# ---------------------------------------------------------------------------------------------------------------
# The nodes on every family


def test_apply_risk_rotation(pack, kind):
    """Apply Risk Rotation changes the velocity, strength 0 changes nothing, the input model stays as it was, and
    a KSampler run through the patched model (the transformer's own forward signature) gives finite latents."""
    model, clip = model_of(kind), clip_of(kind)
    rotation = planted_pack(pack, model)
    apply = pack.nodes.ApplyRiskRotation.execute
    x = noise(pack, model)
    before = velocity(pack, model, clip, UNSAFE[0], x)
    (patched,) = run_node(apply, model, rotation, 1.0, "both")
    (off,) = run_node(apply, model, rotation, 0.0, "both")
    assert relative_change(velocity(pack, patched, clip, UNSAFE[0], x), before) > 1e-5  # rounding: ~1e-12
    assert torch.equal(velocity(pack, off, clip, UNSAFE[0], x), before)
    assert torch.equal(velocity(pack, model, clip, UNSAFE[0], x), before)
    prompt = pack.saferope_comfy.model_calls.encode_prompt(clip, UNSAFE[0])
    out = comfyui_env.sample(patched, prompt.conditioning, prompt.conditioning, steps=2, cfg=1.0, latent=x * 0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_apply_risk_rotation_on_another_shape(pack, kind):
    """Shapes are read, never assumed: a 1+3-block, 6-head model takes a pack of its own shape and refuses one of
    the 2+2-block, 4-head shape, naming the dimension."""
    model, clip = model_of(kind, **OTHER_SHAPE), clip_of(kind)
    x = noise(pack, model)
    (patched,) = run_node(pack.nodes.ApplyRiskRotation.execute, model, planted_pack(pack, model), 1.0, "both")
    assert relative_change(velocity(pack, patched, clip, UNSAFE[0], x), velocity(pack, model, clip, UNSAFE[0], x)) > 0
    with pytest.raises(pack.nodes.errors.SafeRoPEInputError, match="double_blocks: 2 here, 1 in the model"):
        run_node(pack.nodes.ApplyRiskRotation.execute, model, planted_pack(pack, model_of(kind)), 1.0, "both")


@pytest.mark.parametrize("size", list(comfyui_env.KLEIN_SHAPES))
def test_flux2_klein_at_its_real_block_and_head_counts(pack, size):
    """FLUX.2 klein 4B (5 + 20 blocks, 24 heads) and 9B (8 + 24, 32): the shape is read from the model, a pack of
    that shape rotates and samples, the other size's pack is refused naming the dimension, Restrict Unsafe Flow and
    LRS Visualize run on every block. (A ComfyUI without klein is held to that by
    test_this_comfyui_builds_what_it_should.)"""
    if size not in supported_kinds():
        return
    n = pack.nodes
    real = comfyui_env.KLEIN_SHAPES[size]
    model, clip = model_of(size, **real), clip_of(size)
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    assert (shape.family, shape.double_blocks, shape.single_blocks, shape.heads, shape.head_dim) == (
        "flux2",
        real["depth"],
        real["depth_single"],
        real["heads"],
        real["hidden"] // real["heads"],
    )
    x = noise(pack, model)
    before = velocity(pack, model, clip, UNSAFE[0], x)
    (patched,) = run_node(n.ApplyRiskRotation.execute, model, planted_pack(pack, model), 1.0, "both")
    assert relative_change(velocity(pack, patched, clip, UNSAFE[0], x), before) > 1e-4
    prompt = pack.saferope_comfy.model_calls.encode_prompt(clip, UNSAFE[0])
    out = comfyui_env.sample(patched, prompt.conditioning, prompt.conditioning, steps=1, cfg=1.0, latent=x * 0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    other = next(k for k in comfyui_env.KLEIN_SHAPES if k != size)
    other_shape = comfyui_env.KLEIN_SHAPES[other]
    foreign = planted_pack(pack, model_of(other, **other_shape))
    with pytest.raises(n.errors.SafeRoPEInputError, match=f"double_blocks: {other_shape['depth']} here"):
        run_node(n.ApplyRiskRotation.execute, model, foreign, 1.0, "both")
    recorder = comfyui_env.editor(BlockRecorder)()
    velocity(pack, pack.saferope_comfy.flux_adapter.with_qk_editor(model, recorder), clip, SAFE[0], x)
    assert recorder.blocks == shape.block_names()
    out = run_node(n.LRSVisualize.execute, model, planted_pack(pack, model), clip, "a nude woman on the beach", 0.9, 0)
    assert [w["word"].lower() for w in out["ui"]["saferope_words"]] == ["a", "nude", "woman", "on", "the", "beach"]


@pytest.mark.parametrize("editing", [k for k in ("kontext", "flux2", "flux2_klein_4b") if k in supported_kinds()])
def test_reference_image_editing(pack, editing):
    """Kontext, FLUX.2 and FLUX.2 klein editing: reference latents become extra tokens after the image; the rotation and
    Restrict Unsafe Flow see the reference tokens in the call's layout and change the output."""
    model = model_of(editing)
    shape = pack.saferope_comfy.model_calls.latent_shape(model, SIZE, SIZE)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
    refs = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(2))]
    context = torch.randn(1, 12, comfyui_env.context_width(editing), generator=torch.Generator().manual_seed(3))
    pooled = torch.randn(1, comfyui_env.POOLED_DIM) if editing == "kontext" else None

    class LayoutRecorder:
        layouts = []

        def edit_qk(self, call, block, tokens, q, k):
            self.layouts.append(call.layout)
            return q, k

    seen = pack.saferope_comfy.flux_adapter.with_qk_editor(model, comfyui_env.editor(LayoutRecorder)())
    with torch.inference_mode():
        base = comfyui_env.run_model(model, x, 0.95, context, pooled, ref_latents=refs)
        comfyui_env.run_model(seen, x, 0.95, context, pooled, ref_latents=refs)
        assert LayoutRecorder.layouts[0].refs == (16,) and LayoutRecorder.layouts[0].img == 16
        (patched,) = run_node(pack.nodes.ApplyRiskRotation.execute, model, planted_pack(pack, model), 1.0, "both")
        assert relative_change(comfyui_env.run_model(patched, x, 0.95, context, pooled, ref_latents=refs), base) > 1e-4


def test_collect_build_train_save_load(pack, kind, folders):
    """The whole Collect & Train chain through the nodes, on the family's own text encoder: subjects are found
    in every prompt, heads are selected, training moves the rotations, the model is left as it was, and ComfyUI's
    RoPE is the one it had before."""
    rope = rope_in_use()
    n = pack.nodes
    model, clip = model_of(kind), clip_of(kind)
    x = noise(pack, model)
    before = velocity(pack, model, clip, UNSAFE[0], x)
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute,
        "custom",
        "nude\nnaked",
        "",
        "a photo of a {subject} woman\na {subject} man on a beach",
        "\n".join(SAFE),
        4,
        4,
        0,
    )
    stats, report = run_node(n.CollectQK.execute, model, clip, prompts, "1.0, 0.7", SIZE, SIZE, 0, 64)
    assert "subject tokens found in 4 of 4 prompts" in report
    subspaces, _ = run_node(n.BuildSubspaces.execute, stats, 2, 0.5, -1.0)
    assert subspaces.heads_rotated() == subspaces.shape.heads * len(subspaces.shape.block_names())
    trained, log = run_node(
        n.TrainRiskRotations.execute,
        model,
        clip,
        subspaces,
        prompts,
        4,
        0.05,
        1.0,
        1.0,
        0,
        SIZE,
        SIZE,
        f"family_{kind}",
        2,
        False,
        True,
    )
    assert log.startswith("4 steps")
    assert trained.recipe["trained"] is True and trained.shape.family == comfyui_env.FAMILY_OF_KIND[kind]
    assert any(b.w_txt.abs().sum() > 0 for b in trained.blocks.values())
    assert rope_in_use() == rope
    assert torch.equal(velocity(pack, model, clip, UNSAFE[0], x), before)
    path = run_node(n.SaveSafeRoPEPack.execute, trained, f"family_{kind}", True)["result"][0]
    loaded = pack.saferope_core.load_pack(path)
    assert loaded.shape == trained.shape
    (patched,) = run_node(n.ApplyRiskRotation.execute, model, loaded, 1.0, "both")
    assert relative_change(velocity(pack, patched, clip, UNSAFE[0], x), before) > 0


def test_restrict_unsafe_flow(pack, kind):
    """Collect UVR Anchors and Restrict Unsafe Flow: with every patch flagged (threshold near -1) a start-up step
    changes, a late step is bit-identical to the model without the node."""
    n = pack.nodes
    model, clip = model_of(kind), clip_of(kind)
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "nude", "", "a photo of a {subject} woman", "\n".join(SAFE), 2, 2, 0
    )
    anchors, _ = run_node(n.CollectUVRAnchors.execute, model, clip, prompts, 0, "1.0", SIZE, SIZE, 1, 0)
    (restricted,) = run_node(n.RestrictUnsafeFlow.execute, model, anchors, 1.0, -0.99, 0.85, -1)
    x = noise(pack, model)
    assert (
        relative_change(
            velocity(pack, restricted, clip, UNSAFE[0], x, 1.0), velocity(pack, model, clip, UNSAFE[0], x, 1.0)
        )
        > 1e-4
    )
    assert torch.equal(
        velocity(pack, restricted, clip, UNSAFE[0], x, 0.3), velocity(pack, model, clip, UNSAFE[0], x, 0.3)
    )


def test_prompt_redirector(pack, kind, folders):
    """Train / Save / Load Prompt Redirector and Redirect Unsafe Prompts on the family's own text encoder: the
    redirector's widths are the model's (its text input layer, its latent channels), everything flagged changes the
    velocity, nothing flagged is bit-identical, the input model is left as it was, and a KSampler run through the
    patched model gives finite latents."""
    n = pack.nodes
    model, clip = model_of(kind), clip_of(kind)
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "nude", "", "a photo of a {subject} woman", "\n".join(SAFE), 2, 2, 0
    )
    trained, log = run_node(
        n.TrainPromptRedirector.execute, model, clip, prompts, 2, 1e-3, 0, SIZE, SIZE, f"family_{kind}", 2, False, True
    )
    assert log.startswith("2 steps"), log
    inner = model.model.diffusion_model
    config = trained.config
    assert config.family == comfyui_env.FAMILY_OF_KIND[kind]
    assert (config.width, config.latent_channels) == (
        inner.txt_in.in_features,
        model.model.latent_format.latent_channels,
    )
    run_node(n.SavePromptRedirector.execute, trained, f"family_{kind}", True)
    (loaded,) = run_node(n.LoadPromptRedirector.execute, f"family_{kind}.safetensors")
    x = noise(pack, model)
    before = velocity(pack, model, clip, UNSAFE[0], x)
    (always,) = run_node(n.RedirectUnsafePrompts.execute, model, loaded, 1.0, -20.0, 0)
    (never,) = run_node(n.RedirectUnsafePrompts.execute, model, loaded, 1.0, 20.0, 0)
    assert relative_change(velocity(pack, always, clip, UNSAFE[0], x), before) > 0
    assert torch.equal(velocity(pack, never, clip, UNSAFE[0], x), before)
    assert torch.equal(velocity(pack, model, clip, UNSAFE[0], x), before)
    prompt = pack.saferope_comfy.model_calls.encode_prompt(clip, UNSAFE[0])
    out = comfyui_env.sample(always, prompt.conditioning, prompt.conditioning, steps=2, cfg=1.0, latent=x * 0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_lrs_visualize_shows_the_prompts_words(pack, kind):
    """LRS Visualize: three panels; its words are the prompt's own (never a chat template's), each scored."""
    model, clip = model_of(kind), clip_of(kind)
    out = run_node(
        pack.nodes.LRSVisualize.execute, model, planted_pack(pack, model), clip, "a nude woman on the beach", 0.9, 0
    )
    images, summary = out["result"]
    assert images.shape[0] == 3
    words = [w["word"].lower() for w in out["ui"]["saferope_words"]]
    assert words == ["a", "nude", "woman", "on", "the", "beach"], words
    assert all(0 <= w["risk"] <= 1 for w in out["ui"]["saferope_words"])


class BlockRecorder:
    """An attention editor that records the block each attention call belongs to."""

    needs_attention = True

    def __init__(self):
        self.blocks = []

    def edit_qk(self, call, block, tokens, q, k):
        return q, k

    def edit_attention(self, call, block, q, k, v, heads, attend):
        self.blocks.append(block)
        return attend(q, k, v)


def test_attention_editors_know_the_running_block(pack, kind):
    """Every attention call is attributed to its block, in execution order (ComfyUI 0.8 names the block in
    transformer_options; on 0.3.64 the QK hook that ran just before tells)."""
    model, clip = model_of(kind), clip_of(kind)
    recorder = comfyui_env.editor(BlockRecorder)()
    velocity(pack, pack.saferope_comfy.flux_adapter.with_qk_editor(model, recorder), clip, SAFE[0], noise(pack, model))
    assert recorder.blocks == pack.saferope_comfy.flux_adapter.model_shape(model).block_names()


# ---------------------------------------------------------------------------------------------------------------
# Training's RoPE


def rope_in_use():
    """What decides FLUX's RoPE: the module's apply_rope and ComfyUI's training switch (None before ComfyUI 0.33)."""
    import comfy.ldm.flux.math as flux_math
    import comfy.model_management

    return flux_math.apply_rope, getattr(comfy.model_management, "in_training", None)


def test_training_rope_has_an_exact_backward(pack, comfy):
    """Inside differentiable_rope(), FLUX's apply_rope gives the same outputs as outside and its gradient is exact
    (ComfyUI >= 0.33: its own training switch turns on the plain-torch RoPE; 0.8.0: comfy-kitchen's op, which has no
    backward, is wrapped; 0.3.64: plain torch already): RoPE is linear in q and k, so for any direction d, <grad, d>
    must equal the change of the loss along d. Everything is put back afterwards, also after an error."""
    import comfy.ldm.flux.layers
    import comfy.ldm.flux.math as flux_math
    import comfy.model_management

    before = rope_in_use()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (1, 6, 3), generator=g).float()
    pe = comfy.ldm.flux.layers.EmbedND(dim=16, theta=10000, axes_dim=[4, 6, 6])(ids)  # [1, 1, 6, 8, 2, 2]
    q, k, wq, wk, dq, dk = (torch.randn(1, 2, 6, 16, generator=g) for _ in range(6))
    plain = flux_math.apply_rope(q, k, pe)

    def loss(a, b):
        ra, rb = flux_math.apply_rope(a, b, pe)
        return (wq * ra).sum() + (wk * rb).sum()

    with pack.saferope_comfy.training.differentiable_rope():
        assert rope_in_use() != before
        if hasattr(comfy.model_management, "in_training"):  # ComfyUI's own switch, the module left as it is
            assert rope_in_use() == (before[0], True)
        for a, b in zip(plain, flux_math.apply_rope(q, k, pe), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        a, b = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        loss(a, b).backward()
        along = loss(q + dq, k + dk) - loss(q, k)
        torch.testing.assert_close((a.grad * dq).sum() + (b.grad * dk).sum(), along, rtol=1e-4, atol=1e-4)
        assert a.grad.abs().sum() > 0 and not torch.allclose(a.grad, wq)  # a rotation, not the identity
    assert rope_in_use() == before
    with pytest.raises(RuntimeError, match="inside"), pack.saferope_comfy.training.differentiable_rope():
        raise RuntimeError("an error inside the training run")
    assert rope_in_use() == before


def test_cancelled_training_leaves_comfyuis_rope(pack, folders):
    """A training run cancelled from the UI (ComfyUI's interrupt flag) raises ComfyUI's interrupt and leaves FLUX's
    RoPE as it found it; while it trains, the RoPE in use is the differentiable one."""
    import comfy.model_management

    n = pack.nodes
    model, clip = model_of("dev"), clip_of("dev")
    before = rope_in_use()
    prompts, _ = run_node(
        n.SafeRoPEPromptSet.execute, "custom", "nude", "", "a photo of a {subject} woman", "\n".join(SAFE), 2, 2, 0
    )
    stats, _ = run_node(n.CollectQK.execute, model, clip, prompts, "1.0", SIZE, SIZE, 0, 64)
    subspaces, _ = run_node(n.BuildSubspaces.execute, stats, 2, 0.5, -1.0)
    recipe = pack.saferope_core.TrainingRecipe(steps=3, learning_rate=0.05, seed=0)
    shape = pack.saferope_comfy.model_calls.latent_shape(model, SIZE, SIZE)
    data = pack.saferope_comfy.training.TrainingData(prompts, shape)
    in_use = []
    trainer = pack.saferope_comfy.training.RotationTrainer(model, clip, subspaces, data, recipe)
    trainer.train(on_step=lambda *_: in_use.append(rope_in_use()))
    assert len(in_use) == 3 and all(state != before for state in in_use)
    assert rope_in_use() == before
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(
                n.TrainRiskRotations.execute,
                model,
                clip,
                subspaces,
                prompts,
                3,
                0.05,
                1.0,
                1.0,
                0,
                SIZE,
                SIZE,
                "cancelled",
                1,
                False,
                False,
            )
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert rope_in_use() == before
