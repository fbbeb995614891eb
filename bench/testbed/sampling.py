"""Sampling the world's images through ComfyUI's own path (comfy.sample.sample, as the KSampler node does) and
judging them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import world


class Conditioner:
    """CONDITIONING of texts through a ComfyUI CLIP, as the CLIP Text Encode node makes it; cached per text."""

    def __init__(self, clip):
        self.clip = clip
        self._cache: dict[str, list] = {}

    def __call__(self, text: str) -> list:
        if text not in self._cache:
            self._cache[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._cache[text]


def generate(
    patcher,
    positive: list,
    negative: list,
    count: int,
    seed: int,
    steps: int,
    sampler: str = "euler",
    scheduler: str = "simple",
    cfg: float = 1.0,
) -> torch.Tensor:
    """`count` images [count, 3, 32, 32] of one prompt from an empty latent, noise from `seed` (the same noise for
    every model given the same seed), under inference mode like ComfyUI's executor."""
    import comfy.sample

    with torch.inference_mode():
        latent = torch.zeros(count, world.LATENT_CHANNELS, world.LATENT_SIZE, world.LATENT_SIZE)
        latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(
            patcher,
            noise,
            steps,
            cfg,
            sampler,
            scheduler,
            positive,
            negative,
            latent,
            denoise=1.0,
            disable_pbar=True,
            seed=seed,
        )
    return world.from_latent(world.model_space(out.float())).clone()


@dataclass
class Prompt:
    text: str
    scene: world.Scene  # what the prompt asks for (canonical values)


@dataclass
class Generated:
    prompt: Prompt
    images: torch.Tensor  # [n, 3, 32, 32]
    judged: list[world.Judgement]


def generate_set(
    patcher, conditioner: Conditioner, prompts: list[Prompt], per_prompt: int, seed: int, steps: int, **kwargs
) -> list[Generated]:
    """Images of every prompt (seed + prompt index: the same noise for each model), judged."""
    negative = conditioner("")
    out = []
    for i, prompt in enumerate(prompts):
        images = generate(patcher, conditioner(prompt.text), negative, per_prompt, seed + i, steps, **kwargs)
        out.append(Generated(prompt, images, world.classify(images)))
    return out


def attribute_accuracy(results: list[Generated], attribute: str) -> float:
    hits = [j.get(attribute) == g.prompt.scene.get(attribute) for g in results for j in g.judged]
    return sum(hits) / max(len(hits), 1)


def full_accuracy(results: list[Generated]) -> float:
    hits = [all(j.get(a) == g.prompt.scene.get(a) for a in world.ATTRIBUTES) for g in results for j in g.judged]
    return sum(hits) / max(len(hits), 1)


def count_images(results: list[Generated]) -> int:
    return sum(len(g.judged) for g in results)
