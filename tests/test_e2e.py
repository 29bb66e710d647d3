"""The README's default job, end to end (slow: about 8 minutes on 2 CPU cores).

Run with: JAX_PLATFORMS=cpu python -m pytest -q -m slow
"""

import json
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_default_cpu_job_learns_sudoku(tmp_path):
    """configs/sudoku_cpu.flags on fresh built-in data: >= 97% token and >= 85% exact accuracy
    on held-out puzzles with 40..50 blanks (the README's claim)."""
    cmd = [
        sys.executable,
        "train.py",
        "--flagfile=configs/sudoku_cpu.flags",
        f"--workdir={tmp_path / 'run'}",
        f"--builtin_dir={tmp_path / 'data'}",
    ]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    final = [m for m in logs if "eval/exact_accuracy" in m][-1]
    print(f"{time.time() - t0:.0f} s: {final}")
    assert final["eval/accuracy"] >= 0.97 and final["eval/exact_accuracy"] >= 0.85, final
