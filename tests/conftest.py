"""Shared by every tier: with $SAFEROPE_FORBID_SKIPS set (tests/run_all.py sets it when a ComfyUI tree exists),
a skipped test of the ComfyUI or browser tier fails instead, so a missing extra cannot hide a tier."""

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    forbidden = os.environ.get("SAFEROPE_FORBID_SKIPS") and "core" not in item.path.parts
    if forbidden and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where skips are forbidden ($SAFEROPE_FORBID_SKIPS): {report.longrepr}"
