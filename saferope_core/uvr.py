"""UVR (Unified Visual Safety Regulator), training-free: find unsafe output patches early, restrict flow into them.

Anchors: per head of one detection block, a few unit directions of the attention outputs (before the output
projection) of image tokens of unsafe prompts, taken relative to the mean output of safe prompts (k-means on the
reservoir), plus a threshold calibrated between unsafe and safe scores. Score of a patch: cosine of its per-head
output (minus the safe mean) with the nearest anchor, averaged over heads. Mask: threshold, drop small connected
components, smooth, and a ring around the core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import AnchorsError
from .files import check_header, read_safetensors, write_file
from .shape import ModelShape
from .statistics import QKStatistics, site_name

ANCHORS_KIND = "saferope.uvr_anchors"
ANCHORS_VERSION = 1


@dataclass
class UVRAnchors:
    shape: ModelShape
    block: str  # detection block, e.g. 'single.10'
    anchors: torch.Tensor  # [H, k, D] unit vectors
    safe_mean: torch.Tensor  # [H, D]
    threshold: float  # calibrated score threshold
    sigma_start: float  # the start-up range the anchors were collected in (sigma >= sigma_start)
    concepts: list[str]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"anchors": self.anchors, "safe_mean": self.safe_mean}

    def metadata(self) -> dict:
        return {
            "kind": ANCHORS_KIND,
            "format_version": ANCHORS_VERSION,
            "model": self.shape.to_dict(),
            "block": self.block,
            "threshold": self.threshold,
            "sigma_start": self.sigma_start,
            "concepts": self.concepts,
        }

    def save(self, path) -> None:
        write_file(path, self.tensors(), self.metadata())

    @classmethod
    def load(cls, path) -> UVRAnchors:
        """Load saved anchors; raises AnchorsError saying what is wrong."""
        tensors, meta = read_safetensors(path, AnchorsError)
        return cls.from_parts(tensors, meta, Path(path).name)

    @classmethod
    def from_parts(cls, tensors: dict, meta: dict, name: str) -> UVRAnchors:
        """Anchors from a file's tensors and metadata, validated; AnchorsError naming `name` and the problem."""
        check_header(
            tensors,
            meta,
            name,
            ANCHORS_KIND,
            ANCHORS_VERSION,
            "UVR anchors file",
            AnchorsError,
            hash_required=False,  # anchors were written without a hash before December 2026
        )
        try:
            shape = ModelShape.from_dict(meta.get("model"))
        except ValueError as err:
            raise AnchorsError(f"{name}: {err}") from None
        numbers = {key: meta.get(key) for key in ("threshold", "sigma_start")}
        if (
            not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers.values()
            )
            or not -1 <= numbers["threshold"] <= 1
            or not 0 <= numbers["sigma_start"] <= 1
        ):
            raise AnchorsError(f"{name}: threshold and sigma_start must be finite scores ({numbers})")
        block = meta.get("block")
        if block not in [f"single.{i}" for i in range(shape.single_blocks)]:
            raise AnchorsError(
                f"{name}: detection block {block!r} is not a single block of a {shape.single_blocks}-single-block model"
            )
        anchors, mean = tensors.get("anchors"), tensors.get("safe_mean")
        if (
            anchors is None
            or mean is None
            or anchors.ndim != 3
            or tuple(mean.shape) != (shape.heads, shape.head_dim)
            or tuple(anchors.shape[::2]) != (shape.heads, shape.head_dim)
        ):
            raise AnchorsError(f"{name}: anchor tensors are missing or have wrong shapes")
        if not (torch.isfinite(anchors).all() and torch.isfinite(mean).all()):
            raise AnchorsError(f"{name}: anchor tensors contain NaN or Inf")
        return cls(
            shape,
            block,
            anchors.float(),
            mean.float(),
            float(numbers["threshold"]),
            float(numbers["sigma_start"]),
            [str(c) for c in meta.get("concepts", [])],
        )


def patch_scores(outputs: torch.Tensor, anchors: torch.Tensor, safe_mean: torch.Tensor) -> torch.Tensor:
    """Per-token score [N] of per-head outputs [N, H, D]: cosine with the nearest anchor, mean over heads."""
    centred = F.normalize(outputs.float() - safe_mean.to(outputs.device), dim=-1)
    cos = torch.einsum("nhd,hkd->nhk", centred, anchors.to(outputs.device))
    return cos.max(-1).values.mean(-1)


def _kmeans_directions(x: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """k unit directions of unit vectors x [N, D] (spherical k-means)."""
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iterations):
        assign = (x @ centres.T).argmax(-1)
        for j in range(centres.shape[0]):
            members = x[assign == j]
            if members.shape[0]:
                centres[j] = F.normalize(members.sum(0), dim=0)
    return centres


def build_anchors(stats: QKStatistics, block: str, k: int = 4, sigma_start: float = 0.85) -> UVRAnchors:
    """Anchors from collected image-token attention outputs ('<block>.img.o') of unsafe and safe prompts."""
    site = site_name(block, "img", "o")
    unsafe_key, safe_key = stats.key("unsafe", site), stats.key("safe", site)
    for key in (unsafe_key, safe_key):
        if key not in stats.reservoir or stats.reservoir[key].shape[0] < k:
            raise AnchorsError(f"too few vectors collected for {key}: collect more prompts (need at least {k})")
    unsafe, safe = stats.reservoir[unsafe_key].float(), stats.reservoir[safe_key].float()  # [N, H, D]
    safe_mean = safe.mean(0)
    centred = F.normalize(unsafe - safe_mean, dim=-1)
    anchors = torch.stack([_kmeans_directions(centred[:, h], k) for h in range(centred.shape[1])])
    unsafe_scores = patch_scores(unsafe, anchors, safe_mean)
    safe_scores = patch_scores(safe, anchors, safe_mean)
    threshold = 0.5 * float(unsafe_scores.median() + safe_scores.median())
    return UVRAnchors(stats.shape, block, anchors, safe_mean, threshold, sigma_start, list(stats.concepts))


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of boolean masks [B, h, w] (0 = background), by label propagation."""
    b, h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).reshape(1, h, w).repeat(b, 1, 1)
    labels = labels * mask
    for _ in range(h * w):  # each pass spreads the largest label one patch; stops when nothing changes
        neighbours = torch.maximum(
            torch.maximum(F.pad(labels, (0, 0, 1, 0))[:, :-1], F.pad(labels, (0, 0, 0, 1))[:, 1:]),
            torch.maximum(F.pad(labels, (1, 0))[:, :, :-1], F.pad(labels, (0, 1))[:, :, 1:]),
        )
        new = torch.maximum(labels, neighbours) * mask
        if torch.equal(new, labels):
            break
        labels = new
    return labels.long()


def patch_mask(
    scores: torch.Tensor, threshold: float, min_patches: int = 2, blur: int = 1, ring: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(core, ring) boolean masks [B, h, w] from patch scores [B, h, w].

    Threshold, drop connected components smaller than `min_patches`, smooth with a (2*blur+1) box filter (keep where
    the smoothed mask >= 0.4: fills holes, keeps 2x2 regions, drops 1-patch-wide lines), and a ring `ring` patches
    wide around the core.
    """
    binary = scores > threshold
    labels = connected_components(binary)
    core = torch.zeros_like(binary)
    for i in range(labels.shape[0]):
        ids, counts = labels[i][labels[i] > 0].unique(return_counts=True)
        big = ids[counts >= min_patches]
        core[i] = torch.isin(labels[i], big)
    if blur > 0:
        size = 2 * blur + 1
        smoothed = F.avg_pool2d(core.float().unsqueeze(1), size, stride=1, padding=blur, count_include_pad=False)
        core = smoothed.squeeze(1) >= 0.4
    grown = F.max_pool2d(core.float().unsqueeze(1), 2 * ring + 1, stride=1, padding=ring).squeeze(1) > 0
    return core, grown & ~core


def reference_patches(ids: torch.Tensor, image_hw: tuple[int, int], ref_sizes: list[int]) -> torch.Tensor:
    """For each reference token, the output patch (flat index into image_hw) it maps to through its RoPE ids.

    ids: [L_ref, 3] (index, h, w) of the reference tokens, in the order of `ref_sizes` (tokens per reference).
    Each reference's (h, w) ids are taken relative to its own extent and scaled onto the output grid, which holds
    for ComfyUI's offset, index and uxo methods alike.
    """
    h_out, w_out = image_hw
    out, start = [], 0
    for size in ref_sizes:
        part = ids[start : start + size, 1:].float()
        start += size
        lo, hi = part.min(0).values, part.max(0).values
        rel = (part - lo) / (hi - lo + 1)
        row = (rel[:, 0] * h_out).floor().clamp(0, h_out - 1)
        col = (rel[:, 1] * w_out).floor().clamp(0, w_out - 1)
        out.append((row * w_out + col).long())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
