"""Step-time overhead of Redirect Unsafe Prompts at full FLUX width, measured in one run.

    python -m bench.redirect_overhead [--repeats 5] [--threads 1] [--device cpu|cuda] [--dtype float32|bfloat16]

The redirector works on the text conditioning only: per model call its detector reads T5's 512 x 4,096
conditioning, the latent and the noise level, and a flagged sample's conditioning is redirected. Its cost does not
depend on the transformer's depth. This script times, in one process and alternating:
  slice   one denoiser call of a full-width FLUX slice (1 double + 1 single block, hidden 3072, 24 heads; 512 text
          tokens of width 4,096; 1,024 image tokens = 512x512) through comfyui_env.run_model, unpatched;
  redirect the redirector's work of one call at that width, worst case (every sample flagged: detector + redirect).
and prints the ratio redirect / slice step, and the same against a whole FLUX.1 step estimated as the slice's
per-block time x 57 blocks (19 double + 38 single; the slice's non-block parts counted once). Medians of CPU
(process) time with --threads 1, or of CUDA-synchronised wall time on a GPU.

Peak memory added: the peak above the starting memory of one slice step alone, and of one redirected call (the
redirector's work, then the step on the redirected conditioning), in the same process; plus the redirector's
weights, which stay loaded while the patched model is used. On a GPU from the CUDA allocator's statistics; on the
CPU from the Linux peak-RSS counter (VmHWM, reset through /proc/self/clear_refs before each arm), with glibc told
to give every allocation of 64 KiB or more its own mapping (the script restarts itself with
MALLOC_MMAP_THRESHOLD_=65536) so that RSS follows the live tensors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from .adapter_overhead import _vm  # a field of /proc/self/status in bytes

TEXT_TOKENS, T5_WIDTH = 512, 4096
SLICE = {"hidden": 3072, "heads": 24, "depth": 1, "depth_single": 1}
FLUX_BLOCKS = 19 + 38


def timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def peak_above_start(fn, device) -> int:
    """Bytes the peak memory of fn() rises above the memory in use when it starts."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = _vm("VmRSS")
    fn()
    return _vm("VmHWM") - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed pairs (slice step, redirector call)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights dtype")
    args = p.parse_args(argv)
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        again = argv if argv is not None else sys.argv[1:]
        os.execve(sys.executable, [sys.executable, "-m", "bench.redirect_overhead", *again], env)
    torch.set_num_threads(args.threads)

    from . import comfyui_env

    comfyui_env.import_comfyui(comfyui_env.find_comfyui())
    pack = comfyui_env.import_pack()
    core = pack.saferope_core.redirector
    dtype = getattr(torch, args.dtype)
    model = comfyui_env.tiny_flux("dev", dtype=dtype, seed=0, context_dim=T5_WIDTH, **SLICE)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, TEXT_TOKENS, T5_WIDTH, generator=g).to(args.device)
    pooled = torch.randn(1, comfyui_env.POOLED_DIM, generator=g).to(args.device)
    latent = torch.randn(1, 16, 64, 64, generator=g).to(args.device)
    torch.manual_seed(0)
    redirector = core.PromptRedirector(core.RedirectorConfig("flux", T5_WIDTH, 16)).to(args.device)
    redirection = core.Redirection(redirector, threshold=-1e9)  # worst case: every sample flagged
    sigma = torch.tensor([0.8], device=args.device)

    def step():
        comfyui_env.run_model(model, latent, 0.8, context, pooled)

    def redirect():
        return redirection([(0, 0)], context, latent, sigma)[0]

    def redirected_step():
        comfyui_env.run_model(model, latent, 0.8, redirect(), pooled)

    with torch.inference_mode():
        step(), redirect()  # warm-up
        pairs = [(timed(step, args.device), timed(redirect, args.device)) for _ in range(args.repeats)]
        step_peak = peak_above_start(step, args.device)
        redirected_peak = peak_above_start(redirected_step, args.device)
    weights = sum(t.numel() * t.element_size() for t in redirector.state_dict().values())
    slice_s = statistics.median(s for s, _ in pairs)
    redirect_s = statistics.median(r for _, r in pairs)
    print(
        f"{args.device} {args.dtype}, {args.threads} thread(s), {args.repeats} pairs: "
        f"slice step {1000 * slice_s:.1f} ms, "
        f"redirector call {1000 * redirect_s:.2f} ms; redirector / slice step = {100 * redirect_s / slice_s:.2f} %; "
        f"against a 57-block FLUX.1 step estimated from the slice (x {FLUX_BLOCKS / 2:.1f}): "
        f"{100 * redirect_s / (slice_s * FLUX_BLOCKS / 2):.3f} %"
    )
    mib = 2**20
    print(
        f"peak memory above start: slice step {step_peak / mib:.1f} MiB, redirected step {redirected_peak / mib:.1f} "
        f"MiB (added {(redirected_peak - step_peak) / mib:+.1f} MiB); redirector weights {weights / mib:.1f} MiB "
        f"(float32, loaded while the patched model is used)"
    )


if __name__ == "__main__":
    main()
