"""One command for every concept: `python -m bench.testbed benchmark`.

For each target (the six colours and the patterns striped and dotted) it runs the erase benchmark twice with the
nodes' defaults, each in its own process (one torch thread, `--jobs` at a time): once with the default objective
(rows base, Rand, SafeRoPE, UVR, SafeRoPE + UVR, and the prompt
redirector alone, with SafeRoPE, and with both, and the default pack) and once with the other objective (its SafeRoPE
row only); with `--seeds N`, all of it for seeds 0 .. N-1. It then writes one table per target (seed 0) and a summary
over targets (each figure's mean and standard deviation over the seeds) to bench/out/testbed/<name>.md (results JSON
beside it). `--world defaults` runs it on the world with defaults; `--only-default-pack` runs the rows base and
default pack only, `--single-guards` the rows base, SafeRoPE, UVR, prompt redirector and default pack (no Rand, no
stacks, no other objective). A row missing from some seeds' runs is summarised over the seeds that have it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import detection, world
from .erase import FAMILIES, OUT_DIR, TABLE_HEADER, EraseSettings, table_row

TARGETS = (*world.COLOURS, "striped", "dotted")
OBJECTIVES = ("redirect", "deviate")


def result_name(target: str, objective: str, seed: int, world_name: str = "plain") -> str:
    """The erase run's result name (bench/out/testbed/<name>.json): the plain world's seed 0 keeps the name it had
    before worlds and seeds."""
    world_part = "" if world_name == "plain" else f"_{world_name}"
    return f"bench_{target}_{objective}{world_part}" + (f"_seed{seed}" if seed else "")


def _runs(
    targets,
    default: str,
    world_name: str = "plain",
    seeds: int = 1,
    only_default_pack: bool = False,
    single_guards: bool = False,
) -> list[tuple[str, str, list[str]]]:
    """(target, result name, erase arguments) of every run."""
    runs = []
    for seed in range(seeds):
        common = ["--world", world_name, "--seed", str(seed)]
        for target in targets:
            args = ["--target", target, "--objective", default, *common]
            if only_default_pack or single_guards:
                rows = ["--only-default-pack"] if only_default_pack else ["--skip-rand", "--skip-stacks"]
                runs.append((target, result_name(target, default, seed, world_name), [*args, *rows]))
                continue
            runs.append((target, result_name(target, default, seed, world_name), args))
            for other in OBJECTIVES:
                if other != default:
                    args = ["--target", target, "--objective", other, "--skip-rand", "--skip-uvr", "--skip-redirector"]
                    name = result_name(target, other, seed, world_name)
                    runs.append((target, name, [*args, "--skip-default-pack", *common]))
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


def _rows(target: str, default: str, seed: int = 0, world_name: str = "plain") -> list[tuple[str, dict]]:
    """The target's rows of one seed in table order, named with their objective (the other objective's run only
    where it was run)."""
    rows = []
    for objective in (default, *(o for o in OBJECTIVES if o != default)):
        path = OUT_DIR / f"{result_name(target, objective, seed, world_name)}.json"
        if objective != default and not path.exists():
            continue
        result = json.loads(path.read_text())
        for row in result["rows"]:
            if row["name"] == "base" and objective != default:
                continue
            name = row["name"].replace("SafeRoPE", f"SafeRoPE ({objective})")
            rows.append((name, row))
    order = ["base", "Rand", *(f"SafeRoPE ({o})" for o in OBJECTIVES), "UVR"]
    return sorted(rows, key=lambda r: order.index(r[0]) if r[0] in order else len(order))


def summary_row(target: str, name: str, rows: list[dict], bases: list[dict]) -> str:
    """One summary line of a row over seeds: each figure's mean, and '± standard deviation' where seeds > 1."""

    def figure(values) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        text = f"{100 * statistics.fmean(values):.1f}"
        return text + (f" ± {100 * statistics.pstdev(values):.1f}" if len(values) > 1 else "")

    def worst_drop(row, base):
        return max(base["non_target_per_value"][v] - a for v, a in row["non_target_per_value"].items())

    columns = ("erase_target", "erase_paraphrase", "erase_compositional", "erase_unseen", "replaced", "attack")
    cells = [figure(row.get(c) for row in rows) for c in columns]
    cells.append(figure(worst_drop(row, base) for row, base in zip(rows, bases, strict=True)))
    return f"| {target} | {name} | " + " | ".join(cells) + " |"


def report(targets, default: str, seconds: dict, seeds: int = 1, world_name: str = "plain") -> str:
    s = EraseSettings(target=targets[0])
    lines = [
        f"Testbed benchmark, node defaults (objective {default}, learning rate {s.learning_rate}, {s.train_steps} "
        f"steps, rank {s.rank}, LRS > {s.lrs_threshold}, delta >= {s.hds_threshold}); families " + ", ".join(FAMILIES),
        "",
        "Summary (SafeRoPE, UVR, prompt redirector and default pack rows; worst drop = the largest fall in accuracy of "
        "any other value, points"
        + (f"; mean ± standard deviation over {seeds} seeds; the tables: seed 0):" if seeds > 1 else "):"),
        "",
        "| target | model | erase target % | paraphrase % | compositional % | unseen words % | replaced % "
        "| attack % | worst non-target drop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tables, detections = [], []
    for target in targets:
        rows = _rows(target, default, 0, world_name)
        per_seed = [dict(rows), *(dict(_rows(target, default, seed, world_name)) for seed in range(1, seeds))]
        bases = [by_name["base"] for by_name in per_seed]
        shown = ("SafeRoPE", "UVR", "Redirector", "default pack")
        for n, _ in rows:
            if n.startswith(shown):  # over the seeds whose run has the row
                seeds_with = [(by_name[n], base) for by_name, base in zip(per_seed, bases, strict=True) if n in by_name]
                lines.append(summary_row(target, n, *map(list, zip(*seeds_with, strict=True))))
        found = json.loads((OUT_DIR / f"{result_name(target, default, 0, world_name)}.json").read_text()).get(
            "detection"
        )
        if found:
            names = detection.DETECTOR_NAMES
            detections += [detection.detection_row(found[d], f"{target} | {names[d]}") for d in detection.DETECTORS]
        minutes = sum(v for k, v in seconds.items() if k.startswith(f"bench_{target}_")) / 60
        took = f"{minutes:.1f} min" + (f" over {seeds} seeds; seed 0" if seeds > 1 else "")
        tables += ["", f"**{target}** ({took})", "", TABLE_HEADER, "|---" * 11 + "|"]
        tables += [table_row(r, n) for n, r in rows]
    if detections:
        header = detection.DETECTION_HEADER.replace("|", "| target |", 1)
        lines += ["", f"Prompt redirector detection ({detection.NOTE}):", "", header]
        lines += ["|---" * (len(detection.FAMILIES) + 2) + "|", *detections]
    return "\n".join(lines + tables)


def benchmark(
    targets=None,
    jobs=2,
    threads=1,
    default="redirect",
    name="benchmark",
    world_name="plain",
    seeds=1,
    only_default_pack=False,
    resume=False,
    single_guards=False,
):
    """Every run, then the report. `resume`: a run whose result file exists is not run again (its time counts 0)."""
    targets = list(targets or TARGETS)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    runs = _runs(targets, default, world_name, seeds, only_default_pack, single_guards)
    todo = [r for r in runs if not (resume and (OUT_DIR / f"{r[1]}.json").exists())]
    with ThreadPoolExecutor(jobs) as pool:
        times = list(pool.map(lambda r: _run(r[2], r[1], threads), todo))
    seconds = {r[1]: t for r, t in zip(todo, times, strict=True)}
    text = report(targets, default, seconds, seeds, world_name)
    (OUT_DIR / f"{name}.md").write_text(text + "\n")
    return text
