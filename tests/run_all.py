"""Run every test tier: the core tier once, then the ComfyUI and browser tiers against each ComfyUI version.

    python tests/run_all.py [--only VERSION ...] [--no-gate] [-- extra pytest arguments]

Works from any Python 3.10+ with pip (system, venv, conda, ComfyUI portable's embedded Python): it installs what it
needs itself. Each ComfyUI version gets its own virtual environment, isolated from the Python that started it, with
the torch family that version needs (torch_family), its own requirements (frontend package, comfy-kitchen, ...) and
the tests' requirements (tests/requirements.txt); environments are cached in $SAFEROPE_VENVS (default
~/.cache/saferope-tests) and rebuilt when what they should hold changes. The browser tier also needs a Chromium
(Debian: apt-get install -y chromium; or $SAFEROPE_CHROMIUM).

ComfyUI versions: $COMFYUI_PATH alone when it is set (a developer's own checkout, used in place), else every
unmodified source tree in shared/comfyui/ beside this repository. Each tree is copied to a temporary folder (the
shared trees are read-only). With a ComfyUI present the ComfyUI and browser tiers may not skip anything: a skip
fails the run. Then the mutation gate (tests/mutation_gate.py) runs with the newest version's environment: each
named mutation of a central behaviour must make its tests fail. Prints a summary line per tier and exits non-zero
if any tier failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_REQUIREMENTS = REPO / "tests" / "requirements.txt"
TORCH_FAMILY = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$")
EXTRA_REQUIREMENTS = ["comfyui-frontend-package", "av", "requests"]  # what ComfyUI's server needs beyond its list
# (first ComfyUI version, torch family): ComfyUI 0.33 imports torchaudio at start, and no torchaudio exists for
# torch 2.14; older versions run on the 2.14.1 pair (a CPU-capable pair that imports together).
TORCH_FAMILIES = [
    ((0, 33), ["torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"]),
    ((0, 0), ["torch==2.14.1", "torchvision==0.29.1"]),
]


def shared_dir() -> Path | None:
    return next((p for p in (REPO.parent / "shared", Path("/work/shared")) if p.is_dir()), None)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def comfyui_trees() -> list[Path]:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return [Path(env)]
    shared = shared_dir()
    if shared is None:
        return []
    trees = (p for p in (shared / "comfyui").glob("*") if (p / "comfy" / "model_patcher.py").is_file())
    return sorted(trees, key=lambda p: version_key(p.name))


def version_of(tree: Path) -> str:
    text = (tree / "comfyui_version.py").read_text() if (tree / "comfyui_version.py").is_file() else ""
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return found.group(1) if found else tree.name


def torch_family(version: str) -> list[str]:
    return next(pins for first, pins in TORCH_FAMILIES if version_key(version) >= first)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_venv(venv: Path) -> None:
    """An empty virtual environment with pip, from the base of this Python. The standard `venv` module where it
    works; else (embedded Pythons, Debian without python3-venv) virtualenv, installed into the cache with --target,
    which works where pip may not install into the Python itself."""
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode == 0 and venv_python(venv).is_file():
        return
    shutil.rmtree(venv, ignore_errors=True)
    tool = venv.parent / "virtualenv-tool"
    if not (tool / "virtualenv").is_dir():
        print(f"`{sys.executable} -m venv` failed ({made.stderr.strip()[-200:]}); using virtualenv instead", flush=True)
        pip_install(Path(sys.executable), ["--target", str(tool), "virtualenv==20.35.4"])
    run_virtualenv = (
        f"import sys; sys.path.insert(0, {str(tool)!r}); import virtualenv; virtualenv.cli_run(sys.argv[1:])"
    )
    subprocess.run([sys.executable, "-c", run_virtualenv, str(venv)], check=True)


def pip_install(python: Path, args: list[str]) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)


def environment(name: str, requirements: list[str]) -> Path:
    """The cached virtual environment `name` holding exactly `requirements` (rebuilt when they change); its python."""
    root = Path(os.environ.get("SAFEROPE_VENVS", Path.home() / ".cache" / "saferope-tests"))
    venv = root / f"venv-{name}"
    wanted = "\n".join(requirements) + "\n"
    digest = hashlib.sha256(f"{platform.python_version()}\n{wanted}".encode()).hexdigest()
    marker = venv / "saferope-requirements.sha256"
    python = venv_python(venv)
    if marker.is_file() and marker.read_text() == digest and subprocess.run([str(python), "-c", ""]).returncode == 0:
        return python
    print(
        f"setting up the test environment {venv} (first time: downloads torch and ComfyUI's requirements)", flush=True
    )
    shutil.rmtree(venv, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    make_venv(venv)
    listed = venv / "saferope-requirements.txt"
    listed.write_text(wanted)
    pip_install(python, ["-r", str(listed)])
    marker.write_text(digest)
    return python


def requirement_lines(path: Path) -> list[str]:
    """The requirements a file lists, with the files it includes (-r) read in."""
    lines = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            lines += requirement_lines(path.parent / line[3:].strip())
        elif line:
            lines.append(line)
    return lines


def tree_requirements(tree: Path, version: str) -> list[str]:
    """What the tests of `tree` need: its torch family, its own requirements but torch, the server's extras and
    the tests' own requirements."""
    own = [ln for ln in requirement_lines(tree / "requirements.txt") if not TORCH_FAMILY.match(ln)]
    return [*torch_family(version), *own, *EXTRA_REQUIREMENTS, *requirement_lines(TEST_REQUIREMENTS)]


def run_pytest(python: Path, paths: list[str], env: dict, extra: list[str]) -> tuple[int, str]:
    """Run pytest; returns (exit code, its final summary line)."""
    cmd = [str(python), "-m", "pytest", *paths, "-p", "no:cacheprovider", *extra]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in process.stdout:
        sys.stdout.write(line)
        if line.strip():
            last = line.strip()
    return process.wait(), last.strip("= ")


def run_gate(python: Path, checkout: Path, env: dict) -> tuple[str, int, str]:
    """The mutation gate (tests/mutation_gate.py) with a ComfyUI version's environment: (name, code, summary)."""
    cmd = [str(python), "tests/mutation_gate.py", "--python", str(python), "--comfyui", str(checkout)]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in process.stdout:
        sys.stdout.write(line)
        if line.startswith("mutation gate:"):
            last = line.strip().removeprefix("mutation gate: ")
    return "mutation gate", process.wait(), last


def checkout_of(tree: Path, tmp: str) -> Path:
    """The checkout the tests use: $COMFYUI_PATH in place, else a writable copy of the read-only shared tree."""
    if os.environ.get("COMFYUI_PATH"):
        return tree
    checkout = Path(tmp) / "ComfyUI"
    shutil.copytree(tree, checkout, ignore=shutil.ignore_patterns("__pycache__"))
    for path in checkout.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    return checkout


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/run_all.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="VERSION", help="test only these ComfyUI versions (e.g. 0.33.0)")
    parser.add_argument("--no-gate", action="store_true", help="leave out the mutation gate (tests/mutation_gate.py)")
    parser.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, help="after --: arguments passed to every pytest run (e.g. -- -x)"
    )
    args = parser.parse_args(argv)
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    trees = [(tree, version_of(tree)) for tree in comfyui_trees()]
    if args.only:
        trees = [(tree, version) for tree, version in trees if version in args.only or tree.name in args.only]
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    results = []
    pythons = {version: environment(version, tree_requirements(tree, version)) for tree, version in trees}
    core_python = (
        pythons[trees[-1][1]]
        if trees
        else environment("core", [*TORCH_FAMILIES[-1][1], *requirement_lines(TEST_REQUIREMENTS)])
    )
    code, summary = run_pytest(core_python, ["tests/core"], {**env, "COMFYUI_PATH": ""}, extra)
    results.append(("core", code, summary))
    if not trees:
        print("ComfyUI and browser tiers did not run: no ComfyUI tree in shared/comfyui and no $COMFYUI_PATH")
    for tree, version in trees:
        # the browser tier and the server fuzzing (end_versions) on the oldest and the newest version: what lies
        # between them changes less than the ends; tests whose results do not depend on the version (one_version:
        # the offline testbed) with the newest only
        newest, end = version == trees[-1][1], version in (trees[0][1], trees[-1][1])
        tiers = ["tests/integration", "tests/browser"] if end else ["tests/integration"]
        name = f"ComfyUI {version} ({'ComfyUI + browser tiers' if end else 'ComfyUI tier'})"
        left_out = [m for m, run in (("one_version", newest), ("end_versions", end)) if not run]
        marks = ["-m", " and ".join(f"not {m}" for m in left_out)] if left_out else []
        with tempfile.TemporaryDirectory(prefix=f"comfyui-{version}-") as tmp:
            checkout = checkout_of(tree, tmp)
            code, summary = run_pytest(pythons[version], tiers, {**env, "COMFYUI_PATH": str(checkout)}, marks + extra)
            results.append((name, code, summary))
            if version == trees[-1][1] and not args.no_gate:
                results.append(run_gate(pythons[version], checkout, env))
    print("\n" + "\n".join(f"{'ok  ' if code == 0 else 'FAIL'} {name}: {summary}" for name, code, summary in results))
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
