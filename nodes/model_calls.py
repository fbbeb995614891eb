"""Running a FLUX ModelPatcher directly (outside a sampler): prompt encoding and one velocity evaluation.

Used by collection, training and visualisation; sampling goes through ComfyUI's own KSampler path instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import torch

from .flux_adapter import call_options

CONTEXT_TOKENIZER_KEYS = ("t5xxl", "t5", "l")  # the tokenizer whose tokens become FLUX's context, first found


@dataclass
class EncodedPrompt:
    """A prompt as the model sees it: context token ids (aligned with `context`), context and pooled vector."""

    text: str
    token_ids: list[int]
    context: torch.Tensor  # [1, L, C]
    pooled: torch.Tensor  # [1, P]


def context_token_ids(clip, text: str) -> list[int]:
    """Token ids of `text` in the tokenizer that produces FLUX's context (T5-XXL for FLUX.1)."""
    tokens = clip.tokenize(text)
    key = next((k for k in CONTEXT_TOKENIZER_KEYS if k in tokens), next(iter(tokens)))
    return [int(t[0]) for batch in tokens[key] for t in batch]


def encode_prompt(clip, text: str) -> EncodedPrompt:
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    ids = context_token_ids(clip, text)
    context = out["cond"]
    if context.shape[1] != len(ids):
        raise ValueError(f"the text encoder's tokens ({len(ids)}) do not line up with its conditioning "
                         f"({context.shape[1]} tokens); use the FLUX text encoders (DualCLIPLoader, type flux)")
    return EncodedPrompt(text, ids, context, out["pooled_output"])


def load_model(patcher) -> torch.device:
    """Load the patcher's model onto its device the way samplers do; returns that device."""
    comfy.model_management.load_models_gpu([patcher])
    return patcher.load_device


def velocity(patcher, x: torch.Tensor, sigma: torch.Tensor, prompt: EncodedPrompt, guidance: float = 3.5,
             ref_latents: list[torch.Tensor] | None = None, options: dict | None = None) -> torch.Tensor:
    """FLUX's velocity v(x, sigma, prompt) in float32 (ComfyUI returns the denoised x0 = x - sigma * v).

    `options`: transformer_options for this call; by default the patcher's own, wrappers merged in.
    """
    batch = x.shape[0]
    device = x.device
    kwargs = {"c_crossattn": prompt.context.to(device).expand(batch, -1, -1),
              "y": prompt.pooled.to(device).expand(batch, -1),
              "guidance": torch.full((batch,), float(guidance), device=device)}
    if ref_latents:
        kwargs["ref_latents"] = [r.to(device) for r in ref_latents]
    sigma = sigma.to(device).reshape(-1).expand(batch)
    opts = call_options(patcher) if options is None else options
    denoised = patcher.model.apply_model(x, sigma, transformer_options=opts, **kwargs)
    return (x.float() - denoised.float()) / sigma.float().reshape(-1, *([1] * (x.ndim - 1)))


def latent_shape(patcher, width: int, height: int) -> tuple[int, int, int]:
    """Latent [C, H, W] of an image size for this model (8x VAE downscale)."""
    channels = patcher.model.latent_format.latent_channels
    return channels, height // 8, width // 8
