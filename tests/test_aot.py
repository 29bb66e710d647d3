"""bench.py --aot: train.py's steps compiled for TPU slices on this CPU machine (libtpu as a
compiler only), what the compiler says of them, and run_all.sh --aot's table."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

import bench
from helpers import ROOT, phases, points

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='needs libtpu: pip install "jax[tpu]"'
)
SMOKE = ["--flagfile=configs/smoke.flags"]


def run_bench(*args, cache=None):
    """bench.py in a process of its own: (exit code, stdout, stderr, the --json object).
    bench.py --aot's cache of compiled programs is a fresh folder unless `cache` names one."""
    cache = cache or tempfile.mkdtemp(prefix="trmx-aot-test-")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=cache)
    out = subprocess.run(
        [sys.executable, "bench.py", *args], capture_output=True, text=True, cwd=ROOT, env=env,
        check=False,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if "--json" in args and out.returncode == 0 else None
    return out.returncode, out.stdout, out.stderr, result


def test_collectives_of_an_optimised_hlo_text():
    """Ops, counts and result bytes; async starts count their results only; host transfers."""
    hlo = """
  %all-reduce.42 = (f32[1536,512]{1,0:T(8,128)S(3)}, bf16[97]{0}, s32[]{:T(128)}) all-reduce(%a)
  %all-reduce.41 = s32[768]{0:T(1024)S(3)} all-reduce(%d), channel_id=22
  %ag = (f32[4,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) all-gather-start(%e), dimensions={0}
  %done = f32[16,8]{1,0} all-gather-done(%ag)
  ROOT %cp = f32[2,2]{1,0} collective-permute(%f), source_target_pairs={{0,1}}
  %s = (f32[8]{0}, u32[], token[]) send(%g, %t), channel_id=5
  %x = f32[8]{0} add(%y, %z)
"""
    ops, host = bench.collectives(hlo)
    assert ops == {
        "all-reduce": (2, 1536 * 512 * 4 + 97 * 2 + 4 + 768 * 4),
        "all-gather": (1, 16 * 8 * 4),
        "collective-permute": (1, 16),
    }
    assert host == 1


def test_without_libtpu_one_line_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r'pip install "jax\[tpu\]==0\.10\.2"'):
        bench.use_compile_only_tpu("v4-8")


def test_unknown_slice_and_missing_unknown_data_are_one_line_errors():
    code, _, err, _ = run_bench(*SMOKE, "--aot=v4-7")
    assert code != 0 and "Traceback" not in err
    assert "bench.py: --aot: unknown slice 'v4-7'; known: v4-8," in err
    code, _, err, _ = run_bench(*SMOKE, "--aot=v4-8", "--data_paths=data/nowhere")
    assert code != 0 and "Traceback" not in err
    assert "--data_paths=data/nowhere: not on this machine and of no known kind" in err


@needs_libtpu
def test_two_hosts_compile_and_the_gradients_are_one_all_reduce_of_the_params(tmp_path):
    """v4-16: 8 chips over 2 hosts, the mesh train.py --distributed builds over them. The
    train step exchanges gradients once: all-reduces of about the parameters' bytes (plus the
    metric sums), and moves nothing to or from the host. No libtpu warning reaches stderr.
    Run again, the programs are read from the cache, with the same figures."""
    args = (*SMOKE, "--aot=v4-16", "--kernel=pallas", "--json")
    code, out, err, r = run_bench(*args, cache=str(tmp_path))
    assert code == 0, err[-3000:]
    assert (r["slice"], r["chips"], r["hosts"]) == ("v4-16", 8, 2)
    assert "TPU_ACCELERATOR_TYPE" not in err and "TPU_WORKER_HOSTNAMES" not in err, err
    assert [line for line in err.splitlines() if not line.startswith("aot v4-16:")] == [], err
    train, ev = r["rows"]
    assert (train["program"], ev["program"]) == ("train T=1 n=2", "eval")
    assert train["fits"] and ev["fits"] and train["temp_bytes"] > 0
    grads = train["collectives"]["all-reduce"]
    assert r["param_bytes"] <= grads["bytes"] <= 1.1 * r["param_bytes"] + 2**16, grads
    assert grads["count"] <= 3 and set(train["collectives"]) == {"all-reduce"}
    assert train["host_transfers"] == 0 and ev["host_transfers"] == 0
    assert train["roofline_s"] > 0 and r["estimate"]["pallas"]["train_h"] > 0
    assert "ESTIMATE" in out and "fits" in out
    assert not any(x.get("cached") for x in r["rows"])
    code, _, err, again = run_bench(*args, cache=str(tmp_path))
    assert code == 0, err[-3000:]
    assert all(x.pop("cached") for x in again["rows"]) and again["rows"] == r["rows"]


@needs_libtpu
def test_a_program_too_big_for_hbm_is_reported_with_the_numbers():
    """4M rows per step: the compiler's out-of-memory error, in one line of the report."""
    code, out, err, r = run_bench(
        *SMOKE, "--aot=v4-8", "--kernel=xla", "--global_batch_size=4194304",
        "--builtin_train=4194304", "--eval_batch_size=8", "--json",
    )  # fmt: skip
    assert code == 0 and "Traceback" not in err, err[-3000:]
    train = r["rows"][0]
    assert not train["fits"] and r["estimate"]["xla"] is None
    assert train["error"].startswith("does not fit in HBM: Ran out of memory on HBM"), train
    assert re.search(r"exceeds available HBM \(\d+(\.\d+)?G\)", train["error"]), train
    assert "NOT COMPILED" in out and "does not fit in HBM" in out


@needs_libtpu
@pytest.mark.slow
def test_sudoku_mlp_with_the_kernel_compiles_for_v4_8_and_fits():
    """The paper's run: Sudoku-MLP, batch 768, bfloat16, the Pallas kernel, on a v4-8
    (4 chips, 192 rows each). 7 min 13 s on the project's 2-core VM while other jobs ran."""
    code, _, err, r = run_bench(
        "--flagfile=configs/sudoku_mlp.flags", "--aot=v4-8", "--kernel=pallas", "--json"
    )
    assert code == 0, err[-3000:]
    assert r["global_batch_size"] == 768 and r["config"]["forward_dtype"] == "bfloat16"
    assert r["num_steps"] == 65100  # 50000 epochs of 1000 puzzles at batch 768
    assert all(x["fits"] for x in r["rows"]), r["rows"]
    train = r["rows"][0]
    assert train["total_bytes"] < 8 * 2**30  # 4.0 GiB measured
    grads = train["collectives"]["all-reduce"]
    assert r["param_bytes"] <= grads["bytes"] <= 1.01 * r["param_bytes"], grads


def test_run_all_aot_compiles_every_point_and_not_the_eval_only_commands(tmp_path):
    """Every roadmap point once, through bench.py --aot; the `# then:` eval-only commands
    (E4.4) compile nothing new and are left out; E4.5, an eval-only experiment, compiles its
    eval step."""
    (tmp_path / "sudoku_mlp").mkdir()
    (tmp_path / "sudoku_mlp" / "aot.json").write_text("{}")  # compiled before: skipped
    out = subprocess.run(
        ["./run_all.sh", "--aot=v4-32", f"--runs={tmp_path}", "--dry_run", "all"],
        capture_output=True, text=True, cwd=ROOT, check=False,
        env=dict(os.environ, PYTHON=sys.executable),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    every_point = [p for phase in phases().values() for e in phase for p in points(e)]
    assert len(commands) == len(every_point) - 1  # less sudoku_mlp's one point
    assert "train.py" not in out.stdout
    assert sum("--flagfile=configs/e4_5_test_time.flags" in c for c in commands) == 1
    assert f"skip {tmp_path}/sudoku_mlp: compiled (aot.json)" in out.stdout
    base = f"+ {sys.executable} bench.py --flagfile=configs/sudoku_mlp.flags"
    assert all(c.startswith(base) for c in commands)
    assert all(c.endswith("--aot=v4-32 --json") for c in commands)


def test_table_of_compiled_points(tmp_path):
    """E1.1 first, then by name; a row per kernel; a sweep point as its flags; a point that
    does not fit marked NO with the reason."""
    row = {"kernel": "pallas", "fits": True, "total_bytes": 2**31, "compile_s": 10.0}
    row |= {"roofline_s": 0.05, "collectives": {"all-reduce": {"count": 2, "bytes": 20 * 2**20}}}
    chip = {"name": "TPU v4", "hbm_bytes": 32 * 2**30, "peak_flops": 275e12}
    chip |= {"hbm_bytes_per_s": 1.2e12, "source": "https://cloud.google.com/tpu/docs/v4"}
    ok = {
        "slice": "v4-32", "chips": 16, "hosts": 4, "chip": chip, "data": "d", "machine": "m",
        "versions": {"jax": "0.10.2", "libtpu": "0.0.42.1"}, "param_bytes": 20 * 2**20,
        "rows": [row | {"program": "train T=3 n=6"}, row | {"program": "eval"}],
        "estimate": {"pallas": {"train_h": 0.9, "eval_h": 0.4}},
    }  # fmt: skip
    big = ok | {"rows": [{"kernel": "pallas", "program": "train T=3 n=6", "fits": False,
                          "error": "does not fit in HBM: Ran out of memory", "compile_s": 4.0}],
                "estimate": {"pallas": None}}  # fmt: skip
    grid = "e2_2_t_n_grid/H_cycles-2_L_cycles-4"
    for point, r in [("sudoku_mlp", ok), ("e3_1_model_size/hidden_size-1280", big), (grid, ok)]:
        (tmp_path / point).mkdir(parents=True)
        (tmp_path / point / "aot.json").write_text(json.dumps(r))
    lines = bench.aot_table(str(tmp_path), "./run_all.sh --aot=v4-32 all").splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows[0] == (
        "| sudoku_mlp | - | pallas | 2.00 GiB | yes | 50 ms | 50 ms | 0.90 + 0.40 | "
        "2 x, 20.0 MiB | 20 s |"
    )
    assert rows[2].startswith("| e3_1_model_size | --hidden_size=1280 | pallas | - | **NO**: ")
    assert rows[1].startswith("| e2_2_t_n_grid | --H_cycles=2 --L_cycles=4 | pallas | 2.00 GiB")
    assert "`./run_all.sh --aot=v4-32 all`" in lines[2]


@needs_libtpu
def test_every_slice_is_described_by_libtpu():
    """Chips and hosts of each slice name: TensorCores / 2 for v4 and v5p, 4 chips a host
    (8 for a one-host v5e-8 or v6e-8)."""
    code = (
        "import bench; bench.use_compile_only_tpu('v4-8')\n"
        "for s in bench.SLICES:\n"
        "    chip, d = bench.describe(s)\n"
        "    print(s, len(d), len({x.process_index for x in d}), chip.name)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    got = {
        s: (int(n), int(h), " ".join(c)) for s, n, h, *c in map(str.split, out.stdout.splitlines())
    }
    assert got["v4-32"] == (16, 4, "TPU v4") and got["v4-128"] == (64, 16, "TPU v4")
    assert got["v5p-8"] == (4, 1, "TPU v5p") and got["v5e-8"] == (8, 1, "TPU v5e")
    assert got["v5e-16"] == (16, 4, "TPU v5e") and got["v6e-8"] == (8, 1, "TPU v6e")
    assert set(got) == set(bench.SLICES)
