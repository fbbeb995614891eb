"""One command for every concept: `python -m bench.testbed benchmark`.

For each target (the six colours and the patterns striped and dotted) it runs the erase benchmark twice with the
nodes' defaults, each in its own process (one torch thread, `--jobs` at a time): once with the default objective
(rows base, Rand, SafeRoPE, UVR, SafeRoPE + UVR, and the prompt
redirector alone, with SafeRoPE, and with both) and once with the other objective (its SafeRoPE row only). It then
writes one table per target and a summary over targets to bench/out/testbed/<name>.md (results JSON beside it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import detection, world
from .erase import FAMILIES, OUT_DIR, TABLE_HEADER, EraseSettings, table_row

TARGETS = (*world.COLOURS, "striped", "dotted")
OBJECTIVES = ("redirect", "deviate")


def _runs(targets, default: str, world_name: str = "plain") -> list[tuple[str, str, list[str]]]:
    """(target, result name, erase arguments) of every run."""
    runs = []
    for target in targets:
        runs.append(
            (target, f"bench_{target}_{default}", ["--target", target, "--objective", default, "--world", world_name])
        )
        for other in OBJECTIVES:
            if other != default:
                args = ["--target", target, "--objective", other, "--skip-rand", "--skip-uvr", "--skip-redirector"]
                args += ["--skip-default-pack", "--world", world_name]
                runs.append((target, f"bench_{target}_{other}", args))
    return runs


def _run(args: list[str], name: str, threads: int) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "bench.testbed", "erase", *args, "--name", name, "--threads", str(threads)]
    log = OUT_DIR / f"{name}.log"
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _rows(target: str, default: str) -> list[tuple[str, dict]]:
    """The target's rows in table order, named with their objective."""
    rows = []
    for objective in (default, *(o for o in OBJECTIVES if o != default)):
        result = json.loads((OUT_DIR / f"bench_{target}_{objective}.json").read_text())
        for row in result["rows"]:
            if row["name"] == "base" and objective != default:
                continue
            name = row["name"].replace("SafeRoPE", f"SafeRoPE ({objective})")
            rows.append((name, row))
    order = ["base", "Rand", *(f"SafeRoPE ({o})" for o in OBJECTIVES), "UVR"]
    return sorted(rows, key=lambda r: order.index(r[0]) if r[0] in order else len(order))


def summary_row(target: str, name: str, row: dict, base: dict) -> str:
    drops = [base["non_target_per_value"][v] - a for v, a in row["non_target_per_value"].items()]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    return (
        f"| {target} | {name} | {pct(row['erase_target'])} | {pct(row['erase_paraphrase'])} | "
        f"{pct(row['erase_compositional'])} | {pct(row.get('erase_unseen'))} | {pct(row.get('replaced'))} | "
        f"{pct(row.get('attack'))} | {pct(max(drops))} |"
    )


def report(targets, default: str, seconds: dict) -> str:
    s = EraseSettings(target=targets[0])
    lines = [
        f"Testbed benchmark, node defaults (objective {default}, learning rate {s.learning_rate}, {s.train_steps} "
        f"steps, rank {s.rank}, LRS > {s.lrs_threshold}, delta >= {s.hds_threshold}); families " + ", ".join(FAMILIES),
        "",
        "Summary (SafeRoPE and prompt redirector rows; worst drop = the largest fall in accuracy of any other value, "
        "points):",
        "",
        "| target | model | erase target % | paraphrase % | compositional % | unseen words % | replaced % "
        "| attack % | worst non-target drop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tables, detections = [], []
    for target in targets:
        rows = _rows(target, default)
        base = rows[0][1]
        shown = ("SafeRoPE", "Redirector", "default pack")
        lines += [summary_row(target, n, r, base) for n, r in rows if n.startswith(shown)]
        found = json.loads((OUT_DIR / f"bench_{target}_{default}.json").read_text()).get("detection")
        if found:
            names = detection.DETECTOR_NAMES
            detections += [detection.detection_row(found[d], f"{target} | {names[d]}") for d in detection.DETECTORS]
        minutes = sum(v for k, v in seconds.items() if k.startswith(f"bench_{target}_")) / 60
        tables += ["", f"**{target}** ({minutes:.1f} min)", "", TABLE_HEADER, "|---" * 11 + "|"]
        tables += [table_row(r, n) for n, r in rows]
    if detections:
        header = detection.DETECTION_HEADER.replace("|", "| target |", 1)
        lines += ["", f"Prompt redirector detection ({detection.NOTE}):", "", header]
        lines += ["|---" * (len(detection.FAMILIES) + 2) + "|", *detections]
    return "\n".join(lines + tables)


def benchmark(targets=None, jobs=2, threads=1, default="redirect", name="benchmark", world_name="plain"):
    targets = list(targets or TARGETS)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    runs = _runs(targets, default, world_name)
    with ThreadPoolExecutor(jobs) as pool:
        times = list(pool.map(lambda r: _run(r[2], r[1], threads), runs))
    seconds = {r[1]: t for r, t in zip(runs, times, strict=True)}
    text = report(targets, default, seconds)
    (OUT_DIR / f"{name}.md").write_text(text + "\n")
    return text
