"""Cost of Collect & Train, measured on ComfyUI's own FLUX classes (random weights):

(a) Collect Q/K memory against the number of prompts: the statistics' bytes and the process's peak RSS, each
    collection in a fresh subprocess, so the peaks do not mix. Both must stay flat (streaming Gram matrices and
    bounded reservoirs).
(b) One Train Risk Rotations step (base velocity without gradient + rotated velocity + backward + AdamW) as a
    ratio to one plain forward+backward of the same model at the same input (gradient w.r.t. the latent, blocks
    wrapped only so that backward through FLUX's in-place residual updates works), with and without gradient
    checkpointing, on the tiny test model and on a full-width FLUX slice (hidden 3072, 24 heads x 128, one double +
    one single block, T5/CLIP widths 4096/768, 512x512 latent, 12 of 24 heads per block in the pack, rank 5).
    Each configuration runs in its own subprocess; its peak RSS above the loaded models (after encoding the
    prompts) is reported too: the activation memory of the step.

    python -m bench.collect_train_cost [--prompts 10 50 200] [--models tiny slice] [--steps N] [--threads N]

Needs a ComfyUI checkout ($COMFYUI_PATH or ~/ComfyUI, as the tests). Runs on the CPU (the test tier's models are
CPU models); timings are wall-clock medians of the timed repeats after warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import comfyui_env

REPO = Path(__file__).resolve().parents[1]

MODELS = {  # name -> tiny_flux kwargs, text encoder widths
    "tiny": {"flux": {}, "context_dim": comfyui_env.CONTEXT_DIM, "pooled_dim": comfyui_env.POOLED_DIM},
    "slice": {
        "flux": {"hidden": 3072, "heads": 24, "depth": 1, "depth_single": 1},
        "context_dim": 4096,
        "pooled_dim": 768,
    },
}
RANK, SELECTED_SHARE = 5, 0.5  # pack: rank 5, half the heads of every block
RESERVOIR = 64  # vectors kept per site for head selection (the node's default is 1024): full from ~30 prompts
SIZE = 512


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def setup():
    comfyui_env.import_comfyui()
    return comfyui_env.import_pack()


# ---------------------------------------------------------------------------------------------------------------
# Probes (each runs in its own process and prints one JSON line)


def probe_collect(n: int) -> dict:
    import torch

    pack = setup()
    nodes = pack.nodes
    with torch.inference_mode():
        clip = comfyui_env.tiny_flux_clip()
        model = comfyui_env.tiny_flux("dev")
        prompts, _ = nodes.SafeRoPEPromptSet.execute("nudity", "", "", "", "", n, 10, 0)
        # warm up on one prompt, so lazy allocations are counted before the baseline
        warm = pack.saferope_core.PromptSet(prompts.concept, prompts.unsafe[:1], prompts.safe[:1])
        nodes.CollectQK.execute(model, clip, warm, "1.0", 64, 64, 0, RESERVOIR)
        baseline = peak_rss_mib()
        start = time.perf_counter()
        stats, _ = nodes.CollectQK.execute(model, clip, prompts, "1.0", 64, 64, 0, RESERVOIR)
        seconds = time.perf_counter() - start
    vectors = sum(stats.count.values())
    shape = stats.shape
    bound = len(stats.count) * (shape.heads * shape.head_dim * (shape.head_dim + stats.reservoir_size)) * 4
    return {
        "prompts": n,
        "vectors": vectors,
        "stats_bytes": stats.nbytes(),
        "bound_bytes": bound,
        "baseline_mib": baseline,
        "peak_mib": peak_rss_mib(),
        "seconds": seconds,
    }


def build_parts(name: str):
    """(pack module, model patcher, CLIP, untrained pack over half the heads at rank 5, prompt set)."""
    import torch

    pack = setup()
    core = pack.saferope_core
    spec = MODELS[name]
    with torch.inference_mode():  # as ComfyUI's loaders build models (inference-mode weights, frozen by training)
        model = comfyui_env.tiny_flux(
            "dev", context_dim=spec["context_dim"], pooled_dim=spec["pooled_dim"], **spec["flux"]
        )
        clip = comfyui_env.tiny_flux_clip(context_dim=spec["context_dim"], pooled_dim=spec["pooled_dim"])
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    g = torch.Generator().manual_seed(0)
    heads = torch.zeros(shape.heads, dtype=torch.bool)
    heads[: max(1, int(shape.heads * SELECTED_SHARE))] = True
    blocks = {}
    for block in shape.block_names():
        basis = [
            torch.linalg.qr(torch.randn(shape.heads, shape.head_dim, RANK, generator=g))[0].contiguous()
            for _ in range(2)
        ]
        zeros = torch.zeros(shape.heads, RANK, RANK)
        blocks[block] = core.BlockRotation(basis[0], basis[1], heads.clone(), zeros, zeros.clone())
    subspaces = core.SafeRoPEPack(shape, ["bench"], RANK, blocks, recipe={"trained": False})
    prompts = core.PromptSet(
        "bench",
        [core.UnsafePrompt("a photo of a nude woman, soft lighting", "nude woman")],
        ["a bowl of fresh fruit on a wooden kitchen table"],
    )
    return pack, model, clip, subspaces, prompts


def probe_forward_backward(name: str, repeats: int) -> dict:
    """One forward + backward of the unrotated model (gradient w.r.t. the latent)."""
    import torch

    pack, model, clip, _, prompts = build_parts(name)
    training, calls = pack.saferope_comfy.training, pack.saferope_comfy.model_calls
    training.make_autograd_safe(model.model)
    options = training.training_options(model, checkpointing=False)
    prompt = calls.encode_prompt(clip, prompts.safe[0])
    calls.encode_prompt(clip, prompts.unsafe[0].text)  # as probe_train does before its baseline
    baseline = peak_rss_mib()
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=g)
    sigma = torch.tensor([0.8])

    def once():
        x = latent.clone().requires_grad_(True)
        with training.differentiable_rope():  # ComfyUI >= 0.8's RoPE op has no backward of its own
            v = calls.velocity(model, x, sigma, prompt, options=options)
            v.square().mean().backward()
        return x.grad

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "baseline_mib": baseline, "peak_mib": peak_rss_mib()}


def probe_train(name: str, repeats: int, checkpointing: bool) -> dict:
    """Train Risk Rotations steps (RotationTrainer, as the node runs it), unsafe and safe alternating."""
    pack, model, clip, subspaces, prompts = build_parts(name)
    training, core = pack.saferope_comfy.training, pack.saferope_core
    warmup = 2  # one unsafe and one safe step: prompt encoding (cached afterwards) and first-call allocations
    recipe = core.TrainingRecipe(steps=warmup + repeats, learning_rate=1e-3, run_length=1, seed=0)
    data = training.TrainingData(prompts, (16, SIZE // 8, SIZE // 8))
    trainer = training.RotationTrainer(model, clip, subspaces, data, recipe, checkpointing)
    for text in (prompts.unsafe[0].text, prompts.safe[0]):  # text-encoder activations before the baseline
        pack.saferope_comfy.model_calls.encode_prompt(clip, text)
    baseline = peak_rss_mib()
    marks = []
    trainer.train(on_step=lambda *_: marks.append(time.perf_counter()))
    times = [b - a for a, b in zip(marks[warmup - 1 :], marks[warmup:], strict=False)]
    return {
        "seconds": statistics.median(times),
        "baseline_mib": baseline,
        "peak_mib": peak_rss_mib(),
        "heads": subspaces.heads_rotated(),
    }


def run_probe(threads: int, kind: str, *args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.collect_train_cost",
        "--threads",
        str(threads),
        "--probe",
        kind,
        *map(str, args),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"probe {kind} {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--prompts", type=int, nargs="+", default=[10, 50, 200], help="(a): unsafe prompt counts, one collection each"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "slice"],
        choices=list(MODELS),
        help="(b): models to time a training step on",
    )
    p.add_argument("--steps", type=int, default=None, help="timed repeats (default: 5 tiny, 2 slice)")
    p.add_argument("--skip-collect", action="store_true", help="skip (a), the collection memory")
    p.add_argument("--skip-train", action="store_true", help="skip (b), the training step ratio")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every probe (default: torch's choice)")
    p.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if comfyui_env.find_comfyui() is None:
        print(
            "bench.collect_train_cost needs a ComfyUI checkout: set COMFYUI_PATH to one (or put it at ~/ComfyUI).",
            file=sys.stderr,
        )
        return 2

    if args.probe:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        kind, *rest = args.probe
        if kind == "collect":
            result = probe_collect(int(rest[0]))
        elif kind == "fwdbwd":
            result = probe_forward_backward(rest[0], int(rest[1]))
        else:
            result = probe_train(rest[0], int(rest[1]), kind == "train-ckpt")
        print(json.dumps(result))
        return 0

    import torch

    threads = args.threads or torch.get_num_threads()
    comfyui_env.import_comfyui()
    import comfyui_version

    print(
        f"torch {torch.__version__}, {threads} thread(s), CPU; ComfyUI {comfyui_version.__version__} at "
        f"{comfyui_env.find_comfyui()}"
    )
    if not args.skip_collect:
        print(
            f"\n(a) Collect Q/K, tiny FLUX (2+2 blocks, 4x16) + tiny FLUX CLIP, 64x64, 1 sigma, reservoir "
            f"{RESERVOIR}, N unsafe + 10 safe prompts, one process per row; 'bound' = Gram matrices + full "
            "reservoirs, fixed by the model shape"
        )
        print(
            f"{'prompts':>8} {'vectors':>9} {'stats KiB':>10} {'bound KiB':>10} {'peak RSS MiB':>13} "
            f"{'during collect':>15} {'s/prompt':>9}"
        )
        for n in args.prompts:
            r = run_probe(threads, "collect", n)
            print(
                f"{n:>8} {r['vectors']:>9} {r['stats_bytes'] / 1024:>10.1f} {r['bound_bytes'] / 1024:>10.1f} "
                f"{r['peak_mib']:>13.1f} {r['peak_mib'] - r['baseline_mib']:>+15.1f} "
                f"{r['seconds'] / (n + 10):>9.3f}"
            )

    if not args.skip_train:
        print(
            f"\n(b) Train Risk Rotations step vs one plain forward+backward, {SIZE}x{SIZE} (1024 image + 256 text "
            f"tokens), rank {RANK}, {int(SELECTED_SHARE * 100)}% of heads per block"
        )
        print(f"{'model':>6} {'mode':>22} {'seconds':>9} {'ratio':>6} {'peak RSS MiB':>13} {'above model':>12}")
        for name in args.models:
            repeats = args.steps or (5 if name == "tiny" else 2)
            base = run_probe(threads, "fwdbwd", name, repeats)
            rows = [
                ("forward+backward", base),
                ("train step", run_probe(threads, "train", name, repeats)),
                ("train step, checkpoint", run_probe(threads, "train-ckpt", name, repeats)),
            ]
            for mode, r in rows:
                print(
                    f"{name:>6} {mode:>22} {r['seconds']:>9.3f} {r['seconds'] / base['seconds']:>6.2f} "
                    f"{r['peak_mib']:>13.0f} {r['peak_mib'] - r['baseline_mib']:>+12.0f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
