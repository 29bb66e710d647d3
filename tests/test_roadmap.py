"""The research roadmap: every ablation flag changes what it should and only that, run_all.sh
(phases, sweeps, mini-study, skipping finished runs, and the smoke run of every flagfile), and
report.py on made-up runs whose answers are known."""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import bench
import data
import ema
import model
import train
from helpers import ROOT, assert_close, batch_of, phases, points, tiny

META = bench.SUDOKU_META


def run(cmd, env=None):
    """cmd in the repository; run_all.sh's train.py runs use this test's interpreter."""
    env = dict(env or os.environ, PYTHON=sys.executable)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env)


def config_with(**flag_values):
    with flagsaver.flagsaver(**flag_values):
        return train.model_config(train.options(), META)


def changed_fields(a, b):
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


# ----------------------------------------------------------------------------- flags -> config


@pytest.mark.parametrize(
    "flag_values, fields",
    [
        ({"H_cycles": 2}, {"T"}),
        ({"L_cycles": 3}, {"n"}),
        ({"L_layers": 4}, {"layers"}),
        ({"halt_max_steps": 8}, {"N_sup"}),
        ({"mlp_t": False, "pos_encodings": "rope"}, {"mlp_t", "pos_encodings"}),
        ({"hidden_size": 1024}, {"D", "puzzle_emb_ndim"}),  # the puzzle width follows D
        ({"forward_dtype": "float16"}, {"forward_dtype"}),
        ({"halt_exploration_prob": 0.3}, {"halt_exploration_prob"}),
        (
            {"no_ACT_continue": False, "halt_step_penalty": 0.05},
            {"no_ACT_continue", "halt_step_penalty"},
        ),
        # schedules, data, optimiser and evaluation flags leave the model alone
        ({"eval_halt_max_steps": 32, "curriculum_steps": 10, "swa_start": 5}, set()),
        ({"train_puzzles": 10, "train_aug": 3, "optimizer": "lion", "beta2": 0.99}, set()),
        ({"ema": False, "global_batch_size": 64, "lr_scaling": "sqrt"}, set()),
    ],
)
def test_each_flag_changes_only_its_config_fields(flag_values, fields):
    assert changed_fields(config_with(), config_with(**flag_values)) == fields


def test_the_flags_defaults_are_the_config_defaults():
    """One mapping (model.FLAG_KEYS): train.py's defaults make Config's default model, the
    paper's Sudoku-MLP, and every Config field but the data's has a flag."""
    cfg = config_with()
    assert cfg == model.Config(kernel=cfg.kernel)
    data = {"vocab_size", "seq_len", "num_puzzle_identifiers"}
    fields = {f.name for f in dataclasses.fields(model.Config)}
    assert set(model.FLAG_KEYS.values()) == fields
    assert {k for k in model.FLAG_KEYS if k not in flags.FLAGS} == data


@pytest.mark.parametrize(
    "flag_values",
    [
        {},
        {"hidden_size": 64, "puzzle_emb_len": 1, "H_cycles": 2, "forward_dtype": "float32"},
        {"mlp_t": False, "pos_encodings": "rope", "num_heads": 4, "puzzle_emb_ndim": 0},
        {"no_ACT_continue": False, "halt_step_penalty": 0.05, "loss_type": "softmax"},
    ],
)
def test_report_reads_a_runs_config_as_train_py_made_it(tmp_path, flag_values):
    """report.py, which does not import train.py: from the run's config.json, and from its
    flags.txt alone (runs written before config.json), the Config train.py trained."""
    import report  # noqa: PLC0415

    with flagsaver.flagsaver(**flag_values, kernel="xla"):
        cfg, text = train.model_config(train.options(), META), flags.FLAGS.flags_into_string()
    run = {"dir": str(tmp_path), "flags": report.parse_flags(text)}
    assert report.config_of(run) == cfg
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert report.config_of(run) == cfg


def test_model_sizes_of_the_scaling_experiment():
    """E3.1's header: hidden size 512 -> 768, 1024, 1280 is 5.0M -> 9.8M, 17.6M, 27.9M params."""
    counts = {}
    for D in (512, 768, 1024, 1280):
        cfg = config_with(hidden_size=D)
        shapes = jax.eval_shape(lambda key, cfg=cfg: model.init_params(key, cfg), jax.random.key(0))
        counts[D] = model.num_params(shapes)
    assert counts[512] == 5_028_866  # the reference's count
    assert [round(counts[D] / 1e5) for D in (768, 1024, 1280)] == [98, 176, 279], counts


def test_ema_off_changes_the_evaluated_weights_and_not_the_training(tmp_path):
    """Two tiny runs, --ema and --ema=false: the same train metrics step for step, different
    evaluations (the raw weights instead of their average)."""
    logs = {}
    for ema_on in (True, False):
        workdir = tmp_path / f"ema_{ema_on}"
        out = run(
            [
                sys.executable,
                "train.py",
                "--flagfile=configs/smoke.flags",
                f"--builtin_dir={tmp_path}/data",
                f"--workdir={workdir}",
                f"--ema={ema_on}",
                "--lr=1e-2",
                "--ema_rate=0.5",
                "--max_steps=6",
                "--log_every=2",
            ],
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        logs[ema_on] = [json.loads(line) for line in lines]
    train_on, train_off = ([m for m in logs[e] if "train/loss" in m] for e in (True, False))
    assert len(train_on) == 3 and [m["train/loss"] for m in train_on] == [
        m["train/loss"] for m in train_off
    ]
    eval_on, eval_off = (next(m for m in logs[e] if "eval/lm_loss" in m) for e in (True, False))
    assert eval_on["eval/lm_loss"] != eval_off["eval/lm_loss"]


def test_halt_step_penalty_needs_the_q_continue_head():
    with pytest.raises(ValueError, match="halt_step_penalty prices continuing"):
        tiny(halt_step_penalty=0.1)
    with pytest.raises(ValueError, match=r"halt_step_penalty in \[0, 1\)"):
        tiny(no_ACT_continue=False, halt_step_penalty=1.5)


def test_halt_step_penalty_lowers_the_continue_target_by_lambda():
    """The Q-continue target is sigmoid(best next Q) - lambda, floored at 0; nothing else moves."""
    base = tiny(no_ACT_continue=False, N_sup=4)
    params = model.init_params(jax.random.key(0), base)
    params["q_head"]["b"] = jnp.array([0.5, 1.0])  # targets well above lambda
    batch = batch_of(jax.random.key(1))
    carry = model.initial_carry(base, batch)
    outs = {}
    for lam in (0.0, 0.25):
        cfg = dataclasses.replace(base, halt_step_penalty=lam)
        outs[lam] = model.act_step(params, cfg, carry, batch, train=True)
    _, a = outs[0.0]
    _, b = outs[0.25]
    assert float(a["q_continue_target"].min()) > 0.25
    assert_close(b["q_continue_target"], a["q_continue_target"] - 0.25, 1e-6)
    assert_close(b["logits"], a["logits"], 0)


def test_exploration_is_annealed_from_start_to_final():
    with flagsaver.flagsaver(halt_exploration_prob=0.3, halt_exploration_final=0.05):
        schedule = train.exploration_schedule(train.options(), total_steps=100)
    assert_close([schedule(s) for s in (0, 50, 100, 400)], [0.3, 0.175, 0.05, 0.05], 1e-6)
    with flagsaver.flagsaver(halt_exploration_final=0.0, halt_exploration_anneal_steps=10):
        assert float(train.exploration_schedule(train.options(), 100)(10)) == 0.0
    assert (
        train.exploration_schedule(train.options(), 100) is None
    )  # off by default: the config's constant
    cfg, key = tiny(N_sup=8, halt_exploration_prob=0.5), jax.random.key(3)
    assert (model.exploration_min_steps(key, cfg, 256, prob=0.0) == 0).all()
    forced = model.exploration_min_steps(key, cfg, 256, prob=1.0)
    assert ((forced >= 2) & (forced <= 8)).all()


def test_curriculum_is_a_staircase_from_start_to_final():
    cfg = tiny(T=3, n=6)
    with flagsaver.flagsaver(
        curriculum_steps=90,
        curriculum_start_H_cycles=1,
        curriculum_start_L_cycles=2,
        curriculum_stages=4,
    ):
        stages = [train.curriculum(train.options(), cfg, s) for s in range(200)]
    assert stages[0] == (1, 2) and stages[89] != (3, 6) and stages[90:] == [(3, 6)] * 110
    assert len(set(stages)) == 4  # one compile per stage, not per step
    assert all(a <= b for a, b in zip(stages, stages[1:], strict=False))  # T and n only grow
    assert train.curriculum(train.options(), cfg, 0) == (3, 6)  # no curriculum: the config's T, n


def test_train_py_compiles_the_step_once_per_curriculum_stage(tmp_path):
    out = run(
        [
            sys.executable,
            "train.py",
            "--flagfile=configs/smoke.flags",
            f"--builtin_dir={tmp_path}",
            f"--workdir={tmp_path}/run",
            "--H_cycles=3",
            "--L_cycles=4",
            "--curriculum_steps=6",
            "--curriculum_stages=3",
            "--max_steps=9",
            "--log_every=1",
            "--eval_max_examples=8",
        ],
        env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("Compiling jit(train_step)") == 3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    stages = [(m["train/T"], m["train/n"]) for m in map(json.loads, lines) if "train/T" in m]
    assert stages == [(1, 2)] * 3 + [(2, 3)] * 3 + [(3, 4)] * 3


def test_schedule_flags_reject_bad_values():
    """A curriculum that does not grow to the model's (T, n) is a clear error; the schedule
    flags' own ranges are checked when they are parsed."""
    o = train.options(curriculum_steps=5, curriculum_start_H_cycles=4)
    with pytest.raises(SystemExit, match="curriculum_start_H_cycles=4"):
        train.check_schedules(o, tiny(T=3, n=6))
    for name, bad in [
        ("curriculum_stages", "1"),
        ("halt_exploration_final", "1.5"),
        ("swa_start", "-1"),
        ("average_checkpoints", "0"),
    ]:
        with pytest.raises(flags.IllegalFlagValueError, match=f"flag --{name}={bad}: "):
            flags.FLAGS[name].parse(bad)


def test_lion_moves_every_weight_by_the_learning_rate():
    with flagsaver.flagsaver(optimizer="lion", lr=1e-3, lr_warmup_steps=0, weight_decay=0.0):
        tx, _ = train.optimizer(train.options(), total_steps=10)
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "puzzle_emb": jnp.zeros((1, 4))}
    grads = {"w": jnp.array([0.5, -1e-6, 0.0]), "puzzle_emb": jnp.zeros((1, 4))}
    updates, _ = tx.update(grads, tx.init(params), params, rows=jnp.array([True]))
    assert_close(updates["w"], [-1e-3, 1e-3, 0.0], 1e-9)  # sign(g) * lr, whatever |g|


def test_running_mean_averages_the_included_steps():
    avg = ema.running_mean_init({"w": jnp.zeros(2)})
    for value, include in [(5.0, False), (1.0, True), (2.0, True), (6.0, True)]:
        avg = ema.running_mean_update(avg, {"w": jnp.full(2, value)}, jnp.array(include))
    assert int(avg["count"]) == 3
    assert_close(avg["mean"]["w"], [3.0, 3.0], 1e-6)
    assert_close(ema.mean_of([{"w": jnp.ones(2)}, {"w": jnp.full(2, 3.0)}])["w"], [2.0, 2.0], 0)


def test_train_step_keeps_the_running_mean_from_swa_start():
    cfg = tiny()
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batches = [batch_of(jax.random.key(i), B=4) for i in range(4)]
    tx, _ = train.optimizer(train.options(), total_steps=100)
    state = train.init_state(cfg, tx, batches[0], mesh, seed=0, use_ema=True, use_swa=True)
    train_step = train.make_train_step(cfg, mesh, tx, 4, ema_rate=0.9, swa_start=2)
    seen = []
    for batch in batches:
        state, _ = train_step(state, batch)
        seen.append(jax.device_get(state["params"]["embed"]))
    assert int(state["swa"]["count"]) == 2  # steps 3 and 4
    assert_close(state["swa"]["mean"]["embed"], (seen[2] + seen[3]) / 2, 1e-6)


def test_eval_reports_where_the_q_head_would_halt():
    """q_halt always > 0: every puzzle halts at step 1, scored there; always < 0: at N_sup."""
    cfg = tiny(N_sup=4)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tx, _ = train.optimizer(train.options(), total_steps=100)
    batch = jax.device_put(batch_of(jax.random.key(0), B=8), sharding)
    batch["labels"] = batch["labels"].at[-1].set(model.IGNORE_LABEL)  # a padding row
    eval_step = train.make_eval_step(cfg, mesh)
    params = model.init_params(jax.random.key(1), cfg)
    for bias, steps in ((10.0, 1), (-10.0, 4)):
        params["q_head"]["b"] = jnp.array([bias, 0.0])
        out = train.evaluate(eval_step, params, [batch], lambda b: b)
        assert out["eval/count"] == 7
        assert out["eval/halted_steps"] == steps
        assert out["eval/halted_exact_accuracy"] == out[f"eval/exact_accuracy_step{steps}"]


# ----------------------------------------------------------------------------- data subsets


def test_train_subset_keeps_the_first_puzzles_and_augmentations(tmp_path):
    data.build_builtin(
        str(tmp_path), num_train=6, num_test=2, min_blanks=30, max_blanks=40, num_aug=4
    )
    full = data.load([str(tmp_path)], "train")
    small = data.subset(full, puzzles=3, aug=1)
    assert small["meta"]["total_groups"] == 3 and len(small["group_indices"]) == 4
    assert len(small["inputs"]) == 3 * 2  # each puzzle and its first variant
    gi, pi = full["group_indices"], full["puzzle_indices"]
    expected = [pi[gi[g] + k] for g in range(3) for k in range(2)]
    assert (small["inputs"] == full["inputs"][expected]).all()
    nested = data.subset(full, puzzles=2)  # nested: the 2 are the first 2 of the 3
    assert (nested["inputs"][::5] == small["inputs"][::2][:2]).all()
    assert len(data.subset(full, aug=100)["inputs"]) == len(full["inputs"])  # all there are
    with pytest.raises(ValueError, match="train_puzzles=7: this dataset has 6"):
        data.subset(full, puzzles=7)
    with pytest.raises(ValueError, match="train_aug=-1"):
        data.subset(full, aug=-1)


# ----------------------------------------------------------------------------- run_all.sh


def dry(*args):
    out = run(["bash", "run_all.sh", "--dry_run", *args])
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_run_all_runs_each_experiment_over_the_baseline():
    python = f"+ {sys.executable} train.py"
    assert dry("sudoku_mlp", "e2_3_attention", "sudoku_cpu", "--", "--max_steps=5") == [
        f"{python} --flagfile=configs/sudoku_mlp.flags --workdir=runs/sudoku_mlp --max_steps=5",
        f"{python} --flagfile=configs/sudoku_mlp.flags "
        "--flagfile=configs/e2_3_attention.flags --workdir=runs/e2_3_attention --max_steps=5",
        f"{python} --flagfile=configs/sudoku_cpu.flags --workdir=runs/sudoku_cpu --max_steps=5",
    ]


def test_run_all_takes_the_interpreter_from_PYTHON(tmp_path):
    """PYTHON chooses the interpreter; without it, python, else python3 (a PATH without
    python); a PYTHON that does not exist is one clear line."""
    for name in ("python3", "bash", "dirname", "cat"):
        (tmp_path / name).symlink_to(shutil.which(name))
    env = {"PATH": str(tmp_path)}

    def dry_run(env):
        cmd = ["bash", "run_all.sh", "--dry_run", "sudoku_cpu"]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env)

    out = dry_run(env)
    assert out.stdout.startswith("+ python3 train.py"), out.stderr
    out = dry_run(env | {"PYTHON": "nope/py"})
    assert out.returncode == 2 and "no interpreter nope/py" in out.stderr


def test_run_all_sweeps_the_cartesian_product_into_one_folder_each():
    lines = dry("e3_4_lr_vs_batch")
    assert len(lines) == len(points("e3_4_lr_vs_batch")) > 1
    assert lines[0].endswith(
        "--flagfile=configs/e3_4_lr_vs_batch.flags --global_batch_size=384 --lr_scaling=linear "
        "--workdir=runs/e3_4_lr_vs_batch/global_batch_size-384_lr_scaling-linear"
    )
    assert len({line.split("--workdir=")[1] for line in lines}) == len(lines)


def test_run_all_leaves_out_the_point_that_is_the_baseline():
    lines = dry("e2_2_t_n_grid")
    runs = [line for line in lines if line.startswith("+")]
    assert len(runs) == len(points("e2_2_t_n_grid"))  # the grid less one point
    assert not any("--H_cycles=3 --L_cycles=6 " in line for line in runs)
    skipped = [line for line in lines if not line.startswith("+")]
    assert len(skipped) == 1
    assert "skip e2_2_t_n_grid --H_cycles=3 --L_cycles=6: the same run as E1.1" in skipped[0]


def flagfile_values(name):
    """The flags of configs/NAME.flags, parsed as train.py parses them."""
    lines = (ROOT / "configs" / f"{name}.flags").read_text().splitlines()
    pairs = [line[2:].split("=", 1) for line in lines if line.startswith("--")]
    return {k: flags.FLAGS[k].parser.parse(v) for k, v in pairs}


def test_maze_hard_flagfile_is_the_papers_attention_maze_run():
    """configs/maze_hard.flags on 30x30 mazes (the official builder's metadata): attention
    with RoPE, T=3, n=4, 2 layers, D=512: the official README's run, 6.8M parameters (the
    paper: 7M)."""
    meta = {"vocab_size": 6, "seq_len": 900, "num_puzzle_identifiers": 1}
    cfg = train.model_config(train.options(**flagfile_values("maze_hard")), meta, "cpu")
    assert (cfg.mlp_t, cfg.pos_encodings, cfg.T, cfg.n, cfg.layers) == (False, "rope", 3, 4, 2)
    assert (cfg.D, cfg.N_sup, cfg.L) == (512, 16, 916)
    params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    assert 6.5e6 < model.num_params(params) < 7.5e6


@pytest.mark.parametrize("name", ["arc1", "arc2"])
def test_arc_flagfiles_are_the_papers_arc_runs(name):
    """configs/arc1.flags and arc2.flags on ARC's metadata (900 cells, 12 tokens, a million
    puzzle ids): the official README's attention run (T=3, n=4, 2 layers, D=512, 7M params
    without the puzzle table) with the official ARC training config; `./run_all.sh tasks`
    runs them after Maze-Hard."""
    values = flagfile_values(name)
    meta = {"vocab_size": 12, "seq_len": 900, "num_puzzle_identifiers": 1_000_000}
    cfg = train.model_config(train.options(**values), meta, "cpu")
    assert (cfg.mlp_t, cfg.pos_encodings, cfg.T, cfg.n, cfg.layers) == (False, "rope", 3, 4, 2)
    assert (cfg.D, cfg.N_sup, cfg.L, cfg.puzzle_emb_ndim) == (512, 16, 916, 512)
    params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    assert 6.5e6 < model.num_params(params) < 7.5e6
    assert params["puzzle_emb"].shape == (1_000_000, 512)
    o = train.options(**values)
    assert (o.lr, o.weight_decay, o.puzzle_emb_lr, o.puzzle_emb_weight_decay) == (
        1e-4,
        0.1,
        1e-2,
        0.1,
    )
    assert (o.epochs, o.eval_interval, o.global_batch_size, o.ema) == (100000, 10000, 768, True)
    assert o.data_paths == [f"data/{name}concept-aug-1000"]
    assert f"--flagfile=configs/{name}.flags" in "\n".join(dry("tasks"))


def test_run_all_phases_cover_every_experiment_flagfile_once():
    lines = dry("all")
    commands = [line for line in lines if line.startswith("+")]
    named = {line.split("--workdir=runs/")[1].split("/")[0].split(" ")[0] for line in commands}
    flagfiles = {p.stem for p in (ROOT / "configs").glob("*.flags")}
    assert named == flagfiles - {
        "sudoku_cpu",
        "maze_cpu",
        "maze_hard",
        "arc1",
        "arc2",
        "mini",
        "smoke",
    }
    assert dry("phase2") == [line for line in lines if "/e2_" in line]
    # no two runs of the roadmap are the same run: their flags (less the folder) differ
    runs = [
        frozenset(line.split()[3:]) - {f for f in line.split() if "--workdir" in f}
        for line in commands
    ]
    assert len(set(runs)) == len(runs)


def test_every_experiment_flagfile_says_how_to_run_it_and_what_to_expect():
    for path in (ROOT / "configs").glob("*.flags"):
        text = path.read_text()
        assert text.startswith("# "), path
        if path.stem not in ("mini", "smoke"):
            for what in ("# Command:", "# Hardware:", "# Expected:"):
                assert what in text, (path, what)
        overrides = [line for line in text.splitlines() if line.startswith("--")]
        assert len(overrides) == len(set(overrides)), path


def test_run_all_mini_study_and_skips_finished_runs(tmp_path):
    lines = dry("--mini", f"--runs={tmp_path}", "phase2", "sudoku_mlp")
    runs = [line for line in lines if line.startswith("+")]
    assert all("--flagfile=configs/mini.flags" in line for line in runs)
    # phase 2's experiments with a `# mini:` line, one run per point of it, then E1.1
    expected = [p for e in [*phases()["phase2"], "sudoku_mlp"] for p in points(e, "mini")]
    assert len(runs) == len(expected) > 1
    assert "skip e2_4_n_sup: no '# mini:' line in configs/e2_4_n_sup.flags" in lines
    (tmp_path / "e2_1_ema_off").mkdir()
    (tmp_path / "e2_1_ema_off" / "done.json").write_text("{}")
    again = dry("--mini", f"--runs={tmp_path}", "e2_1_ema_off")
    assert again == [f"skip {tmp_path}/e2_1_ema_off: done (done.json)"]


FAKE_TRAIN = """#!/bin/bash
# Stands in for the interpreter: `train.py ...` ends with the next code of $CODES (0d: exit 0
# with done.json in --workdir, as a finished run; 0: exit 0 without it, as a preempted one).
n=$(cat "$COUNT" 2>/dev/null || echo 0); echo $((n + 1)) > "$COUNT"
read -ra codes <<< "$CODES"; code=${codes[$n]}
for a in "$@"; do [[ $a != --workdir=* ]] || dir=${a#*=}; done
if [[ $code == 0d ]]; then mkdir -p "$dir"; echo '{}' > "$dir/done.json"; code=0; fi
exit "$code"
"""


@pytest.mark.parametrize(
    "codes,max_restarts,status,restarts",
    [
        ("75 137 0d", 3, 0, 2),  # a lost process, an OOM kill: restarted; then it finishes
        ("0 0d", 3, 0, 1),  # stopped before its end (SIGTERM) without done.json: restarted
        ("75 75 75", 2, 2, 2),  # still failing after --max_restarts: run_all.sh gives up
        ("1", 3, 1, 0),  # a user error: not retried
    ],
)
def test_run_all_restarts_a_run_that_ends_restartable(
    tmp_path, codes, max_restarts, status, restarts
):
    fake = tmp_path / "python"
    fake.write_text(FAKE_TRAIN)
    fake.chmod(0o755)
    env = dict(os.environ, CODES=codes, COUNT=str(tmp_path / "count"))
    cmd = ["./run_all.sh", f"--runs={tmp_path}", f"--max_restarts={max_restarts}", "sudoku_cpu"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=False, cwd=ROOT, env=env | {"PYTHON": str(fake)}
    )
    assert out.returncode == status, out.stderr
    lines = [line for line in out.stderr.splitlines() if "; restart " in line]
    assert len(lines) == restarts, out.stderr
    assert all(f"{tmp_path}/sudoku_cpu " in line for line in lines), lines
    assert int((tmp_path / "count").read_text()) == min(len(codes.split()), max_restarts + 1)
    if status == 2:
        assert f"gave up after {max_restarts} restarts" in out.stderr


def test_run_all_rejects_bad_arguments():
    for args, message in [
        (["nope"], "no configs/nope.flags"),
        (["--tpu=x", "sudoku_mlp"], "needs --zone"),
        (["--tpu=x", "--zone=z", "sudoku_mlp"], "--runs=gs://"),
        (["--smoke", "--tpu=x", "--zone=z", "all"], "--smoke runs here"),
        (["--bogus", "all"], "unknown option --bogus"),
        ([], "name a phase"),
    ]:
        out = run(["bash", "run_all.sh", *args])
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def test_smoke_runs_every_flagfile_then_report_reads_them(tmp_path):
    """What CI relies on: each experiment of the roadmap trains and evaluates for a few steps
    (a broken flag or flagfile fails here), and report.py turns the runs into its outputs.
    Two halves of the roadmap run at once (most of a tiny run is compiling, one core)."""
    cpu = dict(os.environ, JAX_PLATFORMS="cpu")
    halves = [
        subprocess.Popen(
            [
                "bash",
                "run_all.sh",
                "--smoke",
                f"--runs={tmp_path}",
                *phases,
                "--",
                f"--builtin_dir={tmp_path}/data",
            ],
            cwd=ROOT,
            env=cpu | {"PYTHON": sys.executable},
            stdout=(tmp_path / f"half{i}.log").open("w"),  # files: a full pipe would block
            stderr=subprocess.STDOUT,
        )
        for i, phases in enumerate((("phase1", "phase2"), ("phase3", "phase4")))
    ]
    codes = [p.wait() for p in halves]
    logs = [(tmp_path / f"half{i}.log").read_text() for i in range(2)]
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log[-5000:]
    finished = {str(p.parent.relative_to(tmp_path)) for p in tmp_path.glob("**/done.json")}
    planned = dry("--smoke", "--runs=RUNS", "all")  # every run directory the smoke run makes
    assert finished == {x.split("--workdir=RUNS/")[1].split()[0] for x in planned if x[0] == "+"}
    assert "eval_avg @ 5" in logs[1]  # E4.4's second command averaged its checkpoints
    report = run([sys.executable, "report.py", str(tmp_path), f"--out={tmp_path}/report"], env=cpu)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "RESULTS.md").read_text()
    assert "| e3_1_model_size/hidden_size-768 |" in text and "eval_avg" in text
    for png in ("curves.png", "groups.png", "per_step.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


# ----------------------------------------------------------------------------- report.py


def fake_run(path, flag_lines, evals, train_losses=((100, 1.0), (200, 0.5))):
    """A run directory as train.py writes it, with made-up numbers."""
    path.mkdir(parents=True)
    (path / "flags.txt").write_text("\n".join(flag_lines) + "\n")
    lines = [{"step": s, "train/loss": v} for s, v in train_losses]
    lines += [{"step": 200} | {f"eval/{k}": v for k, v in e.items()} for e in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_report_tables_heat_map_front_and_power_law(tmp_path):
    root = tmp_path / "runs"
    small = ["--hidden_size=16", "--num_heads=2", "--puzzle_emb_len=1", "--halt_max_steps=2"]
    fake_run(root / "sudoku_mlp", small, [{"exact_accuracy": 0.5, "accuracy": 0.9}])
    for T in (1, 2):
        for n in (1, 3):
            per_step = {"exact_accuracy_step1": 0.1 * T, "exact_accuracy_step2": 0.1 * T + 0.01 * n}
            fake_run(
                root / "grid" / f"H_cycles-{T}_L_cycles-{n}",
                [*small, f"--H_cycles={T}", f"--L_cycles={n}"],
                [{"exact_accuracy": 0.1 * T + 0.01 * n, "accuracy": 0.9, **per_step}],
            )
    for puzzles in (100, 400, 1600, 6400):  # error = 2 * puzzles^-0.5 exactly
        fake_run(
            root / "data" / f"train_puzzles-{puzzles}",
            [*small, f"--train_puzzles={puzzles}"],
            [{"exact_accuracy": 1 - 2 * puzzles**-0.5, "accuracy": 0.99}],
        )
    grid = {"exact_accuracy": 0.5, "accuracy": 0.9}
    for K, exact, vote, oracle in ((1, 0.5, None, None), (4, 0.6, 0.55, 0.7)):
        grid[f"exact_accuracy@steps=2,K={K}"] = exact
        grid[f"flops_per_puzzle@steps=2,K={K}"] = K * 1e9
        if vote is not None:
            grid |= {f"vote_accuracy@steps=2,K={K}": vote, f"oracle_accuracy@steps=2,K={K}": oracle}
    fake_run(root / "e4_5_test_time", small, [grid])
    passes = dict(zip((1, 2, 5, 10, 100, 1000), (0.3, 0.4, 0.5, 0.6, 0.7, 0.7), strict=True))
    arc = {"exact_accuracy": 0.1, "accuracy": 0.8} | {f"ARC/pass@{k}": p for k, p in passes.items()}
    fake_run(root / "arc1", small, [arc])
    out = run(
        [sys.executable, "report.py", str(root), f"--out={tmp_path}/out", "--title=Test"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "out" / "RESULTS.md").read_text()
    assert text.startswith("# Test")
    assert "| T=2 | 0.2100 | 0.2300 |" in text  # the T x n table: rows T, columns n
    assert "| data | training puzzles | 4 | 2 | 0.500 | 1.00 |" in text  # a, b, R^2
    fwd = model.flops_per_example(
        model.Config(D=16, heads=2, puzzle_emb_ndim=16, puzzle_emb_len=1, N_sup=1, T=2, n=3),
        train_step=False,
    )
    assert f"| grid/H_cycles-2_L_cycles-3 | 2 steps | {2 * fwd / 0.23:.3g} | 0.2300 |" in text
    assert "| e4_5_test_time | 2 | 4 | 0.6000 | 0.5500 | 0.7000 | 4 |" in text
    assert "| e4_5_test_time | 2 | 1 | 0.5000 |  |  | 1 |" in text
    assert "| arc1 | 200 | 0.3000 | 0.4000 | 0.5000 | 0.6000 | 0.7000 | 0.7000 |" in text
    for png in (
        "heatmap_T_n.png",
        "frontier.png",
        "scaling_data.png",
        "curves.png",
        "test_time.png",
        "arc.png",
    ):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_report_pareto_front():
    import report  # noqa: PLC0415

    points = [(10, 0.5, "a", ""), (5, 0.4, "b", ""), (20, 0.45, "c", ""), (30, 0.9, "d", "")]
    assert [p[2] for p in report.pareto(points)] == ["b", "a", "d"]
    a, b, r2 = report.power_law([1, 10, 100], [0.3, 0.03, 0.003])
    assert_close([a, b, r2], [0.3, 1.0, 1.0], 1e-6)


def test_report_says_clearly_when_there_are_no_runs(tmp_path):
    out = run(
        [sys.executable, "report.py", str(tmp_path)], env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    assert out.returncode == 1 and "report.py: error: no runs" in out.stderr


# ----------------------------------------------------------------------------- test-time compute


def test_trajectory_selection_by_q_halt_any_and_vote():
    """3 puzzles x 4 trajectories with hand-set answers and q_halt: the highest q's answer,
    any right answer, and the most common answer (a tie goes to the higher q)."""
    K, b, right_answer = 4, 3, np.array([[2, 3], [4, 5], [6, 7]])
    answers = np.array(  # [trajectory][puzzle]; 8,8 and 9,9 are wrong answers
        [
            [[2, 3], [9, 9], [6, 7]],
            [[8, 8], [4, 5], [9, 9]],
            [[2, 3], [4, 5], [9, 9]],
            [[2, 3], [9, 9], [6, 7]],
        ]
    )
    q = np.array([[0.0, 5.0, -1.0], [1.0, -2.0, 0.5], [-3.0, -1.0, 0.2], [-4.0, 0.0, 3.0]])
    out = {
        "logits": jnp.asarray(np.eye(11)[answers].reshape(K * b, 2, 11)),
        "q_halt": jnp.asarray(q.reshape(-1)),
        "seq_correct": jnp.asarray((answers == right_answer[None]).all(-1).reshape(-1)),
    }
    chosen = jax.device_get(model.select_trajectories(out, jnp.asarray(right_answer), K, (2, 4)))
    expected = {
        "exact@1": [True, False, True],  # trajectory 0 alone
        "exact@2": [False, False, False],  # the higher q of the first two: 1, 0, 1
        "oracle@2": [True, True, True],
        "vote@2": [False, False, False],  # 1 vote each: the higher q's answer
        "exact@4": [False, False, True],  # the highest q: trajectories 1, 0, 3
        "oracle@4": [True, True, True],
        "vote@4": [True, False, True],  # 3 of 4; 2 vs 2 -> q=5's; 2 vs 2 -> q=3's
    }
    assert {k: v.tolist() for k, v in chosen.items()} == expected


def test_test_time_compute_is_the_same_on_1_and_8_devices(tmp_path):
    """K = 4 noisy trajectories, reported after 2 and 4 steps: the same numbers on 1 and 8
    devices (the noise follows the test example, not its row or device), trajectory 0 is the
    plain evaluation, and the noise changes the other trajectories' answers."""
    path = data.build_builtin(str(tmp_path), 4, 25, 40, 45, 0, seed=0)
    test_ds = data.load([path], "test")
    cfg = tiny(num_puzzle_identifiers=test_ds["meta"]["num_puzzle_identifiers"], N_sup=4)
    params = model.init_params(jax.random.key(0), cfg)
    w = jax.random.normal(jax.random.key(1), (cfg.D, 2))  # q-halt varies: no ties in choice
    params = params | {"q_head": {"w": w, "b": params["q_head"]["b"]}}
    # Labels = the unperturbed model's own answers after 4 steps: trajectory 0 is right.
    logits, _ = model.predict(params, cfg, test_ds["inputs"], test_ds["puzzle_identifiers"])
    test_ds = test_ds | {"labels": np.asarray(jnp.argmax(logits, -1), np.int32)}
    ttc = model.TestTimeCompute(steps=(2, 4), trajectories=(1, 4), noise=1.0, seed=3)
    results = {}
    for n in (1, 8):
        mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n]
        )
        sharding = jax.sharding.NamedSharding(mesh, P("data"))
        B = data.eval_batch_size(5, n)
        eval_step = train.make_eval_step(cfg, mesh, ttc)
        batches = data.eval_batches(test_ds, B, None, data.process_rows(sharding, B))
        put = functools.partial(jax.device_put, device=sharding)
        results[n] = train.evaluate(eval_step, params, batches, put, cfg, ttc)
    one = results[1]
    assert one["eval/exact_accuracy@steps=4,K=1"] == one["eval/exact_accuracy_step4"] == 1.0
    assert one["eval/exact_accuracy@steps=2,K=1"] == one["eval/exact_accuracy_step2"]
    assert one["eval/oracle_accuracy@steps=4,K=4"] == 1.0
    assert (
        one["eval/vote_accuracy@steps=4,K=4"] < 1.0 or one["eval/exact_accuracy@steps=4,K=4"] < 1.0
    )
    fwd = model.flops_per_example(dataclasses.replace(cfg, N_sup=2), train_step=False)
    assert one["eval/flops_per_puzzle@steps=2,K=4"] == 4 * fwd
    assert results[8].keys() == one.keys()
    for k, v in one.items():  # selections exactly, sums of losses to float rounding
        assert results[8][k] == v if "@" in k else abs(results[8][k] - v) <= 1e-6 * abs(v), k
