"""The FLUX adapter: how every guard reaches the attention of ComfyUI's FLUX-family models.

One mechanism serves every feature (rotation, visualisation, collection, training, UVR): a DIFFUSION_MODEL
wrapper, registered on a ModelPatcher clone, that gives each model call a `ModelCall` (token layout, sigma, the
editor's sampling-run state) and lets an editor (editors.py: `Editor.edit_qk`) see and replace every block's q/k
after the QK norm and before RoPE, split into text and image tokens. How q/k are reached depends on what the
running ComfyUI offers (`qk_mechanism`):
- "attn1_patch" (ComfyUI >= 0.33, whose FLUX blocks call the pre-attention patch): ComfyUI's own extension point,
  set on the clone with `ModelPatcher.set_model_attn1_patch`; the wrapper hands the patch its call through the
  transformer_options it passes down.
- "hooks" (older ComfyUI): for the duration of one model call, forward hooks on the QKNorm modules of every
  block, removed in `finally`.
Both give the same q/k to the editor, so the same velocity (tested). An editor with `needs_attention` also sees
each block's attention (`Editor.edit_attention`): the wrapper then puts an `optimized_attention_override` into the
transformer_options it passes down (chaining any override already there), and records the call's RoPE position
ids (`call.img_ids`) with a `post_input` patch; the running block is `call.block`.

Nothing is renamed, no weight or shared dict is touched, and the wrappers of several nodes nest (each edits in the
order the nodes were chained). No ComfyUI forward code is copied: the stock forward runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.ldm.chroma.model
import comfy.ldm.chroma_radiance.model
import comfy.ldm.flux.model
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..saferope_core import ModelShape
from ..saferope_core.shape import FAMILIES

WRAPPER_KEY = "saferope"
CALLS = "saferope_calls"  # transformer_options key: id(editor) -> its ModelCall, read by that editor's attn1 patch
HOOKED = "saferope_hooked"  # transformer_options key: the (editor, ModelCall) pairs whose QK-norm hooks are on
RUN_STATES = "saferope_run_states"  # transformer_options key: id(editor) -> that editor's state of this sampling run


class NotFluxError(TypeError):
    """The model is not a FLUX-family transformer that SafeRoPE can patch."""


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one model call. Joint sequence order: [text | image | reference images]."""

    batch: int
    txt: int
    img: int
    img_hw: tuple[int, int]
    refs: tuple[int, ...] = ()
    ref_hw: tuple[tuple[int, int], ...] = ()

    @property
    def total(self) -> int:
        return self.txt + self.img + sum(self.refs)

    def image_slice(self) -> slice:
        """The generated image's tokens inside the image stream (reference tokens follow them)."""
        return slice(0, self.img)


@dataclass
class ModelCall:
    """What an editor knows about the current model call."""

    layout: TokenLayout
    sigma: torch.Tensor
    transformer_options: dict = field(default_factory=dict)
    block: str | None = None  # the block whose attention runs next
    img_ids: torch.Tensor | None = None  # RoPE ids of image + reference tokens [B, L, 3] (attention editors)
    scratch: dict = field(default_factory=dict)  # per-call state of editors
    run_state: object = None  # the editor's state for this sampling run (editors that keep one), else None


def _tokens_hw(latent: torch.Tensor, patch: int) -> tuple[int, int]:
    """Image tokens along height and width: the latent is padded up to whole patches."""
    h, w = latent.shape[-2:]
    return -(-h // patch), -(-w // patch)


def token_layout(model, x: torch.Tensor, context: torch.Tensor, ref_latents=None) -> TokenLayout:
    """Layout from the inputs of the transformer's forward (latent x, text context, Kontext/FLUX.2 references)."""
    patch = model.patch_size
    hw = _tokens_hw(x, patch)
    ref_hw = tuple(_tokens_hw(r, patch) for r in (ref_latents or []))
    return TokenLayout(x.shape[0], context.shape[1], hw[0] * hw[1], hw, tuple(h * w for h, w in ref_hw), ref_hw)


TRANSFORMERS = (comfy.ldm.flux.model.Flux, comfy.ldm.chroma.model.Chroma)  # Chroma Radiance subclasses Chroma


def model_family(model) -> str:
    """The architecture family of a FLUX-family transformer, read from the model itself (class and parameters)."""
    if isinstance(model, comfy.ldm.chroma_radiance.model.ChromaRadiance):
        return "chroma_radiance"
    if isinstance(model, comfy.ldm.chroma.model.Chroma):
        return "chroma"
    params = model.params
    if getattr(params, "global_modulation", False):
        return "flux2"
    if getattr(params, "yak_mlp", False) and getattr(params, "txt_norm", False):
        return "ovis"
    return "flux"


def flux_model(patcher):
    """The FLUX-family transformer inside a ModelPatcher, or NotFluxError naming what was found instead."""
    inner = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if inner is None:
        raise NotFluxError(f"expected a diffusion MODEL, got {type(patcher).__name__}")
    name = f"{type(inner).__module__}.{type(inner).__name__}"
    if "nunchaku" in name.lower() or type(inner).__name__ == "ComfyFluxWrapper":
        raise NotFluxError(
            f"the model is a Nunchaku transformer ({name}); it replaces FLUX's attention and ignores "
            "ComfyUI's transformer options, so SafeRoPE cannot reach its queries and keys. Load the "
            "model with Load Diffusion Model (bf16, fp8 or GGUF) instead"
        )
    if not isinstance(inner, TRANSFORMERS):
        raise NotFluxError(
            f"the model is {name}, not a FLUX-family transformer; SafeRoPE supports " + ", ".join(FAMILIES.values())
        )
    return inner


def model_shape(patcher) -> ModelShape:
    model = flux_model(patcher)
    return ModelShape(
        model_family(model),
        len(model.double_blocks),
        len(model.single_blocks),
        model.num_heads,
        model.hidden_size // model.num_heads,
    )


def qk_sites(model) -> list[tuple[torch.nn.Module, str, str]]:
    """(QKNorm module, block name, stream) for every attention of the model: 'txt'/'img' or 'joint'."""
    sites = []
    for i, block in enumerate(model.double_blocks):
        sites.append((block.txt_attn.norm, f"double.{i}", "txt"))
        sites.append((block.img_attn.norm, f"double.{i}", "img"))
    for i, block in enumerate(model.single_blocks):
        sites.append((block.norm, f"single.{i}", "joint"))
    return sites


def _edit_joint(editor, call: ModelCall, block: str, q: torch.Tensor, k: torch.Tensor, txt: int):
    """Edit q/k of a joint sequence [text | image ...] as its text and image parts; the same objects when nothing
    was edited (no copy)."""
    parts = (q[:, :, :txt], k[:, :, :txt], q[:, :, txt:], k[:, :, txt:])
    edited = (*editor.edit_qk(call, block, "txt", *parts[:2]), *editor.edit_qk(call, block, "img", *parts[2:]))
    if all(new is old for new, old in zip(edited, parts, strict=True)):
        return q, k
    return torch.cat(edited[0::2], dim=2), torch.cat(edited[1::2], dim=2)


def _make_hook(editor, call: ModelCall, block: str, stream: str) -> Callable:
    def hook(_module, _args, output):
        call.block = block
        q, k = output
        if stream != "joint":
            return editor.edit_qk(call, block, stream, q, k)
        edited = _edit_joint(editor, call, block, q, k, call.layout.txt)
        return None if edited[0] is q and edited[1] is k else edited

    return hook


class QKEditPatch:
    """attn1_patch (ComfyUI's pre-attention patch of FLUX's double and single blocks): routes the block's q/k,
    after the QK norm and before RoPE, through `editor`, with the ModelCall the wrapper put into the options."""

    def __init__(self, editor):
        self.editor = editor

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None, **kwargs):
        options = extra_options or {}
        call = options.get(CALLS, {}).get(id(self.editor))
        if call is None:  # a call that did not pass through this editor's wrapper
            return {}
        block = f"{options['block_type']}.{options['block_index']}"
        call.block = block
        txt = options["img_slice"][0] if "img_slice" in options else call.layout.txt
        q, k = _edit_joint(self.editor, call, block, q, k, txt)
        return {"q": q, "k": k}


@functools.cache
def flux_blocks_call_attn1_patch() -> bool:
    """Whether this ComfyUI's FLUX double and single blocks run `patches["attn1_patch"]` on q/k (ComfyUI >= 0.33),
    read from the blocks themselves rather than a version number."""
    import comfy.ldm.flux.layers as layers

    return all(
        "attn1_patch" in inspect.getsource(block.forward)
        for block in (layers.DoubleStreamBlock, layers.SingleStreamBlock)
    )


def qk_mechanism() -> str:
    """How this ComfyUI's q/k are reached: "attn1_patch" where FLUX's blocks offer it, else "hooks"."""
    return "attn1_patch" if flux_blocks_call_attn1_patch() else "hooks"


@contextlib.contextmanager
def rehooked(options: dict, model, block: str):
    """The QK-norm hooks of the editors a model call had (`options[HOOKED]`, ComfyUI < 0.33), on `block` of `model`
    again for the duration: gradient checkpointing runs a block once more in backward, after the call's hooks are
    gone. Nothing where q/k edits are ComfyUI's attn1_patch (it travels in the options)."""
    handles = [
        m.register_forward_hook(_make_hook(editor, call, name, stream))
        for editor, call in options.get(HOOKED, ())
        for m, name, stream in qk_sites(model)
        if name == block
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@functools.cache
def _forward_signature(model_class) -> inspect.Signature:
    """The signature of a transformer's _forward: FLUX (x, timestep, context, y, guidance, ref_latents, ...) and
    Chroma (x, timestep, context, guidance, ...) differ, so wrapper arguments are bound by name."""
    return inspect.signature(model_class._forward)


class QKEditWrapper:
    """DIFFUSION_MODEL wrapper that routes every block's q/k through `editor` during one model call, by the
    mechanism given ("attn1_patch": the clone's QKEditPatch finds the call in the options; "hooks": QK-norm hooks
    for the duration of the call).

    Holds no per-call state, so ModelPatcher.clone()'s deep copies may share it (__deepcopy__ returns self).
    """

    def __init__(self, editor, mechanism: str):
        self.editor, self.mechanism = editor, mechanism

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        model = executor.class_obj
        bound = _forward_signature(type(model)).bind(model, *args, **kwargs)
        inputs = bound.arguments
        options = inputs.get("transformer_options")
        options = options if options is not None else {}
        layout = token_layout(model, inputs["x"], inputs["context"], inputs.get("ref_latents"))
        call = ModelCall(layout, inputs["timestep"], options)
        call.run_state = getattr(options.get(RUN_STATES), "by_editor", {}).get(id(self.editor))
        if self.editor.needs_attention:
            inputs["transformer_options"] = options = _with_attention_editor(options, self.editor, call)
        handles = []
        if self.mechanism == "attn1_patch":
            inputs["transformer_options"] = {**options, CALLS: {**options.get(CALLS, {}), id(self.editor): call}}
        else:
            inputs["transformer_options"] = {**options, HOOKED: (*options.get(HOOKED, ()), (self.editor, call))}
            handles = [
                m.register_forward_hook(_make_hook(self.editor, call, block, stream))
                for m, block, stream in qk_sites(model)
            ]
        try:
            return executor(*bound.args[1:], **bound.kwargs)
        finally:
            for handle in handles:
                handle.remove()


def _running_block(call: ModelCall, attention_kwargs: dict) -> str | None:
    """The block whose attention runs: ComfyUI >= 0.8 names it in transformer_options (block_type, block_index);
    older versions do not, and the QK hook that ran just before tells."""
    options = attention_kwargs.get("transformer_options") or {}
    kind, index = options.get("block_type"), options.get("block_index")
    if kind in ("double", "single") and isinstance(index, int):
        return f"{kind}.{index}"
    return call.block


def _with_attention_editor(options: dict, editor, call: ModelCall) -> dict:
    """A copy of transformer_options whose attention override (chained) and post_input patch serve `editor`."""
    previous = options.get("optimized_attention_override")

    def override(func, q, k, v, heads, *args, **kwargs):
        def attend(q2, k2, v2, key_bias=None):
            kw = dict(kwargs)
            if key_bias is not None:
                bias = key_bias[:, None, None, :].to(q2.dtype)
                kw["mask"] = bias if kw.get("mask") is None else kw["mask"] + bias
            if previous is not None:
                return previous(func, q2, k2, v2, heads, *args, **kw)
            return func(q2, k2, v2, heads, *args, **kw)

        call.block = _running_block(call, kwargs)
        return editor.edit_attention(call, call.block, q, k, v, heads, attend)

    def record_ids(data):
        call.img_ids = data["img_ids"]
        return data

    patches = {name: list(value) for name, value in options.get("patches", {}).items()}
    patches["post_input"] = [*patches.get("post_input", []), record_ids]
    return {**options, "optimized_attention_override": override, "patches": patches}


class RunStates:
    """The editors' states of one sampling run, by id(editor). Not a dict: ComfyUI copies the nested dicts of
    transformer_options for every model call, and the states must be the same objects from call to call."""

    def __init__(self, by_editor: dict):
        self.by_editor = by_editor


class RunStateWrapper:
    """OUTER_SAMPLE wrapper giving an editor a fresh state for one sampling run (put into the transformer_options
    the run's model calls see) and dropping it when the run ends, however it ends (as ComfyUI's EasyCache does)."""

    def __init__(self, editor):
        self.editor = editor

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        options = guider.model_options.setdefault("transformer_options", {})
        options[RUN_STATES] = RunStates(
            {**getattr(options.get(RUN_STATES), "by_editor", {}), id(self.editor): self.editor.new_run_state()}
        )
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original


def with_qk_editor(patcher, editor, mechanism: str | None = None):
    """A clone of `patcher` whose model calls route q/k through `editor` (stacks with earlier editors); an editor
    that keeps a state per sampling run gets it for every run. `mechanism`: "attn1_patch" or "hooks" (default: what
    this ComfyUI offers, `qk_mechanism()`)."""
    flux_model(patcher)
    mechanism = mechanism or qk_mechanism()
    if mechanism == "attn1_patch" and not flux_blocks_call_attn1_patch():
        raise ValueError("this ComfyUI's FLUX blocks do not run attn1_patch; use the 'hooks' mechanism")
    clone = patcher.clone()
    clone.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, QKEditWrapper(editor, mechanism)
    )
    if mechanism == "attn1_patch" and editor.edits_qk:
        clone.set_model_attn1_patch(QKEditPatch(editor))
    if editor.keeps_run_state:
        clone.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, RunStateWrapper(editor)
        )
    return clone


def call_options(patcher, model_options: dict | None = None) -> dict:
    """transformer_options for calling patcher.model.apply_model directly (outside a sampler), with the patcher's
    wrappers merged in, as ComfyUI's sampler does."""
    options = comfy.patcher_extension.copy_nested_dicts(
        (model_options or patcher.model_options).get("transformer_options", {})
    )
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    return options
