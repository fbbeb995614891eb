"""Run every test tier: the core tier once, then the ComfyUI and browser tiers against each ComfyUI version.

    python tests/run_all.py [-- extra pytest arguments]

ComfyUI versions: $COMFYUI_PATH alone when it is set (a developer's own checkout, used in place), else every
unmodified source tree in shared/comfyui/ beside this repository (0.3.64 and 0.8.0). Each tree is copied to a
temporary folder (the shared trees are read-only) and gets a virtual environment that sees this Python's packages
(torch stays the project's pinned pair) plus that version's own requirements (its frontend package, comfy-kitchen,
...), cached in $SAFEROPE_VENVS (default ~/.cache/saferope-tests). With a tree present the ComfyUI tier may not
skip anything: a skip there fails the run. Prints a summary line per tier and exits non-zero if any tier failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH_FAMILY = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*$")
EXTRA_REQUIREMENTS = ["comfyui-frontend-package", "av", "requests"]  # what ComfyUI's server needs beyond its list


def shared_dir() -> Path | None:
    return next((p for p in (REPO.parent / "shared", Path("/work/shared")) if p.is_dir()), None)


def comfyui_trees() -> list[Path]:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return [Path(env)]
    shared = shared_dir()
    if shared is None:
        return []
    return sorted(
        (p for p in (shared / "comfyui").glob("*") if (p / "comfy" / "model_patcher.py").is_file()),
        key=lambda p: tuple(int(x) for x in re.findall(r"\d+", p.name)),
    )


def version_of(tree: Path) -> str:
    text = (tree / "comfyui_version.py").read_text() if (tree / "comfyui_version.py").is_file() else ""
    found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return found.group(1) if found else tree.name


def environment_for(tree: Path, version: str) -> Path:
    """A venv over this Python's packages with the tree's own requirements (torch family excluded); cached."""
    lines = [ln for ln in (tree / "requirements.txt").read_text().splitlines() if not TORCH_FAMILY.match(ln)]
    wanted = "\n".join(lines + EXTRA_REQUIREMENTS)
    root = Path(os.environ.get("SAFEROPE_VENVS", Path.home() / ".cache" / "saferope-tests"))
    venv = root / f"venv-{version}"
    marker = venv / "saferope-requirements.sha256"
    digest = hashlib.sha256(f"{sys.executable}\n{wanted}".encode()).hexdigest()
    python = venv / "bin" / "python"
    if python.is_file() and marker.is_file() and marker.read_text() == digest:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    requirements = venv / "requirements.txt"
    requirements.write_text(wanted + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(requirements)], check=True
    )
    marker.write_text(digest)
    return python


def run_pytest(python: str | Path, paths: list[str], env: dict, extra: list[str]) -> tuple[int, str]:
    """Run pytest; returns (exit code, its final summary line)."""
    cmd = [str(python), "-m", "pytest", *paths, "-p", "no:cacheprovider", *extra]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in process.stdout:
        sys.stdout.write(line)
        if line.strip():
            last = line.strip()
    return process.wait(), last.strip("= ")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/run_all.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "pytest_args",
        nargs=argparse.REMAINDER,
        help="after --: arguments passed to every pytest run (e.g. -- -x -k families)",
    )
    extra = parser.parse_args(argv).pytest_args
    extra = extra[1:] if extra[:1] == ["--"] else extra
    results = []
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    code, summary = run_pytest(sys.executable, ["tests/core"], {**env, "COMFYUI_PATH": ""}, extra)
    results.append(("core", code, summary))
    trees = comfyui_trees()
    if not trees:
        print("ComfyUI and browser tiers did not run: no ComfyUI tree in shared/comfyui and no $COMFYUI_PATH")
    for tree in trees:
        version = version_of(tree)
        with tempfile.TemporaryDirectory(prefix=f"comfyui-{version}-") as tmp:
            if os.environ.get("COMFYUI_PATH"):
                checkout = tree
            else:
                checkout = Path(tmp) / "ComfyUI"
                shutil.copytree(tree, checkout, ignore=shutil.ignore_patterns("__pycache__"))
                for path in checkout.rglob("*"):  # read-only sources stay writable in the copy
                    path.chmod(path.stat().st_mode | 0o200)
            python = environment_for(checkout, version)
            tier_env = {**env, "COMFYUI_PATH": str(checkout), "SAFEROPE_FORBID_SKIPS": "1"}
            code, summary = run_pytest(python, ["tests/integration", "tests/browser"], tier_env, extra)
            results.append((f"ComfyUI {version} (ComfyUI + browser tiers)", code, summary))
    print("\n" + "\n".join(f"{'ok  ' if code == 0 else 'FAIL'} {name}: {summary}" for name, code, summary in results))
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
