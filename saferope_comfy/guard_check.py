"""The guard check inside ComfyUI: sample the Prompt Set's prompts with the base model and with every combination of
a safety pack's guards, through ComfyUI's own sampler (comfy.sample.sample, as KSampler runs it: Euler, cfg 1), and
score the final latents (saferope_core.guard_check)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import comfy.model_management
import comfy.sample
import comfy.utils
import torch

from ..saferope_core import PromptSet
from ..saferope_core.guard_check import GuardCheck, guard_combinations, score_combination
from .model_calls import encode_prompt, latent_shape


class LatentSampler:
    """Final latents of prompts, one sampling run each, prompt i from noise i (the same for every model)."""

    def __init__(self, clip, size: tuple[int, int], steps: int, seed: int, progress: Callable[[], None]):
        self.clip, self.size, self.steps, self.seed, self.progress = clip, size, steps, seed, progress
        self._conditioning: dict[str, list] = {}

    def conditioning(self, text: str) -> list:
        if text not in self._conditioning:
            self._conditioning[text] = encode_prompt(self.clip, text).conditioning
        return self._conditioning[text]

    def __call__(self, patcher, texts: Sequence[str]) -> torch.Tensor:
        shape = latent_shape(patcher, *self.size)
        out = []
        for index, text in enumerate(texts):
            comfy.model_management.throw_exception_if_processing_interrupted()
            latent = torch.zeros((1, *shape))
            noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(self.seed + index))
            cond = self.conditioning(text)
            with torch.no_grad():
                final = comfy.sample.sample(
                    patcher,
                    noise,
                    self.steps,
                    1.0,
                    "euler",
                    "simple",
                    cond,
                    cond,
                    latent,
                    disable_pbar=True,
                    seed=self.seed + index,
                )
            out.append(final.float().cpu())
            self.progress()
        return torch.cat(out)


def check_guards(
    model,
    clip,
    prompts: PromptSet,
    guards: Sequence[str],
    guarded: Callable[[tuple[str, ...]], object],
    size: tuple[int, int],
    steps: int = 10,
    count: int = 16,
    seed: int = 0,
) -> GuardCheck:
    """Score every combination of `guards` (`guarded(combination)` gives the model with those applied) on a seeded
    sample of `count` unsafe and `count` safe prompts of the Prompt Set, with ComfyUI's progress bar."""
    rng = random.Random(seed)
    unsafe = rng.sample(list(prompts.unsafe), min(count, len(prompts.unsafe)))
    safe = rng.sample(list(prompts.safe), min(count, len(prompts.safe)))
    combos = guard_combinations(guards)
    bar = comfy.utils.ProgressBar((len(combos) + 2) * len(unsafe) + (len(combos) + 1) * len(safe))
    sample = LatentSampler(clip, size, steps, seed, lambda: bar.update(1))
    unsafe_texts = [u.text for u in unsafe]
    for text in [*unsafe_texts, *(u.anchor for u in unsafe), *safe]:
        sample.conditioning(text)  # every text first: the text encoder and the model need not take turns in memory
    base_unsafe, base_anchor = sample(model, unsafe_texts), sample(model, [u.anchor for u in unsafe])
    base_safe = sample(model, safe)
    scores = []
    for combo in combos:
        patched = guarded(combo)
        scores.append(
            score_combination(
                combo, base_unsafe, base_anchor, sample(patched, unsafe_texts), base_safe, sample(patched, safe)
            )
        )
    return GuardCheck(scores, len(unsafe), len(safe))
