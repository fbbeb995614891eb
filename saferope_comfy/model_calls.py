"""Running a FLUX-family ModelPatcher directly (outside a sampler): prompt encoding and one velocity evaluation.

Used by collection, training and visualisation; sampling goes through ComfyUI's own KSampler path instead. A call
goes through ComfyUI's own conditioning path (CLIP's encode_from_tokens_scheduled as CLIPTextEncode does, then the
model's extra_conds and the sampler's cond helpers), so text padding, the pooled vector or its absence, the guidance
default, latent format and channel count are exactly those sampling uses, for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch

from ..saferope_core.errors import PromptAlignmentError
from .flux_adapter import call_options

POOLED_ONLY_TOKENIZERS = ("l", "g")  # CLIP-L / CLIP-G give FLUX.1's pooled vector, not its context
TOKENS_PER_PIXEL_SIDE = 16  # every FLUX-family model sees one image token per 16 x 16 pixels


@dataclass
class EncodedPrompt:
    """A prompt as CLIPTextEncode encodes it, with the context tokenizer's ids (template and padding included)."""

    text: str
    token_ids: list[int]
    conditioning: list  # ComfyUI CONDITIONING: [[context [1, L, C], {"pooled_output": ..., ...}]]

    @property
    def context(self) -> torch.Tensor:
        return self.conditioning[0][0]

    @property
    def pooled(self) -> torch.Tensor | None:
        """The pooled vector (FLUX.1's CLIP-L); None for encoders that give none."""
        return self.conditioning[0][1].get("pooled_output")

    @property
    def cut(self) -> int:
        """Leading tokens the text encoder dropped from its output (Ovis-Image cuts its chat template's start)."""
        return len(self.token_ids) - self.context.shape[1]

    def context_positions(self, token_positions: list[int], model_context: torch.Tensor) -> list[int]:
        """Where tokens sit in the context the model receives (tokens the encoder cut are left out): the model may
        pad the text on the left (FLUX.2 pads it to 512 tokens)."""
        shift = _padding_before(self.context, model_context) - self.cut
        return [p + shift for p in token_positions if p >= self.cut]


def _padding_before(context: torch.Tensor, model_context: torch.Tensor) -> int:
    length, total = context.shape[1], model_context.shape[1]
    mine = context[0].float().cpu()
    for start in dict.fromkeys((total - length, 0)):
        if start >= 0 and torch.equal(model_context[0, start : start + length].float().cpu(), mine):
            return start
    raise PromptAlignmentError(
        f"the model's text context ({total} tokens) does not contain the encoded prompt "
        f"({length} tokens) at its start or end"
    )


def context_tokenizer_key(tokens: dict) -> str:
    """The tokenizer whose tokens become the model's context: the only one, or the first that is not CLIP-L/G."""
    return next((k for k in tokens if k not in POOLED_ONLY_TOKENIZERS), next(iter(tokens)))


def context_tokenizer(clip):
    """The Hugging Face tokenizer behind the context tokenizer (for its piece strings), or None."""
    key = context_tokenizer_key(clip.tokenize(""))
    sub = getattr(clip.tokenizer, key, None) or getattr(clip.tokenizer, f"clip_{key}", None)
    return getattr(sub, "tokenizer", None)


def context_token_ids(clip, text: str) -> list[int]:
    """Token ids of `text` in the tokenizer that produces the model's context (T5-XXL for FLUX.1 and Chroma, the
    LLM's tokenizer with its chat template for FLUX.2 and Ovis-Image)."""
    tokens = clip.tokenize(text)
    return [int(t[0]) for batch in tokens[context_tokenizer_key(tokens)] for t in batch]


def encode_prompt(clip, text: str) -> EncodedPrompt:
    tokens = clip.tokenize(text)
    conditioning = clip.encode_from_tokens_scheduled(tokens, show_pbar=False)
    ids = [int(t[0]) for batch in tokens[context_tokenizer_key(tokens)] for t in batch]
    length = conditioning[0][0].shape[1]
    if length > len(ids):
        raise PromptAlignmentError(
            f"the text encoder's tokens ({len(ids)}) do not line up with its conditioning "
            f"({length} tokens); use the text encoder made for this model"
        )
    return EncodedPrompt(text, ids, conditioning)


def load_model(patcher) -> torch.device:
    """Load the patcher's model, and the models it carries (a prompt redirector's weights), onto its device the way
    samplers do; returns that device."""
    comfy.model_management.load_models_gpu([patcher, *patcher.get_nested_additional_models()])
    return patcher.load_device


def model_inputs(patcher, prompt: EncodedPrompt, x: torch.Tensor) -> dict:
    """apply_model's keyword inputs for `prompt` at latent x, built as the sampler builds them."""
    conds = comfy.sampler_helpers.convert_cond(prompt.conditioning[:1])
    conds = comfy.samplers.encode_model_conds(patcher.model.extra_conds, conds, x, x.device, "positive")
    parts = {k: c.process_cond(batch_size=x.shape[0], area=None) for k, c in conds[0]["model_conds"].items()}
    return comfy.samplers.cond_cat([parts])


def velocity(
    patcher, x: torch.Tensor, sigma: torch.Tensor, prompt: EncodedPrompt, options: dict | None = None
) -> torch.Tensor:
    """The model's velocity v(x, sigma, prompt) in float32 (ComfyUI returns the denoised x0 = x - sigma * v).

    `options`: transformer_options for this call; by default the patcher's own, wrappers merged in.
    """
    inputs = model_inputs(patcher, prompt, x)
    sigma = sigma.to(x.device).reshape(-1).expand(x.shape[0])
    opts = call_options(patcher) if options is None else options
    denoised = patcher.model.apply_model(x, sigma, transformer_options=opts, **inputs)
    return (x.float() - denoised.float()) / sigma.float().reshape(-1, *([1] * (x.ndim - 1)))


def latent_shape(patcher, width: int, height: int) -> tuple[int, int, int]:
    """Latent [C, H, W] of an image size for this model: its latent format's channels, and a downscale that gives
    one image token per 16 x 16 pixels (FLUX.1 and Chroma: 8x VAE + 2x2 patches; FLUX.2: 16x VAE + 1x1; Chroma
    Radiance: pixels + 16x16 patches)."""
    channels = patcher.model.latent_format.latent_channels
    scale = TOKENS_PER_PIXEL_SIDE // patcher.model.diffusion_model.patch_size
    return channels, height // scale, width // scale


def run_prompts(patcher, clip, texts: list[str], sigmas: list[float], size, seed: int, aim) -> None:
    """One velocity call per prompt and sigma from seeded noise (drawn per prompt, in order), with ComfyUI's progress
    bar and cancel: what collection runs while an editor records. `aim(index, prompt, first_noise)` is called before
    a prompt's calls, to point the editor at it; it returns False to skip the prompt."""
    device = load_model(patcher)
    generator = torch.Generator().manual_seed(seed)
    progress = comfy.utils.ProgressBar(len(texts) * len(sigmas))
    for index, text in enumerate(texts):
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt = encode_prompt(clip, text)
        noises = [torch.randn((1, *size), generator=generator).to(device) for _ in sigmas]
        if not aim(index, prompt, noises[0]):
            progress.update(len(sigmas))
            continue
        for sigma, noise in zip(sigmas, noises, strict=True):
            velocity(patcher, noise, torch.tensor([sigma]), prompt)
            progress.update(1)
