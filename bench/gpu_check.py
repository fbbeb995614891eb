"""The GPU check: full-size FLUX.1 [dev] and FLUX.2 klein 4B with random bfloat16 weights on a CUDA GPU, in a real
ComfyUI, measured in one run and printed as one table.

    COMFYUI_PATH=<a ComfyUI checkout> python -m bench.gpu_check [--models flux1-dev flux2-klein-4b] [--repeats 5]
    python -m bench.gpu_check --dry-run      # every measurement on the CPU with tiny models: checks the script only

Per model, at 1024 x 1024 (4,096 image tokens) with 512 text tokens:
- step: one denoiser call (bench.comfyui_env.run_model, as sampling prepares it) of the unpatched model and through
  Apply Risk Rotation (a random pack of rank 5 on half the heads of every block), Restrict Unsafe Flow (random
  anchors whose threshold flags every patch: the worst case, in a start-up step) and Redirect Unsafe Prompts (a
  random redirector that flags every sample: the worst case); the arms alternate, CUDA-synchronised wall time,
  medians; overhead = patched / unpatched - 1;
- train: one Train Risk Rotations step (RotationTrainer, gradient checkpointing on, the node's default) against one
  plain forward + backward of the same model, and the peak CUDA memory of each (torch.cuda.max_memory_allocated);
- syncs: one step of each arm under torch.cuda.set_sync_debug_mode("warn"), counting the synchronising calls made
  from this repository's code (nodes/, saferope_comfy/, saferope_core/) and from everything else (ComfyUI, torch);
  "error" mode is what the issue asked for, but ComfyUI's own step may sync, which would hide the pack's.

Without CUDA it says that it needs a GPU and exits with status 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from . import comfyui_env

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # tiny_flux arguments at full size, text width, latent [C, h, w] at 1024 x 1024
    "flux1-dev": {
        "kind": "dev",
        "shape": {"depth": 19, "depth_single": 38, "hidden": 3072, "heads": 24},
        "context_dim": 4096,
        "pooled_dim": 768,  # CLIP-L
        "latent": (16, 128, 128),
    },
    "flux2-klein-4b": {
        "kind": "flux2_klein_4b",
        "shape": {"depth": 5, "depth_single": 20, "hidden": 3072, "heads": 24},
        "context_dim": 3 * 2560,  # Qwen3 4B's layers 9, 18 and 27 side by side
        "pooled_dim": None,
        "latent": (128, 64, 64),
    },
}
TEXT_TOKENS, RANK = 512, 5
ARMS = ("unpatched", "Apply Risk Rotation", "Restrict Unsafe Flow", "Redirect Unsafe Prompts")


def tiny(spec: dict) -> dict:
    """The dry run's version of a model: the same kind at the test models' size."""
    width = comfyui_env.context_width(spec["kind"])
    pooled = None if spec["pooled_dim"] is None else comfyui_env.POOLED_DIM
    return {
        **spec,
        "shape": {},
        "context_dim": width,
        "pooled_dim": pooled,
        "latent": (spec["latent"][0], 8, 8),
        "text_tokens": 32,
    }


def build(pack, spec: dict, device, dtype):
    """(model, {arm: patched model}, inputs) for one model: a random pack, random UVR anchors that flag every patch,
    a random redirector that flags every sample."""
    core, nodes = pack.saferope_core, pack.nodes
    pooled_dim = spec["pooled_dim"]
    model = comfyui_env.tiny_flux(
        spec["kind"],
        dtype=dtype,
        device=device,
        context_dim=spec["context_dim"],
        pooled_dim=pooled_dim or comfyui_env.POOLED_DIM,  # not used by kinds without a pooled vector
        **spec["shape"],
    )
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    g = torch.Generator().manual_seed(0)
    blocks = {}
    for name in shape.block_names():
        bases = [torch.linalg.qr(torch.randn(shape.heads, shape.head_dim, RANK, generator=g))[0] for _ in range(2)]
        w = [torch.randn(shape.heads, RANK, RANK, generator=g) for _ in range(2)]
        blocks[name] = core.BlockRotation(*bases, torch.arange(shape.heads) % 2 == 0, *w)
    rotations = core.SafeRoPEPack(shape, ["gpu check"], RANK, blocks, name="gpu_check")
    anchors = core.uvr.UVRAnchors(
        shape,
        "single.0",
        torch.nn.functional.normalize(torch.randn(shape.heads, 4, shape.head_dim, generator=g), dim=-1),
        torch.zeros(shape.heads, shape.head_dim),
        -1.0,  # every patch scores above it
        0.85,
        ["gpu check"],
    )
    torch.manual_seed(0)
    redirector = core.redirector.PromptRedirector(pack.saferope_comfy.prompt_redirect.redirector_config(model))
    redirect = pack.saferope_comfy.prompt_redirect.RedirectWrapper(redirector, 1.0, -1e9, 3)  # every sample flagged
    with torch.inference_mode():
        (rotated,) = nodes.rotation_nodes.ApplyRiskRotation.execute(model, rotations, 1.0, "both").args
        (restricted,) = nodes.uvr_nodes.RestrictUnsafeFlow.execute(model, anchors, 1.0, -1.0, 0.85, -1).args
    arms = {
        "unpatched": model,
        "Apply Risk Rotation": rotated,
        "Restrict Unsafe Flow": restricted,
        "Redirect Unsafe Prompts": pack.saferope_comfy.prompt_redirect.with_redirection(model, redirect),
    }
    latent = torch.randn(1, *spec["latent"], generator=g).to(device, dtype)
    context = torch.randn(1, spec.get("text_tokens", TEXT_TOKENS), spec["context_dim"], generator=g).to(device, dtype)
    pooled = None if pooled_dim is None else torch.randn(1, pooled_dim, generator=g).to(device, dtype)
    return model, rotations, arms, (latent, context, pooled)


def synchronise(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(arms: dict, inputs, device, repeats: int) -> dict:
    """{arm: median seconds of one start-up step (sigma 1.0)}, the arms in rotating order."""
    latent, context, pooled = inputs
    names = list(arms)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up: the pack moves to the device, kernels are chosen
            comfyui_env.run_model(arms[name], latent, 1.0, context, pooled)
        for i in range(repeats):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                synchronise(device)
                start = time.perf_counter()
                comfyui_env.run_model(arms[name], latent, 1.0, context, pooled)
                synchronise(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def syncs(arms: dict, inputs, device) -> dict:
    """{arm: (synchronising calls from this repository's code, from elsewhere)} in one step; (None, None) on a CPU."""
    if device.type != "cuda":
        return {name: (None, None) for name in arms}
    latent, context, pooled = inputs
    roots = tuple(str(REPO / part) for part in ("nodes", "saferope_comfy", "saferope_core"))
    counts = {}
    with torch.inference_mode():
        for name, patched in arms.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    comfyui_env.run_model(patched, latent, 1.0, context, pooled)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            found = [w for w in caught if "synchroniz" in str(w.message)]
            mine = sum(w.filename.startswith(roots) for w in found)
            counts[name] = (mine, len(found) - mine)
    return counts


def training(pack, model, rotations, spec: dict, device, repeats: int) -> dict:
    """Seconds and peak memory of one Train Risk Rotations step and of one plain forward + backward."""
    core = pack.saferope_core
    train, calls = pack.saferope_comfy.training, pack.saferope_comfy.model_calls
    clip = text_encoder(spec)
    prompts = core.PromptSet(
        "gpu check", [core.UnsafePrompt("a photo of a nude woman", "nude", "a photo of a woman")], ["a bowl of fruit"]
    )
    untrained = rotations.to("cpu")
    for block in untrained.blocks.values():
        block.w_txt, block.w_img = torch.zeros_like(block.w_txt), torch.zeros_like(block.w_img)
    untrained.recipe = {"trained": False}
    warmup = 2
    recipe = core.TrainingRecipe(steps=warmup + repeats, learning_rate=1e-3, run_length=1, seed=0)
    data = train.TrainingData(prompts, spec["latent"])
    trainer = train.RotationTrainer(model, clip, untrained, data, recipe, checkpointing=True)
    marks = []

    def mark(*_):
        synchronise(device)
        marks.append(time.perf_counter())

    reset_peak(device)
    trainer.train(on_step=mark)
    train_peak = peak(device)
    train_s = statistics.median(b - a for a, b in zip(marks[warmup - 1 : -1], marks[warmup:], strict=True))

    train.make_autograd_safe(model.model)
    options = train.training_options(model, checkpointing=True)
    prompt = calls.encode_prompt(clip, prompts.safe[0])
    latent = torch.randn(1, *spec["latent"]).to(device)

    def forward_backward():
        x = latent.clone().requires_grad_(True)
        with train.differentiable_rope():
            calls.velocity(model, x, torch.tensor([0.8]), prompt, options=options).square().mean().backward()
        synchronise(device)

    forward_backward()
    reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    return {
        "train_s": train_s,
        "train_peak": train_peak,
        "plain_s": statistics.median(times),
        "plain_peak": peak(device),
    }


def text_encoder(spec: dict):
    """A one-layer random text encoder of the model's text width (the prompts' content does not matter here)."""
    if spec["kind"].startswith("flux2_klein"):
        return comfyui_env.tiny_klein_clip("qwen3_4b", width=spec["context_dim"] // 3)
    return comfyui_env.tiny_flux_clip(context_dim=spec["context_dim"], pooled_dim=spec["pooled_dim"])


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def table(rows: list[tuple]) -> str:
    header = "| model | measure | unpatched | Apply Risk Rotation | Restrict Unsafe Flow | Redirect Unsafe Prompts |"
    return "\n".join([header, "|---" * 6 + "|", *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def check(name: str, spec: dict, pack, device, dtype, repeats: int) -> list[tuple]:
    model, rotations, arms, inputs = build(pack, spec, device, dtype)
    seconds = step_seconds(arms, inputs, device, repeats)
    counted = syncs(arms, inputs, device)
    base = seconds["unpatched"]
    rows = [
        (name, "step ms", *(f"{1000 * seconds[a]:.1f}" for a in ARMS)),
        (name, "overhead per step %", "-", *(f"{100 * (seconds[a] / base - 1):+.2f}" for a in ARMS[1:])),
        (name, "syncs in one step (pack / other)", *(_pair(counted[a]) for a in ARMS)),
    ]
    cost = training(pack, model, rotations, spec, device, repeats)
    mib = 2**20
    rows.append(
        (
            name,
            "Train Risk Rotations step / forward+backward",
            f"{1000 * cost['plain_s']:.0f} ms",
            f"{1000 * cost['train_s']:.0f} ms = {cost['train_s'] / cost['plain_s']:.2f}x",
            "-",
            "-",
        )
    )
    if cost["train_peak"] is not None:
        rows.append(
            (
                name,
                "peak MiB (forward+backward / training step)",
                f"{cost['plain_peak'] / mib:.0f}",
                f"{cost['train_peak'] / mib:.0f}",
                "-",
                "-",
            )
        )
    return rows


def _pair(counts) -> str:
    return "n/a (CPU)" if counts[0] is None else f"{counts[0]} / {counts[1]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to check")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per arm (medians)")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script, not a measure")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA GPU (none here); `--dry-run` runs it on the CPU with tiny models.")
        return 2
    if comfyui_env.find_comfyui() is None:
        print("bench.gpu_check needs a ComfyUI checkout: set COMFYUI_PATH to one.")
        return 2
    comfyui_env.import_comfyui(cpu=args.dry_run)
    pack = comfyui_env.import_pack()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    where = "CPU, tiny models (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"bench.gpu_check on {where}, {dtype}, torch {torch.__version__}, {args.repeats} repeats")
    rows = []
    for name in args.models:
        spec = tiny(MODELS[name]) if args.dry_run else MODELS[name]
        rows += check(name, spec, pack, device, dtype, args.repeats)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
