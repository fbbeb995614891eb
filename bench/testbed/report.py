"""Reports: the classifier on ground truth, the base model's prompt following, the before/after demo grid."""

from __future__ import annotations

import collections
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-k.square() / (2 * sigma * sigma))
    k = k / k.sum()
    x = images.reshape(-1, 1, world.SIZE, world.SIZE)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))
    return x.reshape(images.shape)


def classifier_accuracy(count: int = 1500, seed: int = 1) -> str:
    """Per-attribute accuracy of world.classify on rendered scenes: clean, Gaussian-blurred, with pixel noise."""
    scenes = world.random_scenes(count, seed)
    clean = world.render(scenes, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    variants = {
        "clean": clean,
        "blur sigma 0.7": _gaussian_blur(clean, 0.7),
        "blur sigma 1.0": _gaussian_blur(clean, 1.0),
        "noise std 0.08": (clean + 0.08 * torch.randn(clean.shape, generator=g)).clamp(0, 1),
    }
    lines = [
        f"classifier accuracy on {count} rendered scenes (seed {seed}), %",
        "",
        "| images | colour | shape | pattern | all three |",
        "|---|---|---|---|---|",
    ]
    for name, images in variants.items():
        judged = world.classify(images)
        acc = {
            a: sum(j.get(a) == sc.get(a) for j, sc in zip(judged, scenes, strict=True)) / count
            for a in world.ATTRIBUTES
        }
        full = sum(all(j.get(a) == sc.get(a) for a in world.ATTRIBUTES) for j, sc in zip(judged, scenes, strict=True))
        lines.append(
            f"| {name} | {100 * acc['colour']:.1f} | {100 * acc['shape']:.1f} | "
            f"{100 * acc['pattern']:.1f} | {100 * full / count:.1f} |"
        )
    return "\n".join(lines)


def base_accuracy(
    model_path: Path | None = None,
    steps: int = 20,
    per_prompt: int = 2,
    seed: int = 0,
    templates: str = "all",
    synonyms: bool = False,
    threads: int = 1,
) -> str:
    """Attribute accuracy of the base model's samples (Euler, cfg 1) on every scene x template, judged."""
    from . import model as base_model
    from .env import comfy_and_pack
    from .erase import PACK_TEMPLATES
    from .sampling import Conditioner, Prompt, generate_set
    from .text_encoder import minilm_clip

    torch.set_num_threads(threads)
    comfy_and_pack()
    patcher = base_model.load(model_path) if model_path else base_model.load()
    conditioner = Conditioner(minilm_clip())
    chosen = PACK_TEMPLATES if templates == "pack" else world.TRAIN_TEMPLATES
    prompts = [Prompt(world.caption(sc, t), sc) for t in chosen for sc in world.all_scenes()]
    if synonyms:
        for sc in world.all_scenes():
            for a in world.ATTRIBUTES:
                for word in world.SYNONYMS[sc.get(a)][1:]:
                    prompts.append(Prompt(world.caption(sc, chosen[0], {a: word}), sc))
    results = generate_set(patcher, conditioner, prompts, per_prompt, seed, steps)
    lines = [f"base model accuracy, {len(prompts)} prompts x {per_prompt} images, Euler {steps} steps, cfg 1, %", ""]
    per_value = collections.defaultdict(list)
    for g in results:
        for j in g.judged:
            for a in world.ATTRIBUTES:
                per_value[(a, g.prompt.scene.get(a))].append(j.get(a) == g.prompt.scene.get(a))
            per_value[("all", "all")].append(all(j.get(a) == g.prompt.scene.get(a) for a in world.ATTRIBUTES))
    for a in world.ATTRIBUTES:
        hits = [h for (attr, _), v in per_value.items() if attr == a for h in v]
        parts = ", ".join(
            f"{v} {100 * sum(per_value[(a, v)]) / len(per_value[(a, v)]):.0f}" for v in world.ATTRIBUTES[a]
        )
        lines.append(f"{a}: {100 * sum(hits) / len(hits):.1f}  ({parts})")
    full = per_value[("all", "all")]
    lines.append(f"all three attributes right: {100 * sum(full) / len(full):.1f}")
    return "\n".join(lines)


def word_following(steps: int = 20, per_prompt: int = 2, seed: int = 0, threads: int = 1, model=None) -> str:
    """How often the base model draws each unseen candidate word (world.UNSEEN_CANDIDATES) as its value, in the
    pack templates over every combination of the other attributes (the canonical word alongside, for reference).
    `model`: a base model's patcher (default: the committed model)."""
    from . import model as base_model
    from .env import comfy_and_pack
    from .erase import PACK_TEMPLATES
    from .sampling import Conditioner, Prompt, generate_set
    from .text_encoder import minilm_clip

    torch.set_num_threads(threads)
    comfy_and_pack()
    patcher = model if model is not None else base_model.load()
    conditioner = Conditioner(minilm_clip())
    lines = [f"base model following of unseen words, Euler {steps} steps, cfg 1, % drawn as the value", ""]
    for value, words in world.UNSEEN_CANDIDATES.items():
        attribute = world.attribute_of(value)
        scenes = [sc for sc in world.all_scenes() if sc.get(attribute) == value]
        parts = []
        for word in [value, *words]:
            prompts = [Prompt(world.caption(sc, t, {attribute: word}), sc) for t in PACK_TEMPLATES for sc in scenes]
            results = generate_set(patcher, conditioner, prompts, per_prompt, seed, steps)
            hits = [j.get(attribute) == value for g in results for j in g.judged]
            parts.append(f"{word} {100 * sum(hits) / len(hits):.0f}")
        lines.append(f"{value}: " + ", ".join(parts))
    return "\n".join(lines)


def _grid(rows: list[torch.Tensor], scale: int = 4, pad: int = 2) -> torch.Tensor:
    """Rows of images [n, 3, 32, 32] -> one image [3, H, W], nearest-neighbour upscaled, grey padding."""
    cols = max(r.shape[0] for r in rows)
    cell = world.SIZE * scale + pad
    out = torch.full((3, len(rows) * cell + pad, cols * cell + pad), 0.35)
    for i, row in enumerate(rows):
        big = F.interpolate(row, scale_factor=scale, mode="nearest")
        for j in range(row.shape[0]):
            out[
                :,
                pad + i * cell : pad + i * cell + world.SIZE * scale,
                pad + j * cell : pad + j * cell + world.SIZE * scale,
            ] = big[j]
    return out


def demo(
    target: str,
    out: Path,
    steps: int,
    train_steps: int,
    seed: int,
    rank: int,
    lrs_threshold: float,
    hds_threshold: float,
    strength: float,
    model=None,
    learning_rate: float = 1e-2,
) -> str:
    """Build a SafeRoPE pack for `target` through the nodes, then sample target and non-target prompts with the
    base model and with the pack (same noise) and save a grid: per prompt, a row of base images above a row of
    SafeRoPE images."""
    from PIL import Image, ImageDraw

    from . import erase
    from . import model as base_model
    from .env import comfy_and_pack
    from .sampling import Conditioner, Prompt, generate
    from .text_encoder import minilm_clip

    pack_mod = comfy_and_pack()
    model = model if model is not None else base_model.load()
    clip = minilm_clip()
    conditioner = Conditioner(clip)
    s = erase.EraseSettings(
        target=target,
        seed=seed,
        sample_steps=steps,
        train_steps=train_steps,
        rank=rank,
        lrs_threshold=lrs_threshold,
        hds_threshold=hds_threshold,
        strength=strength,
        learning_rate=learning_rate,
    )
    fam = erase.prompt_families(s)
    prompts, _ = erase.prompt_set(fam, s, pack_mod.nodes)
    _, trained, timings, _ = erase.build_pack(model, clip, fam, prompts, s, pack_mod.nodes, log=lambda *_: None)
    with torch.inference_mode():
        (patched,) = pack_mod.nodes.rotation_nodes.ApplyRiskRotation.execute(model, trained, strength, "both")
    attribute = fam.attribute
    chosen = fam.target[:3] + [fam.paraphrase[0], fam.compositional[0]]
    others = [v for v in world.ATTRIBUTES[attribute] if v != target][:3]
    base_scene = fam.target[0].scene
    for v in others:
        sc = world.Scene(**{**base_scene.__dict__, attribute: v})
        chosen.append(Prompt(world.caption(sc, world.TRAIN_TEMPLATES[1]), sc))
    negative = conditioner("")
    rows, labels = [], []
    for i, p in enumerate(chosen):
        for name, m in (("base", model), ("SafeRoPE", patched)):
            rows.append(generate(m, conditioner(p.text), negative, 6, seed + 100 + i, steps))
            labels.append(f"{name}: {p.text}")
    grid = _grid(rows)
    label_w = 330
    img = Image.new("RGB", (grid.shape[2] + label_w, grid.shape[1]), (40, 40, 40))
    img.paste(Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()), (label_w, 0))
    draw = ImageDraw.Draw(img)
    cell = world.SIZE * 4 + 2
    for i, label in enumerate(labels):
        colour = (255, 140, 140) if label.startswith("SafeRoPE") else (220, 220, 220)
        draw.text((6, 2 + i * cell + cell // 2 - 6), label[:52], fill=colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return (
        f"saved {out}: {len(chosen)} prompts (3 target, 1 paraphrase, 1 compositional, {len(others)} non-target), "
        f"6 images each, base row above SafeRoPE row; pack built in {timings['build_s']:.0f} s; "
        f"{trained.heads_rotated()} heads rotated"
    )
