"""Compile an experiment for a TPU slice on a machine without one, and read what the compiler
says: memory per chip against its HBM, FLOPs and bytes, the collectives, compile time, and a
roofline estimate of the step and run time. `python bench.py --aot=SLICE` runs it:

  python bench.py --flagfile=configs/sudoku_mlp.flags --aot=v4-32
  python bench.py --flagfile=configs/sudoku_mlp.flags --flagfile=configs/e3_1_model_size.flags \
      --hidden_size=1280 --aot=v5e-16 --json
  ./run_all.sh --aot=v4-32 all          # every point of the roadmap, one Markdown table

How: libtpu describes the slice's chips without a TPU attached (jax.experimental.topologies;
JAX's default backend stays CPU); `train.setup` builds the model, optimiser and jitted steps
that train.py runs, over a mesh of those chips (`train.data_mesh`); the steps are lowered for
the shapes and shardings of the real state and batch (`train.state_layout`, no arrays) and
compiled by the TPU compiler, Mosaic for the Pallas kernel included. Every curriculum stage of
the train step and the eval step is compiled, with each kernel (--kernel=auto: both).

The memory is XLA's static account of one chip's program (arguments + outputs - donated +
temporaries + code), not a measurement on a TPU. The roofline time of a step is
max(FLOPs / peak, bytes / HBM bandwidth) of one chip, with the chip's bf16 peak (float32 runs
slower), the larger of the model's matmul FLOPs (bench.py's model_flops_per_example) and XLA's
count, and XLA's bytes accessed. XLA's cost analysis counts a loop's body once (the T-1
no-gradient cycles and the n z-updates are loops, and the eval step's N_sup ACT steps), so its
counts are low; the roofline time is a lower bound as far as the model's FLOPs are exact, and
has no communication in it: an estimate, not a measurement.
"""

import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections import Counter

import jax
import jax.numpy as jnp
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data
import train


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float
    peak_flops: float  # bf16, per chip
    hbm_bytes_per_s: float
    source: str


# Google's published figures per chip (the pages' units: GiB for v4, GB for the others).
CHIPS = {
    "v4": Chip("TPU v4", 32 * 2**30, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16e9, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95e9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32e9, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# Slice name -> (libtpu topology, chip config, chips per host). The name counts TensorCores
# for v4 and v5p (two per chip, one JAX device per chip: "megacore"), chips for v5e and v6e.
SLICES = {
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-16": ("v4:2x2x2", "megacore", (2, 2, 1)),
    "v4-32": ("v4:2x2x4", "megacore", (2, 2, 1)),
    "v4-64": ("v4:2x4x4", "megacore", (2, 2, 1)),
    "v4-128": ("v4:4x4x4", "megacore", (2, 2, 1)),
    "v4-256": ("v4:4x4x8", "megacore", (2, 2, 1)),
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": ("v5:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5:2x2x4", "megacore", (2, 2, 1)),
    "v5p-64": ("v5:2x4x4", "megacore", (2, 2, 1)),
    "v5e-4": ("v5e:2x2", "default", (2, 2, 1)),
    "v5e-8": ("v5e:2x4", "default", (2, 4, 1)),
    "v5e-16": ("v5e:4x4", "default", (2, 2, 1)),
    "v5e-32": ("v5e:4x8", "default", (2, 2, 1)),
    "v5e-64": ("v5e:8x8", "default", (2, 2, 1)),
    "v6e-4": ("v6e:2x2", "default", (2, 2, 1)),
    "v6e-8": ("v6e:2x4", "default", (2, 4, 1)),
    "v6e-16": ("v6e:4x4", "default", (2, 2, 1)),
    "v6e-32": ("v6e:4x8", "default", (2, 2, 1)),
    "v6e-64": ("v6e:8x8", "default", (2, 2, 1)),
}

# The metadata of datasets that may not be on this machine, by the name data.py's commands
# give their folders (README, Data). Sudoku-Extreme: the training count is the number before
# "k" in the folder name (--subsample); 423K test puzzles (the paper's count).
SUDOKU = dict(vocab_size=11, seq_len=81, num_puzzle_identifiers=1, mean_puzzle_examples=1)
KNOWN_DATA = {r"sudoku-extreme-(\d+)k\b": SUDOKU}
SUDOKU_EXTREME_TEST = 423_000


def error(message):
    return SystemExit(f"bench.py: --aot: {message}")


def use_compile_only_tpu(slice_name):
    """Make libtpu usable as a compiler only, quietly, before anything starts it. At start it
    looks for a TPU VM's settings and warns on stderr when they are missing; these stand in for
    them. Another process here may hold libtpu's lock file: a compiler needs no TPU to itself.
    JAX's default backend stays the CPU (a TPU attached here is left alone)."""
    if importlib.util.find_spec("libtpu") is None:
        raise error(f'needs the TPU compiler (libtpu): pip install "jax[tpu]=={jax.__version__}"')
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")


def describe(slice_name):
    """(Chip, the slice's JAX devices) from libtpu, with no TPU attached."""
    from jax.experimental import topologies  # noqa: PLC0415

    if slice_name not in SLICES:
        raise error(f"unknown slice {slice_name!r}; known: {', '.join(SLICES)}")
    name, chip_config, per_host = SLICES[slice_name]
    try:
        topo = topologies.get_topology_desc(
            platform="tpu",
            topology_name=name,
            chip_config_name=chip_config,
            chips_per_host_bounds=per_host,
            num_slices=1,
        )
    except Exception as e:  # noqa: BLE001 (libtpu's errors have no common type)
        raise error(f"libtpu cannot describe {slice_name} ({name}): {e}") from None
    return CHIPS[slice_name.split("-")[0]], topo.devices


def train_meta():
    """(training split's metadata, test examples or None, where they came from): read from
    the dataset when it is here, else the known metadata of its kind (KNOWN_DATA), else the
    built-in data's from its flags; --train_puzzles and --train_aug applied."""
    paths = train._DATA_PATHS.value
    puzzles, aug = train._TRAIN_PUZZLES.value, train._TRAIN_AUG.value
    if not paths:
        meta = dict(SUDOKU, total_groups=train._BUILTIN_TRAIN.value)
        test, source = train._BUILTIN_TEST.value, "built-in data (its flags)"
    elif all(os.path.exists(os.path.join(p, "train", "dataset.json")) for p in paths):
        ds = data.load(paths, "train")
        if puzzles is not None or aug is not None:
            ds = data.subset(ds, puzzles, aug)
        test = len(data.load(paths, "test")["inputs"]) if _has_test(paths) else None
        return ds["meta"], test, f"{','.join(paths)} (dataset.json)"
    else:
        found = [(p, m, re.search(pat, p)) for p in paths for pat, m in KNOWN_DATA.items()]
        found = [(p, m, match) for p, m, match in found if match]
        if len(paths) != 1 or not found:
            raise error(
                f"--data_paths={','.join(paths)}: not on this machine and of no known kind "
                f"({', '.join(KNOWN_DATA)}); build it (python data.py) or pass one that is here"
            )
        path, known, match = found[0]
        meta = dict(known, total_groups=int(match.group(1)) * 1000)
        test = SUDOKU_EXTREME_TEST
        source = f"{path} is not here: Sudoku-Extreme's metadata, {meta['total_groups']} "
        source += "training puzzles (the folder name), ~423K test puzzles (the paper's)"
    if puzzles is not None:
        meta["total_groups"] = puzzles  # mean_puzzle_examples stays 1: one example a puzzle
    return meta, test, source


def _has_test(paths):
    return all(os.path.exists(os.path.join(p, "test", "dataset.json")) for p in paths)


def batch_shapes(mesh, rows, seq_len):
    """The shapes and row sharding of a global batch (what train.py's to_global makes)."""
    sharding = NamedSharding(mesh, P("data"))

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)

    return {"inputs": s(rows, seq_len), "labels": s(rows, seq_len), "puzzle_identifiers": s(rows)}


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute|collective-broadcast|ragged-all-to-all)(-start)?\(",
    re.M,
)
_HOST = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? (send|recv|infeed|outfeed)(-start)?\(", re.M)
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+|f8\w*|c64|c128)\[([\d,]*)\]")


def _bytes(shapes):
    """Bytes of the arrays in an HLO shape string, e.g. '(f32[512,97]{0,1}, s32[])'."""
    total = []
    for dtype, dims in _ARRAY.findall(shapes):
        bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype) or 16)
        bits = 16 if dtype == "bf16" else bits
        total.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
    return total


def collectives(hlo_text):
    """{op: (count, bytes)} of the collectives in an optimised HLO module, bytes being their
    results' (an async all-gather or permute's -start holds its operands too: half counted),
    and the number of host transfers (send, recv, infeed, outfeed)."""
    out = {}
    for shapes, op, start in _COLLECTIVE.findall(hlo_text):
        sizes = _bytes(shapes)
        if start and op in ("all-gather", "collective-permute"):
            sizes = [s for s in sizes if s > 4]  # the context scalars
            sizes = sizes[len(sizes) // 2 :]
        count, total = out.get(op, (0, 0))
        out[op] = (count + 1, total + sum(sizes))
    return out, len(_HOST.findall(hlo_text))


def analyse(compiled, chip, model_flops):
    """What the compiler says of one chip's program, and its roofline time."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "code_bytes": m.generated_code_size_in_bytes,
    }
    total = sum(v for k, v in memory.items() if k != "alias_bytes") - m.alias_size_in_bytes
    ops, host = collectives(compiled.as_text())
    flops = max(model_flops, float(cost.get("flops", 0)))
    bytes_accessed = float(cost.get("bytes accessed", 0))
    return memory | {
        "total_bytes": total,
        "hbm_bytes": chip.hbm_bytes,
        "fits": total <= chip.hbm_bytes,
        "model_flops": model_flops,
        "xla_flops": float(cost.get("flops", 0)),
        "xla_bytes_accessed": bytes_accessed,
        "collectives": {op: {"count": c, "bytes": b} for op, (c, b) in sorted(ops.items())},
        "host_transfers": host,
        "roofline_s": max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bytes_per_s),
    }


CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "trmx-aot")


def compile_one(step, args, chip, model_flops, slice_name):
    """Lower and compile `step` for `args` (shapes); the analysis, or the error in one line.
    A program too big for the chip's HBM is the compiler's RESOURCE_EXHAUSTED error, with its
    numbers (it counts against the HBM it can use: 30.75 GiB of v4's 32).

    Results are kept in CACHE by a hash of the slice, the versions and the lowered program's
    text: a program compiled before (another sweep point that differs only in its data, or
    the same eval step) is read back, marked "cached", with its first compile time."""
    t0, path = time.perf_counter(), None
    try:
        lowered = step.lower(*args)
        versions = f"{slice_name} jax {jax.__version__} libtpu {_libtpu_version()}\n"
        key = hashlib.sha256((versions + lowered.as_text()).encode()).hexdigest()
        path = os.path.join(CACHE, f"{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f) | {"cached": True}
        result = analyse(lowered.compile(), chip, model_flops)
    except Exception as e:  # noqa: BLE001 (the compiler's errors: reported, not raised)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if msg.startswith("RESOURCE_EXHAUSTED"):
            msg = "does not fit in HBM: " + msg.split(":", 1)[1].strip()
        result = {"error": msg[:400], "fits": False}
    result["compile_s"] = time.perf_counter() - t0
    if path:  # written aside, then renamed: never read half-written
        os.makedirs(CACHE, exist_ok=True)
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump(result, f)
        os.replace(f"{path}.{os.getpid()}", path)
    return result


def _libtpu_version():
    return importlib.metadata.version("libtpu")


def stage_steps(cfg, num_steps):
    """{(T, n): steps trained at it}: the curriculum's stages (train.curriculum)."""
    return Counter(train.curriculum(cfg, s) for s in range(num_steps))


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def compile_experiment(slice_name, kernels, flops_per_example):
    """Every program of the experiment the flags describe, compiled for `slice_name` with each
    kernel: a dict for --json and the report. flops_per_example(cfg, train_step): the model's
    matmul FLOPs per example (bench.py's model_flops_per_example)."""
    chip, devices = describe(slice_name)
    mesh = train.data_mesh(devices)
    hosts = len({d.process_index for d in devices})
    B, B_eval = train.batch_sizes(mesh)
    meta, test_examples, source = train_meta()
    jobs = []
    for kernel in kernels:
        flags.FLAGS.kernel = kernel  # model_config reads it (--kernel)
        run = train.setup(meta, mesh, platform="tpu")
        shapes = batch_shapes(mesh, B, run.cfg.seq_len)
        _, state, shardings = train.state_layout(
            run.cfg, run.tx, shapes, mesh, 0, train._EMA.value, train._SWA_START.value is not None
        )
        state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings
        )
        for (T, n), steps in sorted(stage_steps(run.cfg, run.num_steps).items()):
            cfg = dataclasses.replace(run.cfg, T=T, n=n)
            flops = flops_per_example(cfg) * B / mesh.size
            args = (state, shapes)
            jobs.append(
                (kernel, f"train T={T} n={n}", steps, run.train_step_for(T, n), args, flops)
            )
        params = state["params"] | state["buffers"]
        flops = flops_per_example(run.eval_cfg, False) * B_eval / mesh.size
        eval_args = (params, batch_shapes(mesh, B_eval, run.cfg.seq_len))
        examples = test_examples
        if examples is not None and train._EVAL_MAX_EXAMPLES.value:
            examples = min(examples, train._EVAL_MAX_EXAMPLES.value)
        evals = -(-run.num_steps // run.eval_every)  # after every eval_every steps and at the end
        batches = None if examples is None else evals * -(-examples // B_eval)
        jobs.append((kernel, "eval", batches, run.eval_step, eval_args, flops))

    rows, t_start = [], time.perf_counter()
    for i, (kernel, program, count, step, args, flops) in enumerate(jobs):
        done = time.perf_counter() - t_start
        eta = f", ETA {done / i * (len(jobs) - i):.0f} s" if i else ""
        progress(
            f"aot {slice_name}: compiling {program} ({kernel}) {i + 1}/{len(jobs)}, "
            f"{done:.0f} s so far{eta}"
        )
        r = compile_one(step, args, chip, flops, slice_name)
        rows.append({"kernel": kernel, "program": program, "count": count} | r)
    return {
        "slice": slice_name,
        "chip": dataclasses.asdict(chip),
        "chips": mesh.size,
        "hosts": hosts,
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
        "machine": machine(),
        "data": source,
        "global_batch_size": B,
        "eval_batch_size": B_eval,
        "num_steps": run.num_steps,
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"])),
        "param_bytes": sum(
            math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state["params"])
        ),
        "config": {k: str(v) for k, v in vars(run.cfg).items()},
        "rows": rows,
        "estimate": estimates(rows),
    }


def estimates(rows):
    """Per kernel: the run's roofline time (train steps of each stage, and the evaluations
    when the test set's size is known), in hours: an estimate, not a measurement."""
    out = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        if any("error" in r for r in mine):
            out[kernel] = None
            continue
        train_s = sum(r["count"] * r["roofline_s"] for r in mine if r["program"] != "eval")
        ev = next(r for r in mine if r["program"] == "eval")
        eval_s = None if ev["count"] is None else ev["count"] * ev["roofline_s"]
        out[kernel] = {
            "train_h": train_s / 3600,
            "eval_h": None if eval_s is None else eval_s / 3600,
        }
    return out


def _size(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _gflop(f):
    return f"{f / 1e9:,.0f}" if f >= 1e11 else f"{f / 1e9:.3g}"


def _hours(h):
    return f"{h:.2f} h" if h >= 0.1 else f"{h * 60:.2g} min" if h >= 1 / 60 else f"{h * 3600:.2g} s"


def _seconds(t):
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def report(r):
    """The human-readable report of compile_experiment's result."""
    c = r["chip"]
    lines = [
        f"{r['slice']}: {r['chips']} {c['name']} chips over {r['hosts']} hosts | per chip "
        f"{c['hbm_bytes'] / 2**30:.1f} GiB HBM, {c['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{c['hbm_bytes_per_s'] / 1e9:.0f} GB/s ({c['source']}) | jax {r['versions']['jax']}, "
        f"libtpu {r['versions']['libtpu']}, compiled on this machine without a TPU",
        f"{r['params']:,} params | batch {r['global_batch_size']} "
        f"({r['global_batch_size'] // r['chips']} rows per chip), eval batch "
        f"{r['eval_batch_size']} | {r['num_steps']} steps | data: {r['data']}",
        "per chip: args + out - donated + temp + code = total of HBM | model / XLA GFLOP, XLA "
        "GB accessed | collectives (op x count, result bytes) | compile time | roofline step",
    ]
    for x in r["rows"]:
        head = f"  {x['kernel']:6s} {x['program']:14s}"
        if "error" in x:
            cached = " (cached)" if x.get("cached") else ""
            lines.append(f"{head} NOT COMPILED ({x['compile_s']:.0f} s{cached}): {x['error']}")
            continue
        coll = ", ".join(
            f"{op} x{v['count']} {_size(v['bytes'])}" for op, v in x["collectives"].items()
        )
        fits = "fits" if x["fits"] else "DOES NOT FIT"
        lines.append(
            f"{head} {_size(x['argument_bytes'])} + {_size(x['output_bytes'])} - "
            f"{_size(x['alias_bytes'])} + {_size(x['temp_bytes'])} + {_size(x['code_bytes'])} "
            f"= {_size(x['total_bytes'])} of {_size(x['hbm_bytes'])}: {fits} | "
            f"{_gflop(x['model_flops'])} / {_gflop(x['xla_flops'])} GFLOP, "
            f"{x['xla_bytes_accessed'] / 1e9:.3g} GB | {coll or 'none'}"
            + (f", {x['host_transfers']} host transfers" if x["host_transfers"] else "")
            + f" | {x['compile_s']:.0f} s{' (cached)' if x.get('cached') else ''} | "
            + _seconds(x["roofline_s"])
        )
    for kernel, e in r["estimate"].items():
        if e is None:
            lines.append(f"  {kernel}: no estimate (a program did not compile)")
            continue
        ev = "evaluations not counted (test set size unknown)"
        if e["eval_h"] is not None:
            ev = f"+ evaluations {_hours(e['eval_h'])} = {_hours(e['train_h'] + e['eval_h'])}"
        lines.append(
            f"  {kernel}: ESTIMATE (roofline, no communication, not measured): training "
            f"{_hours(e['train_h'])} {ev}"
        )
    return "\n".join(lines)


def main(slice_name, as_json, flops_per_example):
    use_compile_only_tpu(slice_name)
    kernel = train._KERNEL.value
    if kernel == "auto":
        kernels = ["pallas", "xla"] if train._MLP_T.value else ["xla"]
    else:
        kernels = [kernel]
    result = compile_experiment(slice_name, kernels, flops_per_example)
    print(report(result), flush=True)
    if as_json:
        print(json.dumps(result))
    return result


def machine():
    """This machine's CPU and core count (where the compiling ran)."""
    names = [line for line in train._read_lines("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0].split(":", 1)[1].strip() if names else "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores"


def _natural(path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def table(root, command):
    """Markdown: one row per point and kernel of every aot.json under `root` (written by
    run_all.sh --aot), E1.1 first."""
    paths = glob.glob(os.path.join(root, "**", "aot.json"), recursive=True)
    points = sorted(
        (os.path.relpath(os.path.dirname(p), root) for p in paths),
        key=lambda p: (not p.startswith("sudoku_mlp"), _natural(p)),
    )
    out, head = [], None
    for point in points:
        with open(os.path.join(root, point, "aot.json")) as f:
            r = json.load(f)
        experiment, _, sweep = point.partition("/")
        flags_ = re.findall(r"([A-Za-z_]+?)-([^_]+)(?:_|$)", sweep)  # run_all.sh's point_dir
        name = f"| {experiment} | {' '.join(f'--{k}={v}' for k, v in flags_) or '-'} |"
        if "error" in r:
            out.append(f"{name} - | not compiled: {r['error']} | | | | | |")
            continue
        head = head or r
        for kernel, estimate in r["estimate"].items():
            mine = [x for x in r["rows"] if x["kernel"] == kernel]
            errors = [f"{x['program']}: {x['error']}" for x in mine if "error" in x]
            if errors:
                fits = "**NO**" if any("does not fit" in e for e in errors) else "error"
                out.append(f"{name} {kernel} | - | {fits}: {'; '.join(errors)} | | | | | |")
                continue
            trains = [x for x in mine if x["program"] != "eval"]
            ev = next(x for x in mine if x["program"] == "eval")
            hbm = max(x["total_bytes"] for x in mine)
            fits = "yes" if all(x["fits"] for x in mine) else "**NO**"
            step = "; ".join(_seconds(x["roofline_s"]) for x in trains)
            hours = f"{estimate['train_h']:.2f}"
            if estimate["eval_h"] is not None:
                hours += f" + {estimate['eval_h']:.2f}"
            grads = trains[-1]["collectives"].get("all-reduce", {"count": 0, "bytes": 0})
            compile_s = sum(x["compile_s"] for x in mine if not x.get("cached"))
            cached = sum(bool(x.get("cached")) for x in mine)
            out.append(
                f"{name} {kernel} | {_size(hbm)} | {fits} | {step} | {_seconds(ev['roofline_s'])}"
                f" | {hours} | {grads['count']} x, {_size(grads['bytes'])} | {compile_s:.0f} s"
                + (f" ({cached} cached)" if cached else "")
                + " |"
            )
    if head is None:
        return "no compiled point under " + root
    c = head["chip"]
    return "\n".join(
        [
            f"# Every roadmap point compiled for {head['slice']} ({head['chips']} {c['name']} "
            f"chips, {head['hosts']} hosts), without a TPU",
            "",
            f"Command: `{command}` (one `python bench.py ... --aot={head['slice']} --json` per "
            f"point; aot.py). Compiled with jax {head['versions']['jax']}, libtpu "
            f"{head['versions']['libtpu']} on {head['machine']}, {time.strftime('%Y-%m-%d')}.",
            f"Data: {head['data']}.",
            "",
            f"Per chip: HBM is XLA's static total (arguments + outputs - donated + temporaries +"
            f" code), the largest over the point's programs, against {_size(c['hbm_bytes'])} "
            f"({c['source']}). Train step and eval step: roofline time, max(FLOPs / "
            f"{c['peak_flops'] / 1e12:.0f} TFLOP/s, bytes / {c['hbm_bytes_per_s'] / 1e9:.0f} "
            "GB/s), one per curriculum stage. Hours: ESTIMATES, training + evaluations (no "
            "communication, no input pipeline; aot.py). Compile: the time this point's "
            "programs took to compile here; a program compiled before for another point "
            "(the same lowered text) is read from aot.py's cache. Gradient all-reduce: the "
            "all-reduce "
            f"ops of the (final) train step and their bytes; the params are "
            f"{_size(head['param_bytes'])} at E1.1's size.",
            "",
            "| experiment | point | kernel | HBM per chip | fits | train step | eval step | "
            "hours (train + eval) | gradient all-reduce | compile |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *out,
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "table":
        sys.exit("usage: python aot.py table RUNS_DIR COMMAND  (run_all.sh --aot calls it)")
    print(table(sys.argv[2], sys.argv[3]))
