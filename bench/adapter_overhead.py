"""Step-time and memory overhead of Apply Risk Rotation on FLUX models in a real ComfyUI, measured in one run.

    python -m bench.adapter_overhead [--cases tiny slice] [--dtypes float32 bfloat16] [--repeats 5]
                                     [--tiny-repeats 30] [--threads 1] [--no-steps] [--no-memory] [--no-profile]

(about 12 minutes on 2 CPU cores with the defaults; the slice needs ~3 GB of RAM in float32)

Cases, both at 512x512 (latent 64x64 -> 1,024 image tokens) with 512 text tokens, pack rank 5 on half the heads
of every block, random orthonormal bases and W (seeded):
  tiny   the test models' tiny FLUX: 2 double + 2 single blocks, 4 heads x 16 (hidden 64);
  slice  a full-width FLUX slice: 1 double + 1 single block, 24 heads x 128 (hidden 3072, axes 16/56/56).
Text tokens are 32 wide (the tiny config's context width); that changes only txt_in, not the blocks.

Step time: one denoiser call through comfyui_env.run_model (as sampling prepares it), under inference_mode,
in process CPU time (with --threads 1, a measure of the work that a busy machine does not distort) and wall time.
The unpatched model and the Apply Risk Rotation clone alternate (ABBA order) in one process; the ratio is the
median of the per-pair ratios patched/unpatched (their spread is printed too). Both arms carry the same two
timing hooks on every QKNorm module, one before and one after the rotation hooks, so the time spent inside the
rotation hooks of each call is measured directly ("in-hook"), free of the step-to-step noise.
Peak memory: each arm in its own subprocess (build, one warm-up step, then the Linux peak-RSS counter VmHWM is
reset through /proc/self/clear_refs and one step is run); "added" = patched peak - unpatched peak, each counted
above the RSS at the start of the step. glibc is told to mmap every allocation of 64 KiB or more
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS at once and RSS follows live tensor memory. torch has no CPU
allocator statistics; tracemalloc does not see torch.
Profile: the parts of one call's rotation work (what Risk Rotation's hooks do per block, q and k), timed one by
one on tensors of the slice's shapes: index_select of the rotated heads, float conversion, projection einsum,
LRS, eigh of the skew matrices, the rotation of coefficients, back-projection + cast, index_copy, and the
torch.cat that rebuilds the joint sequence in single blocks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "tiny": {"hidden": 64, "heads": 4, "depth": 2, "depth_single": 2},
    "slice": {"hidden": 3072, "heads": 24, "depth": 1, "depth_single": 1},
}
LATENT_HW = (64, 64)  # 512x512 image
TEXT_TOKENS = 512
RANK = 5


# --------------------------------------------------------------------------------------------------------------
# Setup


def load_comfyui():
    """(comfyui_env, the pack imported as ComfyUI imports it, ComfyUI path); exits with a message without one."""
    from . import comfyui_env

    path = comfyui_env.find_comfyui()
    if path is None:
        sys.exit(
            "bench.adapter_overhead needs a ComfyUI checkout: set COMFYUI_PATH to one, or put it at "
            "~/ComfyUI (or run from inside ComfyUI/custom_nodes)."
        )
    comfyui_env.import_comfyui(path)
    return comfyui_env, comfyui_env.import_pack(), path


def comfyui_version(path: Path) -> str:
    try:
        text = (path / "comfyui_version.py").read_text()
        return text.split("__version__", 1)[1].split('"')[1]
    except (OSError, IndexError):
        return "unknown version"


def bench_pack(pack, case: str):
    """A seeded pack for a case: random orthonormal bases and W (rank 5) on every other head of every block."""
    cfg = CASES[case]
    core = pack.saferope_core
    h, head_dim = cfg["heads"], cfg["hidden"] // cfg["heads"]
    shape = core.ModelShape("flux", cfg["depth"], cfg["depth_single"], h, head_dim)
    g = torch.Generator().manual_seed(0)
    blocks = {}
    for name in shape.block_names():
        bases = [torch.linalg.qr(torch.randn(h, head_dim, RANK, generator=g))[0].contiguous() for _ in range(2)]
        blocks[name] = core.BlockRotation(
            *bases,
            torch.arange(h) % 2 == 0,
            torch.randn(h, RANK, RANK, generator=g),
            torch.randn(h, RANK, RANK, generator=g),
        )
    return core.SafeRoPEPack(shape, ["bench"], RANK, blocks, name="bench.safetensors")


def build(env, pack, case: str, dtype: torch.dtype):
    """(base patcher, patched patcher, timer, inputs) for one case; the pack rotates half the heads of every block."""
    cfg = CASES[case]
    base = env.tiny_flux("dev", dtype=dtype, seed=0, **cfg)
    model = base.model.diffusion_model
    head_dim = cfg["hidden"] // cfg["heads"]
    assert sum(model.params.axes_dim) == head_dim, model.params.axes_dim
    rotation_pack = bench_pack(pack, case)
    assert rotation_pack.shape == pack.saferope_comfy.flux_adapter.model_shape(base)

    timer = HookTimer()
    plain = timer.add(timer.add(base, inner=False), inner=True)
    patched = timer.add(base, inner=False)
    patched = pack.nodes.rotation_nodes.ApplyRiskRotation.execute(patched, rotation_pack, 1.0, "both")[0]
    patched = timer.add(patched, inner=True)
    context, pooled = env.encode_text(" ".join(f"word{i}" for i in range(TEXT_TOKENS)))
    latent = torch.randn(1, 16, *LATENT_HW, generator=torch.Generator().manual_seed(0))
    return plain, patched, timer, (latent, context, pooled)


class HookTimer:
    """Times the rotation hooks of each call: an outer DIFFUSION_MODEL wrapper (added before Apply, so its QKNorm
    hooks run first) stamps the time, an inner one (added after Apply, its hooks run last) adds the elapsed time."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self._start = (0.0, 0.0)

    def _stamp(self, _module, _args, _output):
        self._start = (time.perf_counter(), time.process_time())

    def _stop(self, _module, _args, _output):
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]

    def add(self, patcher, inner: bool):
        import comfy.patcher_extension

        hook = self._stop if inner else self._stamp

        def wrapper(executor, x, timestep, context, *args, **kwargs):
            model = executor.class_obj
            modules = [m for b in model.double_blocks for m in (b.txt_attn.norm, b.img_attn.norm)]
            modules += [b.norm for b in model.single_blocks]
            handles = [m.register_forward_hook(hook) for m in modules]
            try:
                return executor(x, timestep, context, *args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()

        clone = patcher.clone()
        key = "bench-timer-inner" if inner else "bench-timer-outer"
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, wrapper)
        return clone


def step(env, patcher, inputs, timer) -> dict[str, float]:
    """Seconds of one denoiser call and inside its rotation hooks, wall clock and process CPU time."""
    latent, context, pooled = inputs
    timer.wall = timer.cpu = 0.0
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        env.run_model(patcher, latent, 0.5, context, pooled)
        return {
            "wall": time.perf_counter() - wall,
            "cpu": time.process_time() - cpu,
            "hook_wall": timer.wall,
            "hook_cpu": timer.cpu,
        }


# --------------------------------------------------------------------------------------------------------------
# Step time


def measure_steps(env, pack, case: str, dtype: torch.dtype, repeats: int) -> dict:
    """Interleaved (ABBA) timed steps of the unpatched model and the Apply Risk Rotation clone."""
    start = time.perf_counter()
    plain, patched, timer, inputs = build(env, pack, case, dtype)
    built = time.perf_counter() - start
    step(env, plain, inputs, timer)  # warm-up of both arms
    step(env, patched, inputs, timer)
    runs = {"plain": [], "patched": []}
    for i in range(repeats):
        arms = [("plain", plain), ("patched", patched)]
        for name, model in arms if i % 2 == 0 else arms[::-1]:
            runs[name].append(step(env, model, inputs, timer))
    med = statistics.median
    out = {"case": case, "dtype": str(dtype).removeprefix("torch."), "built_s": built, "repeats": repeats}
    for clock in ("cpu", "wall"):
        plain_t = [r[clock] for r in runs["plain"]]
        patched_t = [r[clock] for r in runs["patched"]]
        ratios = [b / a for a, b in zip(plain_t, patched_t, strict=True)]
        hook = med(r["hook_" + clock] for r in runs["patched"]) - med(r["hook_" + clock] for r in runs["plain"])
        out[clock] = {
            "plain": med(plain_t),
            "patched": med(patched_t),
            "ratio": med(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "hook": hook,
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# Peak memory (each arm in its own process)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def memory_probe(case: str, dtype_name: str, arm: str) -> None:
    """Child process: build, warm up the arm, reset the peak-RSS counter, run one step; print JSON."""
    env, pack, _ = load_comfyui()
    plain, patched, timer, inputs = build(env, pack, case, getattr(torch, dtype_name))
    model = patched if arm == "patched" else plain
    step(env, model, inputs, timer)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        method = "VmHWM reset"
    except OSError:
        method = "ru_maxrss (lifetime peak, includes the build)"
    start_rss = _vm("VmRSS")
    step(env, model, inputs, timer)
    peak = _vm("VmHWM")
    print(json.dumps({"start_rss": start_rss, "peak_above": peak - start_rss, "method": method}))


def measure_memory(case: str, dtype_name: str, threads: int) -> dict:
    out = {}
    for arm in ("plain", "patched"):
        cmd = [
            sys.executable,
            "-m",
            "bench.adapter_overhead",
            "--threads",
            str(threads),
            "--memory-probe",
            case,
            dtype_name,
            arm,
        ]
        # glibc: every allocation of 64 KiB or more is its own mmap, returned to the system when freed, so RSS
        # follows the live tensors (else freed heap memory stays resident and hides or fakes a difference)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {case} {dtype_name} {arm} failed:\n{done.stderr[-2000:]}")
        out[arm] = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "case": case,
        "dtype": dtype_name,
        "plain": out["plain"]["peak_above"],
        "patched": out["patched"]["peak_above"],
        "start_rss": out["plain"]["start_rss"],
        "method": out["plain"]["method"],
    }


# --------------------------------------------------------------------------------------------------------------
# Profile of the rotation work of one call


def profile_rotation(pack, rotation_pack, case: str, dtype: torch.dtype, reps: int = 15) -> dict[str, float]:
    """Median CPU seconds of each part of one model call's rotation work (all blocks, q and k, text and image)."""
    from importlib import import_module

    rot = import_module(pack.saferope_core.__name__ + ".rotation")
    cfg = CASES[case]
    h, d = cfg["heads"], cfg["hidden"] // cfg["heads"]
    n_img = LATENT_HW[0] * LATENT_HW[1] // 4
    g = torch.Generator().manual_seed(1)
    # (block, token type, tokens) of every editor call; single blocks split the joint sequence and cat it back
    sites = [
        (f"double.{i}", tokens, n) for i in range(cfg["depth"]) for tokens, n in (("txt", TEXT_TOKENS), ("img", n_img))
    ]
    sites += [
        (f"single.{i}", tokens, n)
        for i in range(cfg["depth_single"])
        for tokens, n in (("txt", TEXT_TOKENS), ("img", n_img))
    ]
    parts: dict[str, float] = {}

    def timed(name, fn, *args):
        times = []
        for _ in range(reps):
            start = time.process_time()
            result = fn(*args)
            times.append(time.process_time() - start)
        parts[name] = parts.get(name, 0.0) + statistics.median(times)
        return result

    def lrs(coeff, x32):
        return coeff.square().sum(-1) / x32.square().sum(-1).clamp_min(1e-12)

    def coefficients(vec, lam, coeff, t):
        z = torch.einsum("hsr,bhls->bhlr", vec.conj(), coeff.to(vec.dtype))
        phi = t.unsqueeze(-1) * lam[:, None, :]
        return torch.einsum("hsr,bhlr->bhls", vec, rot._phase_minus_one(phi) * z).real

    def back(x32, dc, basis):
        return (x32 + torch.einsum("bhlr,hdr->bhld", dc, basis)).to(dtype)

    with torch.inference_mode():
        for block, tokens, n in sites:
            b = rotation_pack.blocks[block]
            index = b.head_index()
            w = (b.w_txt if tokens == "txt" else b.w_img)[index]
            for qk in "qk":
                x = torch.randn(1, h, n, d, generator=g).to(dtype)
                basis = (b.basis_q if qk == "q" else b.basis_k)[index].float()
                chosen = timed("index_select heads", torch.index_select, x, 1, index)
                x32 = timed("float conversion", torch.Tensor.float, chosen)
                coeff = timed("projection einsum", torch.einsum, "bhld,hdr->bhlr", x32, basis)
                t = timed("LRS", lrs, coeff, x32)
                lam, vec = timed("eigh of skew W", rot.skew_eigen, rot.skew(w.float()))
                dc = timed("coefficient rotation", coefficients, vec, lam, coeff, t)
                rotated = timed("back-projection + cast", back, x32, dc, basis)
                timed("index_copy heads", torch.index_copy, x, 1, index, rotated)
                timed("(check: SafeRoPEPack.rotate)", rotation_pack.rotate, x, block, qk, tokens)
        for _block in (s for s in rotation_pack.blocks if s.startswith("single.")):
            for _qk in "qk":
                a = torch.randn(1, h, TEXT_TOKENS, d, generator=g).to(dtype)
                c = torch.randn(1, h, n_img, d, generator=g).to(dtype)
                timed("torch.cat joint sequence", torch.cat, (a, c), 2)
    return parts


# --------------------------------------------------------------------------------------------------------------
# Report


def describe_case(case: str) -> str:
    c = CASES[case]
    return (
        f"{case}: {c['depth']}+{c['depth_single']} blocks, {c['heads']} heads x {c['hidden'] // c['heads']}, "
        f"{c['heads'] // 2} heads rotated per block, rank {RANK}, {TEXT_TOKENS} text + "
        f"{LATENT_HW[0] * LATENT_HW[1] // 4} image tokens"
    )


def print_steps(rows: list[dict]) -> None:
    print(
        "\nStep time of one denoiser call: medians; ratio = median of the per-pair ratios patched / unpatched "
        "[min..max];\nin-hook = time inside the rotation hooks per call (patched minus unpatched timing hooks)"
    )
    head = (
        f"{'case':<6} {'dtype':<9} {'clock':<5} {'unpatched':>10} {'patched':>10} {'ratio':>7} "
        f"{'pair range':>13} {'in-hook':>10} {'in-hook/step':>12}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        for clock in ("cpu", "wall"):
            c = r[clock]
            print(
                f"{r['case']:<6} {r['dtype']:<9} {clock:<5} {c['plain'] * 1e3:>8.1f}ms {c['patched'] * 1e3:>8.1f}ms "
                f"{c['ratio']:>7.3f} {c['min']:>6.3f}..{c['max']:<5.3f} {c['hook'] * 1e3:>8.2f}ms "
                f"{c['hook'] / c['plain']:>12.2%}"
            )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases",
        nargs="+",
        default=list(CASES),
        choices=list(CASES),
        help="which models to time: the tiny test model and/or a full-width FLUX slice",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="weight and activation dtypes to time",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed pairs on the slice")
    p.add_argument("--tiny-repeats", type=int, default=30, help="timed pairs on the tiny model")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: process CPU time then measures the work even on a busy "
        "machine; 0 keeps torch's default)",
    )
    p.add_argument("--no-steps", action="store_true", help="skip the step-time measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-profile", action="store_true", help="skip the rotation profile")
    p.add_argument("--memory-probe", nargs=3, metavar=("CASE", "DTYPE", "ARM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return

    env, pack, path = load_comfyui()
    import comfy.model_management

    print(
        f"ComfyUI {comfyui_version(path)} at {path}; torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for case in args.cases:
        print("  " + describe_case(case))

    rows = []
    for case in args.cases if not args.no_steps else ():
        for dtype_name in args.dtypes:
            repeats = args.tiny_repeats if case == "tiny" else args.repeats
            rows.append(measure_steps(env, pack, case, getattr(torch, dtype_name), repeats))
            comfy.model_management.unload_all_models()
            gc.collect()
            print(
                f"  measured {case} {dtype_name}: {repeats} pairs (model built in {rows[-1]['built_s']:.1f} s)",
                flush=True,
            )

    if rows:
        print_steps(rows)

    if not args.no_memory:
        print("\nPeak memory of one step above the RSS at its start (each arm in its own process)", flush=True)
        mem = [measure_memory(case, dtype_name, args.threads) for case in args.cases for dtype_name in args.dtypes]
        head = f"{'case':<6} {'dtype':<9} {'RSS at start':>13} {'unpatched':>11} {'patched':>11} {'added':>10}"
        print(f"method: {mem[0]['method']}\n{head}\n" + "-" * len(head))
        mib = 2**20
        for m in mem:
            print(
                f"{m['case']:<6} {m['dtype']:<9} {m['start_rss'] / mib:>9.0f} MiB {m['plain'] / mib:>7.1f} MiB "
                f"{m['patched'] / mib:>7.1f} MiB {(m['patched'] - m['plain']) / mib:>6.1f} MiB"
            )

    if not args.no_profile and "slice" in args.cases:
        rotation_pack = bench_pack(pack, "slice")
        for dtype_name in args.dtypes:
            parts = profile_rotation(pack, rotation_pack, "slice", getattr(torch, dtype_name))
            check = parts.pop("(check: SafeRoPEPack.rotate)")
            row = next((r for r in rows if r["case"] == "slice" and r["dtype"] == dtype_name), None)
            step_s = row["cpu"]["plain"] if row else float("nan")
            print(
                f"\nRotation work of one slice call, {dtype_name}, by part (CPU time, medians, summed over blocks, "
                "q and k, text and image)"
            )
            head = f"{'part':<28} {'ms':>8} {'share':>7} {'of step':>8}"
            print(head + "\n" + "-" * len(head))
            total = sum(parts.values())
            for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"{name:<28} {seconds * 1e3:>8.2f} {seconds / total:>7.1%} {seconds / step_s:>8.3%}")
            print(f"{'sum of parts':<28} {total * 1e3:>8.2f} {'':>7} {total / step_s:>8.3%}")
            print(
                f"{'SafeRoPEPack.rotate calls':<28} {check * 1e3:>8.2f} {'':>7} {check / step_s:>8.3%}"
                "   (the same calls, whole; no cat)"
            )
            if row:
                print(
                    f"{'measured in the hooks':<28} {row['cpu']['hook'] * 1e3:>8.2f} {'':>7} "
                    f"{row['cpu']['hook'] / step_s:>8.3%}"
                )


if __name__ == "__main__":
    main()
