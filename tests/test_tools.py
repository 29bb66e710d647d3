"""run_all.sh (dry runs) and bench.py (a one-step smoke run)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def run(cmd, **env):
    return subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=dict(os.environ, **env)
    )


def test_run_all_dry_run_prints_one_train_command_per_experiment():
    out = run(
        ["bash", "run_all.sh", "--dry_run", "sudoku_mlp", "sudoku_att", "--", "--max_steps=5"]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "+ python train.py --flagfile=configs/sudoku_mlp.flags --workdir=runs/sudoku_mlp "
        "--max_steps=5",
        "+ python train.py --flagfile=configs/sudoku_att.flags --workdir=runs/sudoku_att "
        "--max_steps=5",
    ]


def test_run_all_tpu_dry_run_syncs_then_launches_on_every_worker():
    out = run(
        [
            "bash",
            "run_all.sh",
            "--dry_run",
            "--tpu=trmx-v4-32",
            "--zone=us-central2-b",
            "--runs=gs://bucket/runs",
            "--data=gs://bucket/data",
            "sudoku_mlp",
        ]
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("+ tar czf") and "train.py" in lines[0]
    assert lines[1].startswith("+ gcloud compute tpus tpu-vm scp") and "--worker=all" in lines[1]
    assert "pip\\ install" in lines[2] and "gs://bucket/data" in lines[2]
    assert "--worker=all" in lines[3] and "--distributed" in lines[3]
    assert "--workdir=gs://bucket/runs/sudoku_mlp" in lines[3]


def test_run_all_rejects_bad_arguments():
    assert "no configs/nope.flags" in run(["bash", "run_all.sh", "nope"]).stderr
    assert "needs --zone" in run(["bash", "run_all.sh", "--tpu=x", "sudoku_mlp"]).stderr
    out = run(["bash", "run_all.sh", "--tpu=x", "--zone=z", "sudoku_mlp"])
    assert out.returncode == 2 and "--runs=gs://" in out.stderr


def test_bench_reports_a_step_time():
    out = run(
        [
            sys.executable,
            "bench.py",
            "--hidden_size=16",
            "--num_heads=2",
            "--H_cycles=1",
            "--L_cycles=1",
            "--halt_max_steps=2",
            "--global_batch_size=4",
            "--steps=1",
            "--forward_dtype=float32",
            "--json",
        ],
        JAX_PLATFORMS="cpu",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["train_step_s"] > 0 and result["global_batch_size"] == 4
