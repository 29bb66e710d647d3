"""Turn run directories into plots and a Markdown RESULTS.md.

  python report.py runs/mini --out=results/mini --notes=results/mini/NOTES.md
  python report.py runs/e2_* runs/sudoku_mlp --out=report

A run is a directory holding metrics.jsonl (train.py --workdir); a path without one is
searched below for runs. A run's group is its experiment: the directory's name, or its
parent's for a sweep point (runs/e2_2_t_n_grid/H_cycles-2_L_cycles-4 is a run of
e2_2_t_n_grid). The group named by --baseline (E1.1, sudoku_mlp) is what the others are
compared with. What is written to --out:

  RESULTS.md           the tables: every run; each group beside the baseline; the T x n grid;
                       exact accuracy after each supervision step; test-time compute (steps x
                       trajectories); the compute-accuracy front;
                       power-law fits; ARC's pass@K; the runs' hardware and versions
  curves.png           train loss, train and eval exact accuracy against step, per group
  groups.png           final eval exact accuracy of each run, group by group
  heatmap_T_n.png      exact accuracy over T x n, for a group that varies both
  per_step.png         exact accuracy after each supervision step at evaluation
  test_time.png        exact accuracy of K test-time trajectories against forward FLOPs per puzzle
  arc.png              ARC runs: pass@K against K (last evaluation), pass@2 against step
  frontier.png         exact accuracy against forward FLOPs per solved puzzle, the Pareto front
  scaling_GROUP.png    error against training puzzles / params / batch, log-log, with its fit

Compute is counted from each run's config (model.flops_per_example: matmul FLOPs): a
puzzle evaluated for k supervision steps costs k forward ACT steps, so the FLOPs per solved
puzzle after k steps are k * (forward FLOPs of one step) / (exact accuracy after k steps).
"Halting by Q" is the adaptive point: each puzzle stops at the first step its Q-head says
halt (eval/halted_steps on average) and is scored there (eval/halted_exact_accuracy).
Power laws are fitted to the error, 1 - exact accuracy = a * x^-b, by least squares in log-log.
"""

import dataclasses
import glob
import json
import math
import os
import re
import sys

import jax
import numpy as np
from absl import app, flags

import model

_OUT = flags.DEFINE_string("out", "report", "folder for RESULTS.md and the plots")
_BASELINE = flags.DEFINE_string("baseline", "sudoku_mlp", "group the others are compared with")
_NOTES = flags.DEFINE_string("notes", None, "Markdown file put at the top of RESULTS.md")
_TITLE = flags.DEFINE_string("title", "trmx results", "RESULTS.md heading")

# Swept variables that get a power-law fit, with the x they are fitted against.
SCALING = {
    "train_puzzles": "training puzzles",
    "builtin_train": "training puzzles",
    "hidden_size": "params",
    "global_batch_size": "global batch",
}


# ----------------------------------------------------------------------------- reading runs


def find_runs(paths):
    """Every run under `paths` (directories or glob patterns), in a stable order."""
    runs = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for match in matches:
            path = match.rstrip("/")
            if not os.path.isdir(path):
                raise ValueError(f"{path}: not a directory")
            if os.path.exists(os.path.join(path, "metrics.jsonl")):
                runs.append(read_run(path, os.path.basename(path), ""))
                continue
            for root, _, files in sorted(os.walk(path)):
                if "metrics.jsonl" not in files:
                    continue
                parent = os.path.dirname(root)
                if parent == path:
                    runs.append(read_run(root, os.path.basename(root), ""))
                else:
                    runs.append(read_run(root, os.path.basename(parent), os.path.basename(root)))
    if not runs:
        raise ValueError(f"no runs (folders with metrics.jsonl) under {' '.join(paths)}")
    return runs


def read_run(path, group, point):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(path, "flags.txt")) as f:
        run_flags = parse_flags(f.read())
    envs = sorted(glob.glob(os.path.join(path, "env_*.json")))
    env = {}
    if envs:
        with open(envs[-1]) as f:
            env = json.load(f)
    evals = [m for m in metrics if "eval/exact_accuracy" in m]
    run = {
        "dir": path,
        "group": group,
        "point": point,
        "name": f"{group}/{point}" if point else group,
        "flags": run_flags,
        "metrics": metrics,
        "eval": evals[-1] if evals else None,
        "extra_evals": {  # the last eval_swa/*, eval_avg/* lines, if any
            prefix: next((m for m in reversed(metrics) if f"{prefix}/exact_accuracy" in m), None)
            for prefix in ("eval_swa", "eval_avg")
        },
        "env": env,
        "done": os.path.exists(os.path.join(path, "done.json")),  # train.py's mark of a finish
    }
    run["cfg"] = config_of(run)
    shapes = jax.eval_shape(lambda key: model.init_params(key, run["cfg"]), jax.random.key(0))
    run["params"] = model.num_params(shapes)
    return run


def parse_flags(text):
    """flags.txt (absl's --name=value lines; --name / --noname for booleans) -> {name: str}.
    A bare --noX is X=false, except for the flags whose own name starts with "no"
    (--no_ACT_continue)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("--"):
            continue
        body = line[2:]
        if "=" in body:
            name, value = body.split("=", 1)
        elif body.startswith("no") and body not in model.FLAG_KEYS:
            name, value = body[2:], "false"
        else:
            name, value = body, "true"
        out[name] = value
    return out


def int_flag(run, name):
    """The run's value of an integer flag of train.py; None where flags.txt has none."""
    value = run["flags"].get(name)
    return None if value in (None, "") else int(value)


def config_of(run):
    """The model a run trained: its config.json (train.py writes it), else its flags.txt
    read through model.FLAG_KEYS, on Sudoku's vocabulary and length (Config's defaults)."""
    path = os.path.join(run["dir"], "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return model.Config(**json.load(f))
    kinds = {f.name: type(f.default) for f in dataclasses.fields(model.Config)}
    values = {}
    for name, text in run["flags"].items():
        if name in model.FLAG_KEYS and name != "kernel":
            kind = kinds[model.FLAG_KEYS[name]]
            values[name] = text == "true" if kind is bool else kind(text)
    if "puzzle_emb_ndim" not in run["flags"]:  # unset: the width D
        values["puzzle_emb_ndim"] = None
    return model.Config.from_flags(values)


def step_flops(cfg):
    """Forward matmul FLOPs of one supervision (ACT) step on one puzzle."""
    return model.flops_per_example(dataclasses.replace(cfg, N_sup=1), train_step=False)


def per_step_accuracy(run):
    """[exact accuracy after step 1, 2, ...] of the final evaluation."""
    ev, out = run["eval"] or {}, []
    while f"eval/exact_accuracy_step{len(out) + 1}" in ev:
        out.append(ev[f"eval/exact_accuracy_step{len(out) + 1}"])
    return out


def test_time_points(run):
    """[(steps, K, exact, vote, any right, forward FLOPs per puzzle)] of the final
    evaluation's test-time compute grid (train.py --eval_trajectories / a list of
    --eval_halt_max_steps), in (K, steps) order."""
    ev, points = run["eval"] or {}, []
    for key, exact in ev.items():
        found = re.fullmatch(r"eval/exact_accuracy@steps=(\d+),K=(\d+)", key)
        if found:
            at = key.split("@", 1)[1]
            S, K = map(int, found.groups())
            vote, oracle = ev.get(f"eval/vote_accuracy@{at}"), ev.get(f"eval/oracle_accuracy@{at}")
            points.append((S, K, exact, vote, oracle, ev[f"eval/flops_per_puzzle@{at}"]))
    return sorted(points, key=lambda p: (p[1], p[0]))


def varying(runs):
    """The flags whose values differ between these runs (what a group sweeps)."""
    names = set().union(*(r["flags"] for r in runs)) - {"workdir", "flagfile"}
    return sorted(n for n in names if len({r["flags"].get(n) for r in runs}) > 1)


def label(run, names):
    return ", ".join(f"{n}={run['flags'].get(n, 'default')}" for n in names) or run["name"]


# ----------------------------------------------------------------------------- analysis


def frontier_points(runs):
    """(FLOPs per solved puzzle, exact accuracy, run, how) for every eval step of every run
    and every run's halting-by-Q point."""
    points = []
    for r in runs:
        fwd = step_flops(r["cfg"])
        for k, acc in enumerate(per_step_accuracy(r), start=1):
            if acc > 0:
                points.append((k * fwd / acc, acc, r, f"{k} steps"))
        for S, K, acc, *_, flops in test_time_points(r):
            if acc > 0 and K > 1:
                points.append((flops / acc, acc, r, f"{S} steps x {K} trajectories"))
        ev = r["eval"] or {}
        if ev.get("eval/halted_exact_accuracy", 0) > 0:
            acc, steps = ev["eval/halted_exact_accuracy"], ev["eval/halted_steps"]
            points.append((steps * fwd / acc, acc, r, f"halting by Q ({steps:.2f} steps)"))
    return points


def pareto(points):
    """The points no other point beats in both fewer FLOPs and higher accuracy."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def power_law(xs, errors):
    """Least-squares fit of log(error) = log(a) - b log(x): (a, b, R^2)."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(errors, float), 1e-6))
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + slope * lx
    total = np.sum((ly - ly.mean()) ** 2)
    r2 = 1 - np.sum((ly - pred) ** 2) / total if total > 0 else 1.0
    return math.exp(intercept), -slope, r2


def scaling_fits(groups, baseline):
    """For each group that sweeps a SCALING variable: (group, variable, xs, errors, fit)."""
    fits = []
    for name, runs in groups.items():
        swept = [v for v in varying(runs) if v in SCALING]
        if len(swept) != 1 or name == _BASELINE.value:
            continue
        var = swept[0]
        members = [r for r in runs if r["eval"]]
        values = {r["flags"].get(var) for r in members}
        members += [r for r in baseline if r["eval"] and r["flags"].get(var) not in values]
        members = [r for r in members if SCALING[var] == "params" or int_flag(r, var) is not None]
        xs = [r["params"] if SCALING[var] == "params" else int_flag(r, var) for r in members]
        if len(set(xs)) < 3:
            continue
        errors = [1 - r["eval"]["eval/exact_accuracy"] for r in members]
        order = np.argsort(xs)
        xs, errors = [xs[i] for i in order], [errors[i] for i in order]
        fits.append((name, var, xs, errors, power_law(xs, errors)))
    return fits


# ----------------------------------------------------------------------------- plots


def plots(runs, groups, out):
    """Writes the PNGs; returns their file names."""
    import matplotlib  # noqa: PLC0415 (report.py's one extra dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)

    # learning curves, one column per group
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.5), squeeze=False)
    for col, (name, members) in enumerate(groups.items()):
        names = varying(members)
        for r in members:
            train_lines = [m for m in r["metrics"] if "train/loss" in m]
            evals = [m for m in r["metrics"] if "eval/exact_accuracy" in m]
            (line,) = axes[0, col].plot(
                [m["step"] for m in train_lines], [m["train/loss"] for m in train_lines], lw=1
            )
            axes[1, col].plot(
                [m["step"] for m in train_lines],
                [m.get("train/exact_accuracy", np.nan) for m in train_lines],
                "-",
                lw=1,
                color=line.get_color(),
                label=label(r, names) if names else r["name"],
            )
            axes[1, col].plot(
                [m["step"] for m in evals],
                [m["eval/exact_accuracy"] for m in evals],
                "o",
                color=line.get_color(),
            )
        axes[0, col].set(title=name, yscale="log", xlabel="step", ylabel="train loss")
        axes[1, col].set(
            xlabel="step", ylabel="exact accuracy: train (line), eval (dots)", ylim=(0, 1)
        )
        axes[1, col].legend(fontsize=6)
    save(fig, "curves.png")

    # final accuracy per run, group by group
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(runs)), 4))
    names = [r["name"] for r in runs]
    accs = [(r["eval"] or {}).get("eval/exact_accuracy", np.nan) for r in runs]
    colors = [f"C{list(groups).index(r['group']) % 10}" for r in runs]
    ax.bar(range(len(runs)), accs, color=colors)
    ax.set_xticks(range(len(runs)), names, rotation=75, ha="right", fontsize=7)
    ax.set(ylabel="final eval exact accuracy", ylim=(0, 1))
    for b in groups.get(_BASELINE.value, [])[:1]:
        if b["eval"]:
            ax.axhline(b["eval"]["eval/exact_accuracy"], color="k", ls="--", lw=1, label="baseline")
            ax.legend()
    save(fig, "groups.png")

    # T x n heat map
    grids = t_n_grids(groups)
    for name, grid in grids.items():
        Ts, ns, acc = grid
        fig, ax = plt.subplots(figsize=(4.5, 3.8))
        im = ax.imshow(acc, origin="lower", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(ns)), ns)
        ax.set_yticks(range(len(Ts)), Ts)
        ax.set(xlabel="n (L_cycles)", ylabel="T (H_cycles)", title=f"{name}: exact accuracy")
        for i in range(len(Ts)):
            for j in range(len(ns)):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.3f}", ha="center", va="center", color="w")
        fig.colorbar(im)
        save(fig, "heatmap_T_n.png" if len(grids) == 1 else f"heatmap_T_n_{name}.png")

    # accuracy after each supervision step
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        acc = per_step_accuracy(r)
        if acc:
            trained = r["cfg"].N_sup
            ax.plot(range(1, len(acc) + 1), acc, "-", lw=1, label=r["name"])
            if trained <= len(acc):
                ax.plot([trained], [acc[trained - 1]], "k|", ms=8)
    ax.set(xlabel="supervision steps at evaluation", ylabel="exact accuracy", ylim=(0, 1))
    ax.set_title("| marks each run's trained N_sup", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    save(fig, "per_step.png")

    # test-time compute: accuracy against forward FLOPs per puzzle, a line per K over steps
    grids = [(r, p) for r in runs if (p := test_time_points(r))]
    if grids:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (r, points) in enumerate(grids):
            for j, K in enumerate(sorted({p[1] for p in points})):
                line = [p for p in points if p[1] == K]
                style = dict(color=f"C{j % 10}", marker="os^v"[i % 4])
                ax.plot(
                    [p[5] for p in line],
                    [p[2] for p in line],
                    "-",
                    **style,
                    label=f"{r['name']}: K={K}",
                )
                if K > 1:
                    ax.plot([p[5] for p in line], [p[4] for p in line], ":", **style)
            for S, K, exact, *_, flops in points:
                if K == 1:
                    ax.annotate(f"{S} steps", (flops, exact), fontsize=6)
        ax.set(xscale="log", xlabel="forward FLOPs per puzzle", ylabel="exact accuracy")
        ax.set_title("Q-head's choice (solid), any trajectory right (dotted)", fontsize=8)
        ax.legend(fontsize=6)
        save(fig, "test_time.png")

    # compute-accuracy frontier
    points = frontier_points(runs)
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            mine = [p for p in points if p[2] is r and p[3].endswith("steps")]
            if mine:
                ax.plot([p[0] for p in mine], [p[1] for p in mine], ".-", lw=0.8, label=r["name"])
        halts = [p for p in points if p[3].startswith("halting")]
        ax.plot([p[0] for p in halts], [p[1] for p in halts], "k*", ms=7, label="halting by Q")
        front = pareto(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], "k-", lw=2, alpha=0.4, label="front")
        ax.set(
            xscale="log",
            xlabel="forward FLOPs per solved puzzle",
            ylabel="exact accuracy",
            ylim=(0, 1),
        )
        ax.legend(fontsize=6, ncol=2)
        save(fig, "frontier.png")

    # power laws
    for name, var, xs, errors, (a, b, r2) in scaling_fits(groups, groups.get(_BASELINE.value, [])):
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.loglog(xs, errors, "o", label="runs")
        grid = np.geomspace(min(xs), max(xs), 50)
        ax.loglog(grid, a * grid ** (-b), "-", label=f"{a:.3g} x^-{b:.3f} (R^2 {r2:.2f})")
        ax.set(xlabel=SCALING[var], ylabel="1 - exact accuracy", title=name)
        ax.legend(fontsize=8)
        save(fig, f"scaling_{name}.png")
    arc_runs = [r for r in runs if arc_evals(r)]
    if arc_runs:
        save(arc_plot(arc_runs, plt), "arc.png")
    return written


def arc_evals(run):
    """A run's evaluations that scored ARC (eval/ARC/pass@K), in step order."""
    return [m for m in run["metrics"] if "eval/ARC/pass@1" in m]


def pass_at(m):
    """{K: pass@K} of one ARC evaluation."""
    keys = [k for k in m if k.startswith("eval/ARC/pass@")]
    return {
        int(k.rsplit("@", 1)[1]): m[k] for k in sorted(keys, key=lambda k: int(k.split("@")[1]))
    }


def arc_plot(runs, plt):
    """pass@K against K at each run's last evaluation, and pass@2 (the ARC-AGI score)
    against step."""
    fig, (by_k, by_step) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        evals = arc_evals(r)
        last = pass_at(evals[-1])
        by_k.plot(list(last), list(last.values()), "o-", label=r["name"])
        by_step.plot([m["step"] for m in evals], [m["eval/ARC/pass@2"] for m in evals], "o-")
    by_k.set(xscale="log", xlabel="K (answers submitted per test input)", ylabel="pass@K")
    by_k.set_title("ARC pass@K, last evaluation")
    by_step.set(xlabel="step", ylabel="pass@2", title="ARC pass@2 (the ARC-AGI score)")
    by_k.legend(fontsize=7)
    return fig


def arc_md(runs):
    """The ARC table: pass@K at each ARC run's last evaluation."""
    rows = []
    for r in runs:
        evals = arc_evals(r)
        if evals:
            scores = pass_at(evals[-1])
            rows.append([r["name"], evals[-1]["step"], *(fmt(v) for v in scores.values())])
            header = ["run", "step", *(f"pass@{k}" for k in scores)]
    return ["\n## ARC: pass@K (votes across augmentations)\n", table(header, rows)] if rows else []


def t_n_grids(groups):
    """{group: (Ts, ns, accuracy[T, n])} for groups that sweep both H_cycles and L_cycles."""
    grids = {}
    for name, members in groups.items():
        if not {"H_cycles", "L_cycles"} <= set(varying(members)):
            continue
        Ts = sorted({r["cfg"].T for r in members})
        ns = sorted({r["cfg"].n for r in members})
        acc = np.full((len(Ts), len(ns)), np.nan)
        for r in members:
            if r["eval"]:
                acc[Ts.index(r["cfg"].T), ns.index(r["cfg"].n)] = r["eval"]["eval/exact_accuracy"]
        for r in groups.get(_BASELINE.value, []):  # the cell a sweep leaves to E1.1 (# skip:)
            T, n = r["cfg"].T, r["cfg"].n
            if r["eval"] and T in Ts and n in ns and np.isnan(acc[Ts.index(T), ns.index(n)]):
                acc[Ts.index(T), ns.index(n)] = r["eval"]["eval/exact_accuracy"]
        grids[name] = (Ts, ns, acc)
    return grids


# ----------------------------------------------------------------------------- RESULTS.md


def fmt(x, digits=4):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_md(runs, groups, images):
    md = [f"# {_TITLE.value}\n"]
    if _NOTES.value:
        with open(_NOTES.value) as f:
            md.append(f.read().rstrip() + "\n")
    md.append(
        f"Written by `python report.py {' '.join(sys.argv[1:])}` from {len(runs)} runs; "
        "the definitions of every number are in report.py's docstring.\n"
    )

    md.append("## Every run\n")
    rows = []
    for r in runs:
        ev = r["eval"] or {}
        steps = max((m["step"] for m in r["metrics"]), default=0)
        halted = ev.get("eval/halted_exact_accuracy")
        rows.append(
            [
                r["name"],
                f"{r['params']:,}",
                f"T={r['cfg'].T} n={r['cfg'].n} D={r['cfg'].D} "
                + ("MLP" if r["cfg"].mlp_t else "attention"),
                steps,
                "yes" if r["done"] else "no",
                fmt(ev.get(f"eval/exact_accuracy_step{r['cfg'].N_sup}")),
                f"{fmt(ev.get('eval/exact_accuracy'))} ({len(per_step_accuracy(r))})",
                fmt(ev.get("eval/accuracy")),
                f"{fmt(halted)} at {fmt(ev.get('eval/halted_steps'), 2)}"
                if halted is not None
                else "",
            ]
        )
    md.append(
        table(
            [
                "run",
                "params",
                "model",
                "steps",
                "finished",
                "exact after N_sup (trained)",
                "exact after all eval steps (how many)",
                "token, after all eval steps",
                "halting by Q: exact at mean steps",
            ],
            rows,
        )
    )
    extra = [
        [
            r["name"],
            prefix,
            fmt(m[f"{prefix}/exact_accuracy"]),
            fmt(r["eval"]["eval/exact_accuracy"]),
        ]
        for r in runs
        for prefix, m in r["extra_evals"].items()
        if m and r["eval"]
    ]
    if extra:
        md.append("Averaged weights (running mean `eval_swa`, mean of checkpoints `eval_avg`):\n")
        md.append(table(["run", "weights", "exact", "EMA/raw exact"], extra))

    baseline = [r for r in groups.get(_BASELINE.value, []) if r["eval"]]
    if baseline:
        b = baseline[0]["eval"]["eval/exact_accuracy"]
        md.append(f"\n## Each group beside the baseline ({_BASELINE.value}: {b:.4f})\n")
        for name, members in groups.items():
            if name == _BASELINE.value:
                continue
            names = varying(members)
            rows = [
                [
                    label(r, names) if names else r["name"],
                    fmt(r["eval"]["eval/exact_accuracy"]),
                    f"{r['eval']['eval/exact_accuracy'] - b:+.4f}",
                ]
                for r in members
                if r["eval"]
            ]
            md.append(f"**{name}**\n\n" + table(["run", "exact", "vs baseline"], rows))

    for name, (Ts, ns, acc) in t_n_grids(groups).items():
        md.append(f"\n## T x n ({name}): eval exact accuracy\n")
        rows = [[f"T={T}"] + [fmt(acc[i, j]) for j in range(len(ns))] for i, T in enumerate(Ts)]
        md.append(table(["", *(f"n={n}" for n in ns)], rows))

    per_step = [(r, a) for r in runs if (a := per_step_accuracy(r))]
    if per_step:
        K = max(len(a) for _, a in per_step)
        md.append("\n## Exact accuracy after each supervision step at evaluation\n")
        md.append(
            "Trained with N_sup steps (column N); evaluated with more where the run says so.\n\n"
        )
        rows = [
            [r["name"], r["cfg"].N_sup] + [fmt(a[k], 3) if k < len(a) else "" for k in range(K)]
            for r, a in per_step
        ]
        md.append(table(["run", "N", *(str(k + 1) for k in range(K))], rows))

    grids = [(r, p) for r in runs if (p := test_time_points(r))]
    if grids:
        md.append("\n## Test-time compute: supervision steps x trajectories\n")
        md.append(
            "Exact accuracy of the answer the Q head picks among K trajectories (trajectory 0 "
            "without noise), of the majority answer, and of any trajectory being right.\n\n"
        )
        rows = [
            [
                r["name"],
                S,
                K,
                fmt(exact),
                fmt(vote) if K > 1 else "",
                fmt(oracle) if K > 1 else "",
                f"{flops / 1e9:.3g}",
            ]
            for r, points in grids
            for S, K, exact, vote, oracle, flops in points
        ]
        header = ["run", "steps", "K", "exact (Q choice)", "vote", "any right", "GFLOP/puzzle"]
        md.append(table(header, rows))

    front = pareto(frontier_points(runs))
    if front:
        md.append("\n## The compute-accuracy front\n")
        md.append("Points no other run or step count beats in both FLOPs and accuracy:\n\n")
        rows = []  # consecutive step counts of one run on the front: one row
        for p in front:
            last = rows[-1] if rows else None
            if (
                last
                and last[0] is p[2]
                and last[1][-1][3].endswith(" steps")
                and p[3].endswith(" steps")
            ):
                last[1].append(p)
            else:
                rows.append((p[2], [p]))
        md.append(
            table(
                ["run", "evaluated for", "forward FLOPs per solved puzzle", "exact"],
                [
                    [
                        run["name"],
                        ps[0][3] if len(ps) == 1 else f"{ps[0][3].split()[0]}..{ps[-1][3]}",
                        " .. ".join(dict.fromkeys(f"{p[0]:.3g}" for p in (ps[0], ps[-1]))),
                        " .. ".join(dict.fromkeys(fmt(p[1]) for p in (ps[0], ps[-1]))),
                    ]
                    for run, ps in rows
                ],
            )
        )

    fits = scaling_fits(groups, baseline)
    if fits:
        md.append("\n## Power-law fits: 1 - exact accuracy = a x^-b\n")
        rows = [
            [name, SCALING[var], len(xs), f"{a:.3g}", f"{b:.3f}", f"{r2:.2f}"]
            for name, var, xs, _, (a, b, r2) in fits
        ]
        md.append(table(["group", "x", "runs", "a", "b (exponent)", "R^2"], rows))

    md.extend(arc_md(runs))
    md.append("\n## Plots\n")
    md.extend(f"![{name}]({name})\n" for name in images)

    md.append("\n## Where the runs ran\n")
    seen = {}
    for r in runs:
        env = r["env"]
        key = json.dumps({k: env.get(k) for k in ("commit", "versions", "platform", "host_cpu")})
        seen.setdefault(key, []).append(r["name"])
    rows = []
    for key, names in seen.items():
        env = json.loads(key)
        versions = ", ".join(f"{k} {v}" for k, v in (env["versions"] or {}).items())
        rows.append([env["commit"], versions, f"{env['platform']} ({env['host_cpu']})", len(names)])
    md.append(table(["commit", "versions", "device (host CPU)", "runs"], rows))
    return "\n".join(md)


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("usage: python report.py RUN_DIR... [--out=DIR]; see --help")
    try:
        runs = find_runs(argv[1:])
    except (ValueError, OSError) as e:
        raise SystemExit(f"report.py: error: {e}") from e
    groups = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r)
    if _BASELINE.value in groups:  # the baseline first
        groups = {_BASELINE.value: groups.pop(_BASELINE.value)} | groups
        runs = [r for g in groups.values() for r in g]
    os.makedirs(_OUT.value, exist_ok=True)
    images = plots(runs, groups, _OUT.value)
    with open(os.path.join(_OUT.value, "RESULTS.md"), "w") as f:
        f.write(results_md(runs, groups, images))
    print(
        f"{len(runs)} runs in {len(groups)} groups -> {_OUT.value}/RESULTS.md, {len(images)} plots"
    )


if __name__ == "__main__":
    app.run(main)
