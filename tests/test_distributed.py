"""Multi-host data parallelism: 2 local processes joined by jax.distributed on 127.0.0.1."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorstore as ts

import ckpt
import data
from helpers import ROOT, TINY_RUN, run_flags

TINY = run_flags(TINY_RUN, halt_exploration_prob=0.5, epochs=3, eval_interval=1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, devices, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    cmd = [sys.executable, "train.py", *args]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").open()]


def process_flags(port, i):
    return [
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
        "--distributed_timeout=60",
    ]


def two_processes(args):
    """Run train.py as 2 processes x 2 CPU devices; returns their (stdout, stderr)."""
    port = free_port()
    procs = [launch([*args, *process_flags(port, i)], devices=2) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


def kill_after_a_checkpoint(args, ckpt_dir, victim=1):
    """Start 2 processes, SIGKILL process `victim` once a checkpoint is committed; the other
    one's exit code, stderr and seconds from the kill to its exit."""
    port = free_port()
    procs = [launch([*args, *process_flags(port, i)], devices=2) for i in range(2)]
    deadline = time.time() + 300
    while not list(ckpt_dir.glob("step_*/COMMIT")):
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1]
        time.sleep(0.05)
    procs[victim].kill()
    killed, survivor = time.time(), procs[1 - victim]
    _, err = survivor.communicate(timeout=300)
    procs[victim].communicate()
    return survivor.returncode, err, time.time() - killed


def test_a_lost_process_ends_the_run_restartable_and_it_resumes_like_one(tmp_path):
    """2 processes x 2 devices; process 1 is killed (SIGKILL) after the first checkpoint:
    process 0 exits within --peer_timeout with the restartable code and one line naming the
    lost process, the step and the checkpoint, without a traceback or a C++ stack. Started
    again, the run resumes from that checkpoint (each process restores its rows of the
    carry) and matches 1 process x 4 devices run straight through: the same loss, norms and
    evaluation at every step. Exploration is on, so its draws must not depend on the split."""
    common = [*TINY, f"--builtin_dir={tmp_path / 'data'}"]
    two = [*common, f"--workdir={tmp_path / 'two'}", "--ckpt_every=1", "--peer_timeout=20"]
    code, err, seconds = kill_after_a_checkpoint(two, tmp_path / "two" / "ckpt")
    assert code == 75, err[-3000:]
    assert seconds < 20 + 10, seconds
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    lost = [line for line in err.splitlines() if "lost process 1" in line]
    assert len(lost) == 1 and re.search(r"at step \d+; the run resumes from .*step_\d{8}", lost[0])
    second = two_processes(two)
    assert "resumed from" in second[0][0]
    assert "eval @" in second[0][0] and "eval @" not in second[1][0]  # only process 0 reports
    single = launch([*common, f"--workdir={tmp_path / 'one'}"], devices=4)
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, err[-3000:]
    two = [m for m in metrics(tmp_path / "two")]
    one = metrics(tmp_path / "one")
    assert [m["step"] for m in two] == [m["step"] for m in one] and len(two) > 8
    for a, b in zip(two, one, strict=True):
        for k in (
            "train/loss",
            "train/grad_norm",
            "train/param_norm",
            "eval/accuracy",
            "eval/exact_accuracy",
            "eval/q_halt_accuracy",
        ):
            if k in b:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=f"step {b['step']} {k}")
    # ... and the final checkpoints hold the same params, optimiser state, EMA and carry.
    final = {name: saved_leaves(tmp_path / name / "ckpt") for name in ("two", "one")}
    assert final["two"].keys() == final["one"].keys()
    for leaf, x in final["one"].items():
        atol = 5e-4 if leaf.startswith("carry/") else 1e-5  # the recursion amplifies rounding
        np.testing.assert_allclose(final["two"][leaf], x, rtol=1e-4, atol=atol, err_msg=leaf)


def test_when_process_0_is_lost_process_1_exits_restartable(tmp_path):
    """The other direction: process 0 (which also hosts jax.distributed's coordinator) is
    killed; process 1 exits within --peer_timeout with the restartable code and one line,
    instead of a C++ stack dump when jax.distributed's heartbeat gives up."""
    args = [*TINY, f"--builtin_dir={tmp_path}", f"--workdir={tmp_path / 'run'}", "--ckpt_every=1"]
    code, err, seconds = kill_after_a_checkpoint(
        [*args, "--peer_timeout=20"], tmp_path / "run" / "ckpt", victim=0
    )
    assert code == 75, err[-3000:]
    assert seconds < 20 + 10, seconds
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if "train.py: lost process 0" in line]) == 1


def saved_leaves(directory):
    """Every array of the newest checkpoint, read with tensorstore alone."""
    step, commit = ckpt.latest(str(directory))
    folder = f"file://{directory}/step_{step:08d}"
    return {
        leaf: ts.open({"driver": "zarr3", "kvstore": f"{folder}/{leaf}/"}).result().read().result()
        for leaf in commit["leaves"]
    }


def test_process_slices_assemble_the_single_process_batch(tmp_path):
    path = data.build_builtin(str(tmp_path), 30, 10, 40, 45, 2, seed=0)
    train, test = data.load([path], "train"), data.load([path], "test")
    whole, cursor = data.train_sampler(train, 12, seed=1)(7)
    parts = [data.train_sampler(train, 12, seed=1, rows=slice(a, a + 4))(7) for a in (0, 4, 8)]
    assert all(c == cursor for _, c in parts)
    for k in whole:
        assert (np.concatenate([p[k] for p, _ in parts]) == whole[k]).all()
    whole = list(data.eval_batches(test, 8))
    halves = [list(data.eval_batches(test, 8, rows=slice(a, a + 4))) for a in (0, 4)]
    for w, h0, h1 in zip(whole, *halves, strict=True):
        for k in w:
            assert (np.concatenate([h0[k], h1[k]]) == w[k]).all()


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    p = launch(
        [
            f"--coordinator_address=127.0.0.1:{free_port()}",
            "--num_processes=2",
            "--process_id=1",
            "--distributed_timeout=2",
        ],
        devices=1,
    )
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "No coordinator at --coordinator_address=127.0.0.1:" in err, err[-2000:]


def test_processes_that_disagree_on_the_run_stop(tmp_path):
    port = free_port()
    procs = [
        launch(
            [
                f"--builtin_dir={tmp_path}",
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={n}",
                f"--process_id={i}",
                "--distributed_timeout=30",
            ],
            devices=1,
        )
        for i, n in ((0, 2), (1, 3))  # process 1 was told there are 3 processes
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0
        assert "The processes were started with different flags" in err, err[-2000:]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--coordinator_address=127.0.0.1:1", "--num_processes=2"], "go together"),
        (
            ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
            r"--process_id=2 not in \[0, 2\)",
        ),
    ],
)
def test_incomplete_distributed_flags(args, message):
    p = launch(args, devices=1)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and re.search(message, err), err[-2000:]
