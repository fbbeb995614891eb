"""Shared by every tier: where a ComfyUI checkout is present (the one the ComfyUI tier would use), a skipped test of
the ComfyUI or browser tier fails instead, whatever started pytest (tests/run_all.py, `python -m pytest tests`, an
IDE), so a missing extra (Chromium, Playwright, NudeNet, MiniLM, the shared data) cannot hide part of a tier."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench.comfyui_env import find_comfyui  # noqa: E402

COMFYUI = find_comfyui()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if COMFYUI is not None and report.skipped and not hasattr(report, "wasxfail") and "core" not in item.path.parts:
        report.outcome = "failed"
        report.longrepr = f"skipped although a ComfyUI is present ({COMFYUI}): {report.longrepr}"
