"""Step-time overhead of Restrict Unsafe Flow, during the start-up steps and after them, as ratios to the
unpatched model measured in one run; and the peak memory it adds.

    python -m bench.uvr_overhead [--repeats 5] [--slice-only | --tiny-only]

Models: the tiny FLUX of the tests, and a full-width FLUX slice (hidden 3072, 24 heads x 128, one double and two
single blocks: detection at single block 0), 512x512 image (1,024 image tokens), 512 text tokens. Anchors are
random and the threshold is -1, so every patch is flagged: the worst case for the restriction's cost. Start-up is
timed as two calls of one sampling run (sigmas 1.0 then 0.95): the first detects and restricts the blocks after
the detection block, the second restricts every block with the first one's mask and detects again.
Peak memory: maximum resident set size (ru_maxrss) of separate processes that run only the base or only the
patched model, so one does not hide the other.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import comfyui_env

MODELS = {
    "tiny": dict(hidden=64, heads=4, depth=2, depth_single=2, size=64, text=32),
    "slice": dict(hidden=3072, heads=24, depth=1, depth_single=2, size=512, text=512),
}


def setup(name: str, kind: str = "dev"):
    comfyui_env.import_comfyui()
    pack = comfyui_env.import_pack()
    cfg = MODELS[name]
    model = comfyui_env.tiny_flux(
        kind, depth=cfg["depth"], depth_single=cfg["depth_single"], hidden=cfg["hidden"], heads=cfg["heads"]
    )
    shape = pack.saferope_comfy.flux_adapter.model_shape(model)
    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(shape.heads, 4, shape.head_dim, generator=g), dim=-1)
    uvr = pack.saferope_core.uvr.UVRAnchors(
        shape, "single.0", anchors, torch.zeros(shape.heads, shape.head_dim), 0.0, 0.85, ["random"]
    )
    x = torch.randn(1, 16, cfg["size"] // 8, cfg["size"] // 8, generator=g)
    context = torch.randn(1, cfg["text"], comfyui_env.CONTEXT_DIM, generator=g)
    pooled = torch.randn(1, comfyui_env.POOLED_DIM, generator=g)
    editor = pack.saferope_comfy.editors.UnsafeFlowRestriction(uvr, 1.0, -1.0, 0.85)
    return model, pack.saferope_comfy.flux_adapter.with_qk_editor(model, editor), editor, (x, context, pooled)


def timed(model, inputs, sigmas) -> float:
    """Seconds of one sampling run (Euler, cfg 1: one model call per sigma) through ComfyUI's sampler."""
    x, context, pooled = inputs
    positive = [[context, {"pooled_output": pooled}]]
    start = time.perf_counter()
    comfyui_env.sample(model, positive, positive, latent=torch.zeros_like(x), sigmas=[*sigmas, 0.0])
    return time.perf_counter() - start


def ratios(name: str, repeats: int) -> dict:
    model, patched, editor, inputs = setup(name)
    detections = []
    editor.on_detect = detections.append
    out = {}
    for label, sigmas in (("start-up (sigma 1, 0.95)", (1.0, 0.95)), ("after (sigma 0.5)", (0.5,))):
        timed(model, inputs, sigmas), timed(patched, inputs, sigmas)
        base, mine = [], []
        for _ in range(repeats):  # interleaved, medians
            base.append(timed(model, inputs, sigmas))
            mine.append(timed(patched, inputs, sigmas))
        out[label] = (statistics.median(base), statistics.median(mine))
    flagged = float(detections[-1]["core"].float().mean())
    return {"times": out, "flagged": flagged}


def peak_rss_mib(name: str, patched: bool) -> float:
    code = (
        f"import sys; sys.argv=['x']; import bench.uvr_overhead as b; m, p, e, i = b.setup({name!r}); "
        f"b.timed({'p' if patched else 'm'}, i, (1.0, 0.95)); import resource; "
        f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (medians are reported)")
    p.add_argument("--tiny-only", action="store_true", help="time only the tiny test model")
    p.add_argument("--slice-only", action="store_true", help="time only the full-width slice")
    args = p.parse_args(argv)
    if comfyui_env.find_comfyui() is None:
        sys.exit("no ComfyUI checkout found (set COMFYUI_PATH): this benchmark runs ComfyUI's FLUX classes")
    names = ["tiny"] if args.tiny_only else ["slice"] if args.slice_only else ["tiny", "slice"]
    print(f"{'model':6} {'phase':25} {'base ms':>9} {'UVR ms':>9} {'ratio':>6}")
    for name in names:
        result = ratios(name, args.repeats)
        for label, (base, mine) in result["times"].items():
            print(f"{name:6} {label:25} {base * 1e3:9.1f} {mine * 1e3:9.1f} {mine / base:6.3f}")
        print(f"{name:6} patches flagged: {100 * result['flagged']:.0f}%")
        base_rss, uvr_rss = peak_rss_mib(name, False), peak_rss_mib(name, True)
        print(
            f"{name:6} peak RSS base {base_rss:.0f} MiB, with UVR {uvr_rss:.0f} MiB, "
            f"added {uvr_rss - base_rss:+.0f} MiB"
        )


if __name__ == "__main__":
    main()
