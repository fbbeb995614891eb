"""bench/gpu_check.py, the script for the day a GPU is there: without CUDA it says so; its dry run (tiny models on
the CPU) goes through every measurement and prints the table."""

import pytest
import torch

from bench import gpu_check


@pytest.mark.one_version
def test_gpu_check_says_it_needs_a_gpu_and_its_dry_run_prints_the_table(comfy, capsys):
    if torch.cuda.is_available():
        pytest.fail("this test expects a machine without CUDA (the CI's)")
    assert gpu_check.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert gpu_check.main(["--dry-run", "--repeats", "1", "--models", "flux1-dev"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines if line.startswith("| flux1-dev |")]
    assert [r[1] for r in rows] == [
        "step ms",
        "overhead per step %",
        "syncs in one step (pack / other)",
        "Train Risk Rotations step / forward+backward",
    ], lines
    assert all(float(ms) > 0 for ms in rows[0][2:6]), rows[0]
    assert rows[3][3].endswith("x") and float(rows[3][3].split("= ")[1][:-1]) > 1, rows[3]
