"""The mutation gate: each named mutation of a central behaviour (tests/mutations.py) must make the tests that claim
to cover it fail.

    python tests/mutation_gate.py [--python PY] [--comfyui PATH] [--only NAME ...] [--jobs N] [--list]

For each mutation the repository is copied to a temporary folder (code only), the mutation's text replacement is
applied there (it must match exactly once), and only the mutation's tests run (pytest -x): core tests with no
ComfyUI, the others against the ComfyUI at --comfyui (default $COMFYUI_PATH) with that ComfyUI's Python (--python,
default this one). A mutation is caught when pytest reports failed tests; it survives when they pass, and the gate
fails. Mutations are checked --jobs at a time (default: one per core), each test run on one thread.
tests/run_all.py runs the gate with the newest ComfyUI version's environment.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from mutations import MUTATIONS, Mutation  # noqa: E402

COPIED = shutil.ignore_patterns(".git", "__pycache__", "out", ".pytest_cache", ".ruff_cache")


def mutated_copy(mutation: Mutation, into: Path) -> Path:
    """A copy of the repository with `mutation` applied; ValueError when its text does not match exactly once."""
    copy = into / "repo"
    shutil.copytree(REPO, copy, ignore=COPIED)
    path = copy / mutation.file
    text = path.read_text()
    found = text.count(mutation.original)
    if found != 1:
        raise ValueError(f"{mutation.name}: the original text occurs {found} times in {mutation.file}, not once")
    path.write_text(text.replace(mutation.original, mutation.mutant))
    return copy


def run_tests(mutation: Mutation, copy: Path, python: str, comfyui: str) -> int:
    """pytest's exit code for the mutation's tests inside the mutated copy."""
    core = all(t.startswith("tests/core") for t in mutation.tests)
    # one thread per run: the gate runs several mutations side by side, one per core
    env = {**os.environ, "COMFYUI_PATH": "" if core else comfyui, "OMP_NUM_THREADS": "1"}
    cmd = [python, "-m", "pytest", *mutation.tests, "-x", "-q", "-p", "no:cacheprovider", "--no-header"]
    done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.stdout.write(done.stdout[-3000:] + done.stderr[-3000:])
    return done.returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python tests/mutation_gate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the tests")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="check only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutations checked at once")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n    {m.file}; caught by {' '.join(m.tests)}")
        return 0
    if not args.comfyui and any(not t.startswith("tests/core") for m in chosen for t in m.tests):
        print("the mutation gate needs a ComfyUI checkout for its ComfyUI-tier tests (--comfyui or $COMFYUI_PATH)")
        return 2
    start = time.perf_counter()

    def check(m: Mutation) -> tuple[str, str]:
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
            try:
                code = run_tests(m, mutated_copy(m, Path(tmp)), args.python, args.comfyui)
                verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"ERROR (pytest exit code {code})")
            except ValueError as err:
                verdict = f"ERROR ({err})"
        print(f"{verdict:<8} {m.name} ({time.perf_counter() - began:.0f} s): {m.what}", flush=True)
        return m.name, verdict

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(check, chosen))
    bad = [name for name, verdict in results if verdict != "caught"]
    print(f"mutation gate: {len(results) - len(bad)} of {len(results)} caught in {time.perf_counter() - start:.0f} s")
    if bad:
        print("not caught: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
