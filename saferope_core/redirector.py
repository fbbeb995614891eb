"""Prompt redirection (SafeRedir, arXiv 2601.08623) for a FLUX-family text conditioning; no ComfyUI here.

A `PromptRedirector` has two parts that work on the text conditioning [B, L, width] the transformer receives:
- a detector: does this sample become unsafe? It fuses the prompt (its tokens), the current latent (per-channel
  mean and spread) and the noise level: latent and noise level form a query that attends over the prompt's tokens,
  and an MLP turns the result into a logit (the paper's ablation: text alone misses adversarial paraphrases;
  `detector="text"` is that ablation: latent and noise level are ignored);
- a redirector: per token a direction (low rank, like a LoRA adapter), a scale in [0, 1] and a soft mask in [0, 1];
  the redirected conditioning is context + mask * scale * direction, so tokens with mask 0 stay exactly as they are.

Widths come from the model (T5 4096 for FLUX.1 and Chroma, Qwen/Mistral widths for FLUX.2 and Ovis), never fixed.
Files are safetensors (the module's parameters) with versioned metadata and a content hash, validated on load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import RedirectorError
from .files import check_header, hashed, read_safetensors, write_file
from .shape import FAMILIES

REDIRECTOR_KIND = "saferope.prompt_redirector"
REDIRECTOR_VERSION = 1
SIGMA_FEATURES = 16  # sinusoidal features of the noise level
DETECTORS = ("fused", "text")


@dataclass(frozen=True)
class RedirectorConfig:
    family: str  # the model family it was trained on (shape.FAMILIES)
    width: int  # conditioning width (the text encoder's hidden size as the model receives it)
    latent_channels: int  # channels of the model's latent
    hidden: int = 256
    rank: int = 16  # rank of the direction generator
    detector: str = "fused"  # "fused": prompt + latent + noise level; "text": the prompt alone (the ablation)

    def check(self) -> None:
        """Raises ValueError for a config no model can use."""
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}")
        for name in ("width", "latent_channels", "hidden", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65536:
                raise ValueError(f"{name} must be a whole number from 1 to 65536, not {value!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, not {self.detector!r}")
        if self.hidden % 4:
            raise ValueError(f"hidden must be a multiple of 4 (attention heads), not {self.hidden}")


def sigma_features(sigma: torch.Tensor) -> torch.Tensor:
    """[B] noise levels in [0, 1] -> [B, SIGMA_FEATURES] sines and cosines at geometric frequencies."""
    freqs = torch.exp(torch.linspace(0, math.log(1000), SIGMA_FEATURES // 2, device=sigma.device))
    angles = sigma.float().reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def latent_features(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, ...] latent -> [B, 2C]: per-channel mean and standard deviation (any spatial size)."""
    flat = latent.float().flatten(2)
    return torch.cat([flat.mean(-1), flat.std(-1, unbiased=False)], dim=-1)


class PromptRedirector(nn.Module):
    def __init__(self, config: RedirectorConfig):
        super().__init__()
        config.check()
        self.config = config
        w, h = config.width, config.hidden
        self.text_in = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, h))
        self.state_in = nn.Sequential(nn.Linear(2 * config.latent_channels + SIGMA_FEATURES, h), nn.SiLU())
        self.fuse = nn.MultiheadAttention(h, 4, batch_first=True)
        self.classify = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))
        self.token_in = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, h), nn.SiLU())
        self.direction = nn.Sequential(nn.Linear(h, config.rank, bias=False), nn.Linear(config.rank, w, bias=False))
        self.scale = nn.Linear(h, 1)
        self.mask = nn.Linear(h, 1)
        self.concept = ""  # what it was trained to redirect, and how (written into its file)
        self.recipe: dict = {}

    def unsafe_logit(
        self, context: torch.Tensor, latent: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Detector logit per sample [B] (> 0: unsafe) from the conditioning [B, L, width], the latent [B, C, ...]
        and the noise level [B]; `valid` [B, L] (True: a token of the prompt) hides padding from the fusion."""
        tokens = self.text_in(context.float())
        features = torch.cat([latent_features(latent), sigma_features(sigma)], dim=-1)
        if self.config.detector == "text":  # the prompt alone decides: a constant query
            features = torch.zeros_like(features)
        state = self.state_in(features)[:, None]
        padding = None if valid is None else ~valid.bool()
        fused, _ = self.fuse(state, tokens, tokens, key_padding_mask=padding, need_weights=False)
        return self.classify(fused[:, 0] + state[:, 0])[:, 0]

    def token_edit(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(direction [B, L, width], scale [B, L, 1], mask [B, L, 1]) per token."""
        features = self.token_in(context.float())
        return self.direction(features), torch.sigmoid(self.scale(features)), torch.sigmoid(self.mask(features))

    def redirect(self, context: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The redirected conditioning context + strength * mask * scale * direction, in context's dtype."""
        direction, scale, mask = self.token_edit(context)
        return (context.float() + strength * mask * scale * direction).to(context.dtype)

    # --- files ------------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().float().cpu() for name, t in self.state_dict().items()}

    def metadata(self, concept: str, recipe: dict) -> dict:
        """The file's metadata, with the content hash of this redirector's tensors."""
        meta = {
            "kind": REDIRECTOR_KIND,
            "format_version": REDIRECTOR_VERSION,
            "config": asdict(self.config),
            "concept": concept,
            "recipe": recipe,
        }
        return hashed(self.tensors(), meta)

    def save(self, path, concept: str, recipe: dict) -> None:
        write_file(path, self.tensors(), self.metadata(concept, recipe))

    @classmethod
    def load(cls, path) -> tuple[PromptRedirector, dict]:
        """(redirector, metadata) of a saved file; RedirectorError saying what is wrong."""
        tensors, meta = read_safetensors(path, RedirectorError)
        return cls.from_parts(tensors, meta, Path(path).name)

    @classmethod
    def from_parts(cls, tensors: dict, meta: dict, name: str) -> tuple[PromptRedirector, dict]:
        """(redirector, metadata) from a file's tensors and metadata, validated; RedirectorError naming `name`."""
        check_header(tensors, meta, name, REDIRECTOR_KIND, REDIRECTOR_VERSION, "prompt redirector", RedirectorError)
        try:
            config = RedirectorConfig(**meta.get("config", {}))
            model = cls(config)
        except (TypeError, ValueError) as err:
            raise RedirectorError(f"{name}: unusable config ({err})") from None
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            wrong = sorted(set(expected.items()) ^ set(found.items()))[:2]
            raise RedirectorError(f"{name}: tensors do not match its config (e.g. {wrong})")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise RedirectorError(f"{name}: tensors contain NaN or Inf")
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        model.concept, model.recipe = meta.get("concept", ""), dict(meta.get("recipe", {}))
        return model.train(False), meta


class Redirection:
    """Per-sample decisions of one sampling run: a sample the detector flags is redirected, and stays redirected
    for `cooldown` more model calls whatever the detector then says (the paper's fix for images flickering between
    the unsafe and the safe version). Samples are keyed by the caller (batch index and CFG branch)."""

    def __init__(self, redirector: PromptRedirector, strength: float = 1.0, threshold: float = 0.0, cooldown: int = 3):
        self.redirector, self.strength, self.threshold, self.cooldown = redirector, strength, threshold, cooldown
        self.left: dict[object, int] = {}  # sample key -> model calls it stays redirected without detection

    @torch.no_grad()
    def __call__(
        self, keys: list, context: torch.Tensor, latent: torch.Tensor, sigma: torch.Tensor, valid=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning, flagged [B] bool) for one model call; `context` itself (no copy) when nothing is flagged,
        so an unflagged call is bit-identical to the unpatched model."""
        held = torch.tensor([self.left.get(k, 0) > 0 for k in keys], device=context.device)
        logits = self.redirector.unsafe_logit(context, latent, sigma.expand(len(keys)), valid)
        flagged = held | (logits > self.threshold)
        for k, was_held, now in zip(keys, held.tolist(), flagged.tolist(), strict=True):
            self.left[k] = self.left.get(k, 0) - 1 if was_held else (self.cooldown if now else 0)
        if not bool(flagged.any()):
            return context, flagged
        redirected = self.redirector.redirect(context, self.strength)
        return torch.where(flagged[:, None, None], redirected, context), flagged
