"""The ComfyUI tier of the tests: find and import a ComfyUI checkout, build a tiny FLUX and a tiny FLUX text encoder
from ComfyUI's own classes, call the model the way sampling does, and make text conditioning without a text encoder.

Plain functions, no pytest fixtures. Everything comfy is imported lazily, so this module imports anywhere; call
`import_comfyui()` first in a test process (a ComfyUI server has comfy imported already).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import os
import sys
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = ("dev", "schnell", "kontext")
CONTEXT_DIM = 32  # width of a text token of the tiny models (T5-XXL's 4096 in FLUX)
POOLED_DIM = 16  # width of the pooled text vector (CLIP-L's 768 in FLUX)
DEFAULT_GUIDANCE = 3.5  # what ComfyUI's Flux.extra_conds uses when a conditioning has no "guidance"
CPU = torch.device("cpu")


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file()


def find_comfyui() -> Path | None:
    """The ComfyUI checkout to test against, or None.

    $COMFYUI_PATH when set (set it empty to skip the tier), else $HOME/ComfyUI, else the ComfyUI whose
    custom_nodes folder holds this repository.
    """
    env = os.environ.get("COMFYUI_PATH")
    if env is not None:
        candidates = [Path(env)] if env else []
    else:
        candidates = [Path.home() / "ComfyUI"]
        if REPO.parent.name == "custom_nodes":
            candidates.append(REPO.parent.parent)
    return next((p.resolve() for p in candidates if _is_comfyui(p)), None)


def import_comfyui(path: str | Path | None = None, cpu: bool = True) -> Path:
    """Put ComfyUI first on sys.path and import it on the CPU (`cpu=False`: on the device ComfyUI finds, for
    bench.gpu_check). Idempotent; returns the checkout used.

    ComfyUI parses the command line only after `comfy.options.enable_args_parsing()` (main.py calls it), so
    pytest's argv never reaches its argparse. Its own top-level modules (`nodes`, `utils`, `tests`, ...) win over
    same-named ones of this repo: import the pack with `import_pack()`, never as `nodes`.
    """
    path = Path(path or find_comfyui() or "").resolve()
    if not _is_comfyui(path):
        raise RuntimeError(f"no ComfyUI checkout at {path} (set COMFYUI_PATH)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options  # comfy is a namespace package: check where its modules come from

    if Path(comfy.options.__file__).resolve().parent != path / "comfy":
        raise RuntimeError(f"comfy is already imported from {comfy.options.__file__}, not from {path}")

    if "comfy.cli_args" not in sys.modules:
        comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if cpu and "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
        raise RuntimeError("comfy.model_management was imported before import_comfyui(): it may not be on the CPU")
    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (reads args.cpu once, at import)

    return path


def import_pack(name: str = "comfyui_saferope"):
    """Import this repository as a package, the way ComfyUI loads a custom node folder (after import_comfyui)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


# ---------------------------------------------------------------------------------------------------------------
# A tiny FLUX


FAMILY_OF_KIND = {
    "dev": "flux",
    "schnell": "flux",
    "kontext": "flux",
    "flux2": "flux2",
    "chroma": "chroma",
    "chroma_radiance": "chroma_radiance",
    "ovis": "ovis",
    "flux2_klein_4b": "flux2",
    "flux2_klein_9b": "flux2",
}
ALL_KINDS = tuple(FAMILY_OF_KIND)
NO_POOLED_KINDS = ("flux2", "chroma", "chroma_radiance", "ovis", "flux2_klein_4b", "flux2_klein_9b")
# Tiny models have 2 + 2 blocks of 4 heads of 16 unless asked otherwise. FLUX.2 klein's real block and head counts
# (4B: 5 + 20 blocks, 24 heads; 9B: 8 + 24, 32), with heads of 8 instead of 128: a call costs ~1 s on a CPU (its text
# is padded to 512 tokens), so tests use them where the shape is what is tested.
KLEIN_SHAPES = {
    "flux2_klein_4b": {"depth": 5, "depth_single": 20, "hidden": 192, "heads": 24},
    "flux2_klein_9b": {"depth": 8, "depth_single": 24, "hidden": 256, "heads": 32},
}
DEFAULT_SHAPE = {"depth": 2, "depth_single": 2, "hidden": 64, "heads": 4}
KLEIN_QWEN_WIDTH = 16  # the tiny Qwen3's width; klein's context is three of its layers side by side


def kind_supported(kind: str) -> bool:
    """Whether the imported ComfyUI can build this kind (FLUX.2 and Ovis-Image arrived in 0.8.0)."""
    import comfy.ldm.flux.model
    import comfy.supported_models

    if kind == "flux2":
        return hasattr(comfy.supported_models, "Flux2")
    if kind == "ovis":
        return "yak_mlp" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if kind.startswith("flux2_klein"):
        import comfy.text_encoders.flux

        return hasattr(comfy.text_encoders.flux, "KleinTokenizer")
    return kind in FAMILY_OF_KIND


def context_width(kind: str) -> int:
    """Width of a text token of `kind`'s tiny text encoder (tiny_clip), which its tiny model takes."""
    return 3 * KLEIN_QWEN_WIDTH if kind.startswith("flux2_klein") else CONTEXT_DIM


def text_encoder_of(kind: str) -> str:
    """Which tiny text encoder `kind` takes: kinds with the same one share it."""
    if kind.startswith("flux2_klein"):
        return kind
    return {"chroma": "t5", "chroma_radiance": "t5", "flux2": "ovis", "ovis": "ovis"}.get(kind, "flux")


def _params_class(kind: str):
    import comfy.ldm.chroma.model
    import comfy.ldm.chroma_radiance.model
    import comfy.ldm.flux.model

    return {
        "chroma": comfy.ldm.chroma.model.ChromaParams,
        "chroma_radiance": comfy.ldm.chroma_radiance.model.ChromaRadianceParams,
    }.get(kind, comfy.ldm.flux.model.FluxParams)


def flux_unet_config(
    kind: str = "dev",
    depth: int | None = None,
    depth_single: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    context_dim: int | None = None,
    pooled_dim: int = POOLED_DIM,
) -> dict:
    """The unet_config of a small FLUX-family model: what comfy.model_detection would find, with small sizes (see
    fit_to_comfyui for the fields a given ComfyUI takes).

    axes_dim keeps each family's split of a head (FLUX.1: 16/56/56 of 128 -> [4, 6, 6] for head_dim 16; FLUX.2:
    four equal axes). context_dim / pooled_dim: widths of the text token and of the pooled vector (FLUX.1: 4096 and
    768; the other families have no pooled vector).
    """
    if kind not in FAMILY_OF_KIND:
        raise ValueError(f"kind must be one of {ALL_KINDS}, got {kind!r}")
    given = {"depth": depth, "depth_single": depth_single, "hidden": hidden, "heads": heads}
    shape = {k: DEFAULT_SHAPE[k] if v is None else v for k, v in given.items()}
    depth, depth_single, hidden, heads = shape["depth"], shape["depth_single"], shape["hidden"], shape["heads"]
    context_dim = context_width(kind) if context_dim is None else context_dim
    head_dim = hidden // heads
    axis = head_dim * 7 // 32 * 2  # even, 56 for head_dim 128
    config = {
        "image_model": "flux",
        "in_channels": 16,  # latent channels; img_in sees 16 * 2 * 2 = 64 after 2x2 patchify
        "out_channels": 16,
        "patch_size": 2,
        "vec_in_dim": None if kind in NO_POOLED_KINDS else pooled_dim,
        "context_in_dim": context_dim,
        "hidden_size": hidden,
        "mlp_ratio": 4.0,
        "num_heads": heads,
        "depth": depth,
        "depth_single_blocks": depth_single,
        "axes_dim": [head_dim - 2 * axis, axis, axis],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": kind not in ("schnell", "ovis", "flux2_klein_4b", "flux2_klein_9b"),
        "txt_ids_dims": [],
    }
    if FAMILY_OF_KIND[kind] == "flux2":
        config.update(
            image_model="flux2",
            in_channels=128,
            out_channels=128,
            patch_size=1,
            mlp_ratio=3.0,
            axes_dim=[head_dim // 4] * 4,
            theta=2000,
            qkv_bias=False,
            global_modulation=True,
            mlp_silu_act=True,
            ops_bias=False,
            default_ref_method="index",
            ref_index_scale=10.0,
            txt_ids_dims=[3],
        )
    elif kind == "ovis":
        config.update(yak_mlp=True, txt_norm=True, txt_ids_dims=[1, 2])
    elif kind in ("chroma", "chroma_radiance"):
        # the distilled-guidance approximator's input is 16 (timestep) + 16 (guidance) + 32 (block index) wide
        config.update(
            image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=hidden, hidden_dim=32, n_layers=1
        )
    if kind == "chroma_radiance":
        config.update(
            image_model="chroma_radiance",
            in_channels=3,
            out_channels=3,
            patch_size=16,
            nerf_hidden_size=16,
            nerf_mlp_ratio=2,
            nerf_depth=1,
            nerf_max_freqs=4,
            nerf_tile_size=0,
            nerf_final_head_type="linear",
            nerf_embedder_dtype=torch.float32,
            use_x0=False,
            use_sequential_txt_ids=False,
        )
    return config


def fit_to_comfyui(kind: str, config: dict) -> dict:
    """`config` without the fields this ComfyUI's parameter class does not take (0.8.0 added txt_ids_dims and the
    FLUX.2 / Ovis-Image switches; 0.3.64 rejects them)."""
    accepted = {f.name for f in dataclasses.fields(_params_class(kind))} | {"image_model"}
    return {k: v for k, v in config.items() if k in accepted}


def is_norm(module: torch.nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm: ComfyUI's own, torch's from ComfyUI 0.33, QKNorm's parts, ...)."""
    return "norm" in type(module).__name__.lower()


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic weights (ComfyUI leaves them torch.empty): every normalisation's weight 1 and bias 0, as in a
    trained model, whatever ComfyUI calls the parameter (QKNorm's `scale` up to 0.8, torch RMSNorm's `weight` from
    0.33); other weights N(0, 1/fan_in), biases N(0, 0.02^2), so activations and attention logits are of order
    one. Keeps the ambient grad/inference mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if is_norm(sub):
                    p.fill_(0.0 if name == "bias" else 1.0)
                elif p.ndim == 1:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def tiny_flux(
    kind: str = "dev",
    depth: int | None = None,
    depth_single: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    context_dim: int | None = None,
    pooled_dim: int = POOLED_DIM,
    device: torch.device = CPU,
):
    """A random FLUX-family model as a comfy ModelPatcher on `device` (the CPU unless bench.gpu_check asks): FLUX.1
    dev / schnell / Kontext (= dev config), FLUX.2, Chroma, Chroma Radiance or Ovis-Image (see ALL_KINDS).

    Built like a loaded checkpoint: the supported_models class -> model_base -> ldm transformer, with the same
    model types, latent formats and model sampling as the real ones.
    """
    import comfy.model_patcher
    import comfy.supported_models

    if not kind_supported(kind):
        raise RuntimeError(f"this ComfyUI cannot build a {kind} model")
    classes = {"schnell": "FluxSchnell", "flux2": "Flux2", "chroma": "Chroma", "chroma_radiance": "ChromaRadiance"}
    config_class = getattr(comfy.supported_models, classes.get(kind, classes.get(FAMILY_OF_KIND[kind], "Flux")))
    config = flux_unet_config(kind, depth, depth_single, hidden, heads, context_dim, pooled_dim)
    model_config = config_class(fit_to_comfyui(kind, config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def latent_channels(kind: str) -> int:
    """Channels of a kind's latent (its model space): FLUX.1 / Chroma / Ovis 16, FLUX.2 128, Radiance 3 (pixels)."""
    return {"flux2": 128, "chroma_radiance": 3}.get(FAMILY_OF_KIND[kind], 16)


# ---------------------------------------------------------------------------------------------------------------
# A tiny FLUX text encoder (ComfyUI's FLUX CLIP classes and real tokenizers, small random weights)


def tiny_text_encoder_options(context_dim: int = CONTEXT_DIM, pooled_dim: int = POOLED_DIM, layers: int = 1) -> dict:
    """model_options that shrink comfy.text_encoders.flux.FluxClipModel: SDClipModel reads
    `<model_name>_model_config` and lets its keys override the JSON config of T5-XXL and of CLIP-L.

    T5's d_model is FLUX's context width, CLIP-L's hidden size its pooled width (FLUX uses CLIP-L's unprojected
    pooled output). Vocabularies and CLIP's 77 positions stay, so the real tokenizers' ids fit.
    """
    t5_heads = 4 if context_dim % 4 == 0 else 1
    clip_heads = 2 if pooled_dim % 2 == 0 else 1
    return {
        "t5xxl_model_config": {
            "d_model": context_dim,
            "d_ff": 2 * context_dim,
            "num_heads": t5_heads,
            "d_kv": context_dim // t5_heads,
            "num_layers": layers,
        },
        "clip_l_model_config": {
            "hidden_size": pooled_dim,
            "intermediate_size": 2 * pooled_dim,
            "num_attention_heads": clip_heads,
            "num_hidden_layers": layers,
            "projection_dim": pooled_dim,
        },
        "dtype": torch.float32,
    }


EMBEDDING_STD = 3.0


def init_text_encoder_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic weights for a text encoder ComfyUI created empty: token/position embeddings N(0, 3^2), norm
    weights 1, biases 0, T5's relative attention bias N(0, 0.1^2), other matrices N(0, 1/fan_in).

    The layers are pre-norm, so their updates have unit scale whatever the embeddings': embeddings 3x larger keep
    each token's own identity dominant in its output (as in a trained encoder) instead of a context average."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                continue  # a real value ComfyUI sets (not empty); unused for FLUX
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias") and p.ndim == 1:
                p.zero_()
            elif "embedding" in name or name.endswith("shared.weight"):
                p.copy_(EMBEDDING_STD * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def tiny_flux_clip(seed: int = 0, context_dim: int = CONTEXT_DIM, pooled_dim: int = POOLED_DIM, layers: int = 1):
    """A FLUX CLIP object (comfy.sd.CLIP over FluxTokenizer + FluxClipModel) with tiny random T5-XXL and CLIP-L
    and ComfyUI's real T5 and CLIP-L tokenizers, on the CPU.

    `clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)` gives cond
    [1, 256 (T5's min_length, more for long texts), context_dim] and pooled_output [1, pooled_dim]: what the
    tiny FLUX of tiny_flux() takes. Builds in well under a second (the vocabularies dominate).
    """
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.FluxClipModel
    )
    options = {
        **tiny_text_encoder_options(context_dim, pooled_dim, layers),
        "load_device": CPU,
        "offload_device": CPU,
        "initial_device": CPU,
    }
    clip = comfy.sd.CLIP(target=target, model_options=options)
    init_text_encoder_weights(clip.cond_stage_model, seed)
    return clip


def _tiny_clip(tokenizer, encoder, model_config: dict, seed: int):
    import comfy.sd
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(tokenizer, encoder)
    options = {**model_config, "dtype": torch.float32, "load_device": CPU, "offload_device": CPU, "initial_device": CPU}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    init_text_encoder_weights(clip.cond_stage_model, seed)
    return clip


def tiny_t5_clip(seed: int = 0, context_dim: int = CONTEXT_DIM, layers: int = 1):
    """Chroma's text encoder (comfy.text_encoders.pixart_t5: T5-XXL alone, no padding, no pooled vector) with the
    real T5 tokenizer and a tiny random T5."""
    import comfy.text_encoders.pixart_t5 as pixart

    config = {"t5xxl_model_config": tiny_text_encoder_options(context_dim, POOLED_DIM, layers)["t5xxl_model_config"]}
    return _tiny_clip(pixart.PixArtTokenizer, pixart.pixart_te(), config, seed)


def tiny_ovis_clip(seed: int = 0, context_dim: int = CONTEXT_DIM, layers: int = 1):
    """Ovis-Image's text encoder (ComfyUI >= 0.8: comfy.text_encoders.ovis, Qwen3 with a chat template whose start it
    cuts from its output, no pooled vector) with the real Qwen tokenizer and a tiny random Qwen3. The tests also run
    FLUX.2 on it: FLUX.2's own tokenizer (Mistral's tekken) ships only inside its checkpoint, and this is the
    tokenizer with a chat template that ships with ComfyUI."""
    import comfy.text_encoders.ovis as ovis

    config = {
        "qwen3_2b_model_config": {
            "hidden_size": context_dim,
            "intermediate_size": 2 * context_dim,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    }
    return _tiny_clip(ovis.OvisTokenizer, ovis.te(), config, seed)


def tiny_klein_clip(model_type: str = "qwen3_4b", seed: int = 0, width: int = KLEIN_QWEN_WIDTH):
    """FLUX.2 klein's text encoder (ComfyUI >= 0.33: comfy.text_encoders.flux.klein_te, Qwen3 4B or 8B whose layers
    9, 18 and 27 side by side are the context) with klein's own tokenizer and chat template (KleinTokenizer, on the
    Qwen tokenizer that ships with ComfyUI) and a tiny random Qwen3 of 28 layers: the context is 3 x `width` wide."""
    import comfy.text_encoders.flux as flux

    tokenizer = {"qwen3_4b": flux.KleinTokenizer, "qwen3_8b": flux.KleinTokenizer8B}[model_type]
    config = {
        f"{model_type}_model_config": {
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 28,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    }
    return _tiny_clip(tokenizer, flux.klein_te(model_type=model_type), config, seed)


def tiny_clip(kind: str, seed: int = 0, context_dim: int = CONTEXT_DIM):
    """The tiny text encoder whose conditioning the tiny model of `kind` takes."""
    if kind.startswith("flux2_klein"):
        return tiny_klein_clip({"flux2_klein_4b": "qwen3_4b", "flux2_klein_9b": "qwen3_8b"}[kind], seed)
    if kind in ("chroma", "chroma_radiance"):
        return tiny_t5_clip(seed, context_dim)
    if kind in ("flux2", "ovis"):
        return tiny_ovis_clip(seed, context_dim)
    return tiny_flux_clip(seed, context_dim)


# ---------------------------------------------------------------------------------------------------------------
# Text conditioning without a text encoder


def _word_vector(word: str, tag: str, seed: int, dim: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{tag}:{seed}:{word}".encode()).digest()
    return torch.randn(dim, generator=torch.Generator().manual_seed(int.from_bytes(digest[:7], "little")))


def encode_text(text: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, L, CONTEXT_DIM], pooled [1, POOLED_DIM]) of a text, deterministic per word.

    Token i is the embedding of word i (lower-cased, split on white space); the same word always gives the
    same token. pooled is the mean of per-word vectors. Empty text is one "<pad>" token.
    """
    words = text.lower().split() or ["<pad>"]
    context = torch.stack([_word_vector(w, "token", seed, CONTEXT_DIM) for w in words])[None]
    pooled = torch.stack([_word_vector(w, "pooled", seed, POOLED_DIM) for w in words]).mean(0, keepdim=True)
    return context, pooled


def conditioning(
    text: str,
    seed: int = 0,
    guidance: float | None = None,
    reference_latents=None,
    reference_latents_method: str | None = None,
) -> list:
    """A ComfyUI CONDITIONING: [[context, {"pooled_output": ..., ...}]].

    reference_latents are VAE-space latents (what the ReferenceLatent node adds), for Kontext.
    """
    context, pooled = encode_text(text, seed)
    options = {"pooled_output": pooled}
    if guidance is not None:
        options["guidance"] = guidance
    if reference_latents is not None:
        options["reference_latents"] = list(reference_latents)
    if reference_latents_method is not None:
        options["reference_latents_method"] = reference_latents_method
    return [[context, options]]


# ---------------------------------------------------------------------------------------------------------------
# Running the model


def combo_options(spec: list) -> list:
    """The choices of a combo input as /object_info serves it: [choices, {...}] (V1) or ["COMBO", {"options":
    choices, ...}] (V3)."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def editor(cls):
    """A test editor class (edit_qk / edit_attention) made a subclass of the pack's Editor, so it has every hook the
    adapter calls (import_pack() first)."""
    return type(cls.__name__, (cls, import_pack().saferope_comfy.editors.Editor), {})


def node_input(node_class, name: str):
    """The V3 schema input `name` of a node class (its .options, .default, ...), as define_schema builds it now."""
    return next(i for i in node_class.define_schema().inputs if i.id == name)


def run_node(method, *args, **kwargs):
    """Call a node's execute the way ComfyUI's executor does (under torch.inference_mode). Returns the outputs, as a
    tuple, or {"ui": ..., "result": outputs} when the node also shows something on the page."""
    with torch.inference_mode():
        out = method(*args, **kwargs)
    if hasattr(out, "args"):  # a V3 NodeOutput
        return out.args if out.ui is None else {"ui": out.ui, "result": out.args}
    return out


def run_model(
    patcher,
    latent: torch.Tensor,
    sigma,
    context: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float | None = None,
    ref_latents=None,
    ref_latents_method: str | None = None,
    run_sigmas: list[float] | None = None,
) -> torch.Tensor:
    """One denoiser call `patcher.model.apply_model` (returns the denoised x0 prediction), prepared as sampling
    prepares it: the patcher's wrappers and callbacks are merged into transformer_options by ComfyUI's
    sampler_helpers.prepare_model_patcher, the model and the models it carries are loaded (patches applied) by
    load_models_gpu, and
    transformer_options is assembled as in samplers._calc_cond_batch.

    latent, ref_latents: model space (after process_latent_in), [B, 16, h, w] (ref_latents repeated to B, as
    sampling does). sigma: float or [B].
    guidance: None -> 3.5, ComfyUI's default (schnell ignores it). Runs in the ambient grad mode.
    run_sigmas: the sampling run's sigmas (transformer_options["sample_sigmas"]); default [sigma, 0], a first step.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.samplers
    import comfy.utils

    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(latent.shape[0])
    model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    model_options.setdefault("transformer_options", {})
    comfy.sampler_helpers.prepare_model_patcher(patcher, {}, model_options)
    comfy.model_management.load_models_gpu([patcher, *patcher.get_nested_additional_models()])  # as sampling loads
    comfy.samplers.cast_to_load_options(model_options, device=patcher.load_device, dtype=patcher.model_dtype())

    kwargs = {
        "c_crossattn": context,
        "y": pooled,
        "guidance": torch.full((latent.shape[0],), DEFAULT_GUIDANCE if guidance is None else guidance),
    }
    if ref_latents is not None:
        kwargs["ref_latents"] = [comfy.utils.repeat_to_batch_size(r, latent.shape[0]) for r in ref_latents]
        if ref_latents_method is not None:
            kwargs["ref_latents_method"] = ref_latents_method
    try:
        patcher.pre_run()
        if "model_options" in inspect.signature(patcher.prepare_state).parameters:  # ComfyUI >= 0.33
            patcher.prepare_state(sigma, model_options)
        else:
            patcher.prepare_state(sigma)
        transformer_options = comfy.patcher_extension.merge_nested_dicts(
            patcher.apply_hooks(hooks=None), model_options["transformer_options"], copy_dict1=False
        )
        run = torch.tensor(run_sigmas) if run_sigmas is not None else torch.stack([sigma[0], torch.zeros(())])
        transformer_options.setdefault("sample_sigmas", run)
        transformer_options.update(cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=sigma)
        return patcher.model.apply_model(latent, sigma, transformer_options=transformer_options, **kwargs)
    finally:
        patcher.cleanup()
        comfy.samplers.cast_to_load_options(model_options, device=patcher.offload_device)


def sample(
    patcher,
    positive,
    negative=None,
    width: int = 64,
    height: int = 64,
    steps: int = 3,
    cfg: float = 1.0,
    seed: int = 0,
    sampler_name: str = "euler",
    scheduler: str = "simple",
    denoise: float = 1.0,
    latent: torch.Tensor | None = None,
    sigmas: list[float] | None = None,
) -> torch.Tensor:
    """End to end through comfy.sample.sample, as the KSampler node does, under torch.inference_mode like
    ComfyUI's executor. positive/negative: CONDITIONING lists or texts (see conditioning()); negative None is
    the empty text. latent: a VAE-space start latent, default an empty [1, 16, height/8, width/8].
    sigmas: sample these (through comfy.sample.sample_custom, as SamplerCustom does) instead of steps/scheduler.
    Returns the VAE-space samples."""
    import comfy.sample
    import comfy.samplers

    positive = conditioning(positive) if isinstance(positive, str) else positive
    negative = conditioning(negative or "") if negative is None or isinstance(negative, str) else negative
    with torch.inference_mode():
        if latent is None:
            latent = torch.zeros(1, 16, height // 8, width // 8)
        latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        if sigmas is not None:
            return comfy.sample.sample_custom(
                patcher,
                noise,
                cfg,
                comfy.samplers.sampler_object(sampler_name),
                torch.tensor(sigmas),
                positive,
                negative,
                latent,
                disable_pbar=True,
                seed=seed,
            )
        return comfy.sample.sample(
            patcher,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent,
            denoise=denoise,
            disable_pbar=True,
            seed=seed,
        )
