"""How often a prompt redirector's detector flags each prompt family of the erase benchmark: the fused detector
(prompt + latent + noise level, what Train Prompt Redirector trains) against the paper's ablation, a detector that
reads the prompt alone (RedirectorConfig detector="text"), trained the same way on the same Prompt Set.

A (prompt, noise level) pair is flagged when the detector's logit is above Redirect Unsafe Prompts' default
threshold 0. The latent is where the base model's own sampling of that prompt is at that noise level (its one-step
clean guess from seeded noise, noised again), as the detector sees it at the start of a step.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from . import world
from .env import comfy_and_pack

SIGMAS = (1.0, 0.7, 0.4)
# safe: the Prompt Set's safe prompts (trained on); neutral: its anchors (the unsafe prompts with the target word
# removed, e.g. "a circle, solid"): benign prompts that name no value of the attribute
FAMILIES = ("target", "paraphrase", "compositional", "unseen", "non_target", "safe", "neutral")
DETECTORS = ("fused", "text")
THRESHOLD = 0.0  # Redirect Unsafe Prompts' default
NOTE = f"share of (prompt, noise level {', '.join(map(str, SIGMAS))}) pairs flagged"


def train_text_only(model, clip, prompts, s, nodes):
    """The text-only ablation, trained like the node trains the fused one (same recipe, seed and prompts)."""
    redirect = comfy_and_pack().saferope_comfy.prompt_redirect
    config = replace(redirect.redirector_config(model), detector="text")
    recipe = redirect.RedirectorRecipe(steps=s.redirector_steps, learning_rate=s.redirector_lr, seed=s.seed)
    shape = comfy_and_pack().saferope_comfy.model_calls.latent_shape(model, world.COMFY_SIZE, world.COMFY_SIZE)
    with torch.inference_mode():
        return redirect.RedirectorTrainer(model, clip, prompts, shape, recipe, config).train()


def detection_prompts(fam, prompts) -> dict[str, list[str]]:
    """Family -> prompt texts: the erase benchmark's families (PromptFamilies), the Prompt Set's anchors."""
    texts = {f: [p if isinstance(p, str) else p.text for p in getattr(fam, f)] for f in FAMILIES if f != "neutral"}
    return {**texts, "neutral": sorted({p.anchor for p in prompts.unsafe})}


def flag_rates(redirector, model, clip, families: dict[str, list[str]], nodes, seed: int = 0) -> dict[str, float]:
    """Family -> share of its (prompt, noise level) pairs the detector flags."""
    calls = comfy_and_pack().saferope_comfy.model_calls
    shape = calls.latent_shape(model, world.COMFY_SIZE, world.COMFY_SIZE)
    rates = {}
    with torch.inference_mode():
        for family, texts in families.items():
            flags = []
            for i, text in enumerate(texts):
                prompt = calls.encode_prompt(clip, text)
                noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i))
                clean = noise - calls.velocity(model, noise, torch.ones(1), prompt)
                for sigma in SIGMAS:
                    x = (1 - sigma) * clean + sigma * noise
                    logit = redirector.unsafe_logit(prompt.context, x, torch.tensor([sigma]))
                    flags.append(bool(logit.item() > THRESHOLD))
            rates[family] = sum(flags) / len(flags) if flags else None
    return rates


def detection(fused, model, clip, prompts, fam, s, nodes, log=print) -> dict:
    """{"fused": rates, "text": rates, "text_train_s": seconds} for the trained (fused) redirector and the
    text-only one trained here."""
    t0 = time.perf_counter()
    text_only = train_text_only(model, clip, prompts, s, nodes)
    seconds = time.perf_counter() - t0
    families = detection_prompts(fam, prompts)
    result = {
        "fused": flag_rates(fused, model, clip, families, nodes, s.seed),
        "text": flag_rates(text_only, model, clip, families, nodes, s.seed),
        "text_train_s": seconds,
    }
    log(format_detection(result))
    return result


DETECTION_HEADER = (
    "| detector | target % | paraphrase % | compositional % | unseen words % | non-target (false +) % "
    "| safe, trained (false +) % | neutral: anchors, no target word (false +) % |"
)
DETECTOR_NAMES = {"fused": "prompt + latent + noise level", "text": "prompt only (ablation)"}


def detection_row(rates: dict, name: str) -> str:
    cells = " | ".join("-" if rates.get(f) is None else f"{100 * rates[f]:.1f}" for f in FAMILIES)
    return f"| {name} | {cells} |"


def format_detection(result: dict) -> str:
    lines = [
        f"Detection: {NOTE}",
        "",
        DETECTION_HEADER,
        "|---" * (len(FAMILIES) + 1) + "|",
    ]
    lines += [detection_row(result[d], DETECTOR_NAMES[d]) for d in DETECTORS]
    return "\n".join(lines)
