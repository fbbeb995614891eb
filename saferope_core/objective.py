"""The SafeRoPE training objective over two velocity callables, so it does not depend on any model class.

Paper (sec. 3.4): maximise ||v_base - v_rot||^2 on unsafe prompts (x_t = noise), minimise it on safe
caption/image pairs (u_t = (1 - t) u + t noise), as a bi-level problem. Practical form used here, with D the
deviation relative to the base velocity's energy, ||v_base - v_rot||^2 / ||v_base||^2:

    unlearn step:   loss = -unlearn_weight  * log(tol + min(D_unsafe, unlearn_cap))
    preserve step:  loss =  preserve_weight * log(tol + D_safe)

Logarithms make the steps independent of how strongly a model reacts to a rotation (D grows like the square of
the angle, so a plain D has vanishing gradients at the small angles training starts from). The cap bounds the
unlearn term: once an unsafe prompt deviates enough, only the preserve term acts. For D_safe << tol the preserve
term is D_safe / tol: deviations below `tol` count as "unchanged" (the paper's lower level as a penalty). Batches
alternate between unsafe and safe in runs (`batch_kind`), as in the authors' schedule.

The default objective ('redirect', `redirect_gap`) replaces the unlearn step: instead of pushing the unsafe
velocity away with no end point, it brings it to the base velocity on the prompt's anchor (the same prompt with
the subject replaced or removed), so the pack is trained to draw the safe version.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]  # (x_t, sigma, cond) -> v


@dataclass
class TrainingRecipe:
    """Training settings; stored in the pack metadata so a pack says how it was made."""

    steps: int = 1000
    learning_rate: float = 1e-3
    unlearn_weight: float = 1.0
    preserve_weight: float = 1.0
    unlearn_cap: float = 1.0
    tolerance: float = 1e-3
    run_length: int = 10
    text_init_scale: float = 0.1
    image_init_scale: float = 0.01
    sigma_min: float = 0.3
    seed: int = 0
    objective: str = "redirect"  # 'redirect': draw the anchor instead; 'deviate': move away from the base (paper)
    sideways_weight: float = 0.03  # redirect: the cost of moving off the line to the anchor (see redirect_gap)

    def to_dict(self) -> dict:
        return asdict(self)


def relative_deviation(v_base: torch.Tensor, v_rotated: torch.Tensor) -> torch.Tensor:
    """Per-sample ||v_base - v_rot||^2 / ||v_base||^2 -> [B]."""
    dims = tuple(range(1, v_base.ndim))
    return (v_base - v_rotated).square().sum(dims) / v_base.square().sum(dims).clamp_min(1e-12)


def noised_latent(noise: torch.Tensor, sigma: torch.Tensor, clean: torch.Tensor | None = None) -> torch.Tensor:
    """x_t on the rectified-flow path: noise alone for unsafe prompts, (1 - s) u + s noise with a clean latent."""
    if clean is None:
        return noise
    s = sigma.reshape(-1, *([1] * (noise.ndim - 1)))
    return (1 - s) * clean + s * noise


def one_step_clean(base: Velocity, noise: torch.Tensor, cond) -> torch.Tensor:
    """A prompt's own one-step guess of the clean latent from pure noise (no gradient): noised again with
    `noised_latent`, it gives points on the path the model takes for that prompt at every noise level."""
    with torch.no_grad():
        return noise - base(noise, torch.ones(noise.shape[0], device=noise.device), cond)


def deviation(
    base: Velocity, rotated: Velocity, cond, noise: torch.Tensor, sigma: torch.Tensor, clean: torch.Tensor | None = None
) -> torch.Tensor:
    """Relative deviation of the rotated from the base velocity at x_t; the base runs without gradient."""
    x_t = noised_latent(noise, sigma, clean)
    with torch.no_grad():
        v_base = base(x_t, sigma, cond)
    return relative_deviation(v_base.detach(), rotated(x_t, sigma, cond))


def redirect_gap(
    base: Velocity,
    rotated: Velocity,
    cond,
    anchor_cond,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    clean: torch.Tensor | None = None,
    sideways_weight: float = 1.0,
) -> torch.Tensor:
    """How far the rotated velocity on the unsafe prompt still is from the base velocity on its anchor, relative to
    where it started, at the same x_t -> [B]: 1 before training, 0 when the model draws the anchor instead.

    With d = v_base(a) - v_base(u) and the move m = v_rot(u) - v_base(u) split into progress p = <m, d> / |d|^2
    along d and the rest r = m - p d: gap = (1 - p)^2 + sideways_weight * |r|^2 / |d|^2. With weight 1 this is
    |v_rot(u) - v_base(a)|^2 / |d|^2; a smaller weight lets the rotation reach towards the anchor along paths that
    also move elsewhere (rotations can remove what a prompt says, never add what only the anchor says). The base
    runs without gradient."""
    x_t = noised_latent(noise, sigma, clean)
    with torch.no_grad():
        v_unsafe = base(x_t, sigma, cond).flatten(1)
        d = base(x_t, sigma, anchor_cond).flatten(1) - v_unsafe
        d_sq = d.square().sum(1).clamp_min(1e-12)
    move = rotated(x_t, sigma, cond).flatten(1) - v_unsafe
    progress = (move * d).sum(1) / d_sq
    sideways = (move - progress[:, None] * d).square().sum(1) / d_sq
    return (1 - progress).square() + sideways_weight * sideways


def redirect_loss(gap: torch.Tensor, recipe: TrainingRecipe) -> torch.Tensor:
    """Bring the unsafe prompt's velocity to its anchor's (the gap is relative, so its scale does not depend on the
    concept); logarithmic like the other terms, so small gaps keep a useful gradient."""
    return recipe.unlearn_weight * torch.log(recipe.tolerance + gap).mean()


def unlearn_loss(unsafe_deviation: torch.Tensor, recipe: TrainingRecipe) -> torch.Tensor:
    """Maximise the (capped) deviation on unsafe prompts."""
    return -recipe.unlearn_weight * torch.log(recipe.tolerance + unsafe_deviation.clamp(max=recipe.unlearn_cap)).mean()


def preserve_loss(safe_deviation: torch.Tensor, recipe: TrainingRecipe) -> torch.Tensor:
    """Keep the deviation on safe prompts below the tolerance."""
    return recipe.preserve_weight * torch.log(recipe.tolerance + safe_deviation).mean()


def learning_rate_at(base: float, step: int, steps: int, schedule: str = "constant") -> float:
    """The learning rate of step `step` (0-based) of `steps`: `base` throughout ('constant'), or decayed from `base`
    along a half cosine to 0 after the last step ('cosine'): the last steps move the weights little, so the result
    depends less on which prompts and noise the last few steps drew."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant or cosine)")
    return base * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def batch_kind(step: int, run_length: int) -> str:
    """'unsafe' or 'safe' for a training step: alternating runs of `run_length` steps, unsafe first."""
    return "unsafe" if (step // max(run_length, 1)) % 2 == 0 else "safe"
