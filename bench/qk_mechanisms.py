"""Apply Risk Rotation's cost per step through each q/k mechanism the running ComfyUI offers, measured in one run.

    COMFYUI_PATH=<a ComfyUI >= 0.33 checkout> python -m bench.qk_mechanisms [--cases tiny slice] [--repeats 7]

Mechanisms (saferope_comfy/flux_adapter.py): "attn1_patch", ComfyUI's own pre-attention patch of FLUX's blocks (ComfyUI
>= 0.33, what Apply Risk Rotation uses there), and "hooks", forward hooks on the QK-norm modules for the duration of
each call (what older ComfyUIs get). Same cases and pack as bench.adapter_overhead (512 text + 1,024 image tokens, rank
5 on half the heads of every block). Arms: the unpatched model, the pack through each mechanism; they run in rotating
order, one denoiser call each (comfyui_env.run_model, under inference_mode), process CPU time with one thread; medians
of the per-round ratios. On an older ComfyUI only the hooks arm runs."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .adapter_overhead import CASES, LATENT_HW, TEXT_TOKENS, bench_pack, comfyui_version, load_comfyui


def arms(env, pack, case: str) -> dict:
    """{arm name: patcher} for one case: unpatched, and the pack applied through each available mechanism."""
    adapter, editors = pack.saferope_comfy.flux_adapter, pack.saferope_comfy.editors
    base = env.tiny_flux("dev", seed=0, **CASES[case])
    rotation = editors.RiskRotation(bench_pack(pack, case), 1.0, ("txt", "img"))
    mechanisms = ["hooks"] + (["attn1_patch"] if adapter.flux_blocks_call_attn1_patch() else [])
    return {"unpatched": base, **{m: adapter.with_qk_editor(base, rotation, m) for m in mechanisms}}


def measure(env, pack, case: str, repeats: int) -> dict:
    models = arms(env, pack, case)
    context, pooled = env.encode_text(" ".join(f"word{i}" for i in range(TEXT_TOKENS)))
    latent = torch.randn(1, 16, *LATENT_HW, generator=torch.Generator().manual_seed(0))
    outputs, times = {}, {name: [] for name in models}
    names = list(models)
    with torch.inference_mode():
        for name in names:  # warm-up, and the outputs to compare
            outputs[name] = env.run_model(models[name], latent, 0.5, context, pooled)
        for i in range(repeats):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                start = time.process_time()
                env.run_model(models[name], latent, 0.5, context, pooled)
                times[name].append(time.process_time() - start)
    plain = times["unpatched"]
    result = {"case": case, "seconds": {n: statistics.median(t) for n, t in times.items()}, "overhead": {}}
    for name in names[1:]:
        result["overhead"][name] = statistics.median(b / a - 1 for a, b in zip(plain, times[name], strict=True))
    if "attn1_patch" in times:
        result["hooks_over_attn1_patch"] = statistics.median(
            h / a for h, a in zip(times["hooks"], times["attn1_patch"], strict=True)
        )
        result["max_abs_difference"] = float((outputs["hooks"] - outputs["attn1_patch"]).abs().max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.qk_mechanisms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["tiny", "slice"], choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env, pack, path = load_comfyui()
    print(f"ComfyUI {comfyui_version(path)} at {path}; torch {torch.__version__}; {args.threads} thread(s)")
    for case in args.cases:
        r = measure(env, pack, case, args.repeats)
        seconds = ", ".join(f"{name} {s * 1000:.1f} ms" for name, s in r["seconds"].items())
        overhead = ", ".join(f"{name} {100 * o:+.2f} %" for name, o in r["overhead"].items())
        print(f"{case}: step CPU time (median of {args.repeats}) {seconds}; Apply Risk Rotation adds {overhead}")
        if "hooks_over_attn1_patch" in r:
            print(
                f"{case}: hooks / attn1_patch step time {r['hooks_over_attn1_patch']:.3f}; "
                f"largest output difference {r['max_abs_difference']:.2e}"
            )


if __name__ == "__main__":
    main()
