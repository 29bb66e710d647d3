"""README.md and docs/*.md against the code. Every command of their bash blocks is either
run here (the ones that take seconds) and checked against the output the docs show, or
skipped for a stated reason; the counts they give for run_all.sh's dry runs are what it
prints; the files, links and flagfiles they name exist; and every --flag they mention is one
that train.py, bench.py, data.py, report.py or run_all.sh defines."""

import functools
import os
import re
import subprocess
import sys

import pytest
from absl import flags

import bench
import train
from helpers import NAN_RUN, ROOT, phases

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\S*)\s*$")

# Commands of the docs not run here, by how they start (the first match counts), and why.
SKIPPED = [
    ("pip install ", "installs packages from the network"),
    ("export PROJECT=", "the Google Cloud settings of the gcloud commands after it"),
    ("gcloud ", "Google Cloud: not reachable here"),
    ("tensorboard ", "a server that runs until it is stopped"),
    ("JAX_PLATFORMS=cpu python -m pytest", "the test suite itself"),
    ("python data.py sudoku --download ", "downloads Sudoku-Extreme from the Hugging Face hub"),
    ("ls /tmp/builtin ", "run by test_setup_guide_builds_the_builtin_data_it_shows"),
    ("./run_all.sh --tpu=", "starts the runs on a TPU slice through gcloud"),
    ("./run_all.sh --smoke all ", "minutes: test_roadmap.py's smoke test runs it"),
    ("./run_all.sh --aot=", "compiles every point of the roadmap for a TPU slice: hours"),
    ("./run_all.sh --mini ", "the mini-study, about 70 minutes (its run count: see below)"),
    ("./run_all.sh phase2", "trains phase 2 at paper size"),
    (
        "./run_all.sh tasks",
        "trains Maze-Hard and ARC at paper size (tests/test_roadmap.py dry-runs it)",
    ),
    ("./run_all.sh sudoku_cpu ", "trains the default job"),
    ("python report.py runs", "needs the run directories of trained runs"),
    ("for s in 1 2; do python train.py ", "trains the mini-study's seeds"),
    ("python train.py --flagfile=runs/", "needs a trained run in runs/sudoku_cpu"),
    ("python train.py --flagfile=configs/sudoku_mlp.flags --init_from=PATH", "a checkpoint"),
    (
        "python train.py --flagfile=configs/sudoku_cpu.flags --coordinator_address=",
        "a fixed port, maybe taken: test_distributed.py's "
        "test_unreachable_coordinator_fails_within_the_timeout runs it on a free one",
    ),
    (
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 ",
        "builds the default job's 5000 puzzles before the check (20 s and more): "
        "test_train.py's test_user_mistakes_are_reported_without_a_traceback checks the message",
    ),
    (
        "python train.py --builtin_train=20 ",
        "test_train.py's test_nan_loss_stops_the_run_with_the_step runs these flags "
        "(test_the_nan_run_of_the_docs_is_the_tested_one)",
    ),
    ("JAX_LOG_COMPILES=1 python train.py ", "trains the default job for a minute"),
    ("python train.py --flagfile=configs/", "trains at the flagfile's size: minutes to days"),
    ("timeout -s TERM 25 python train.py ", "trains the default job for 25 s and more"),
    ("tail -n 1 /tmp/guide_run/", "reads the run the command before it makes"),
    ("python bench.py ", "compiles and times (or, --aot, compiles for TPU) a large model"),
]
# Commands run here as the docs write them (a dry run with --runs= an empty folder), and by
# which test.
RUN = {
    "./run_all.sh --dry_run all": "test_run_all_dry_runs_of_the_docs",
    "./run_all.sh --dry_run --tpu=$TPU --zone=$ZONE --runs=gs://$BUCKET/runs "
    "--data=gs://$BUCKET/data phase1": "test_setup_guide_tpu_dry_run_prints_what_it_shows",
    "python data.py builtin --out=/tmp/builtin --num_train=100 --num_test=10 --num_aug=2": (
        "test_setup_guide_builds_the_builtin_data_it_shows"
    ),
}
TPU_DRY_RUN = next(c for c in RUN if "--tpu=$TPU" in c)
# --names the docs mention that are not ours, and whose they are.
NOT_OURS = {
    "worker": "gcloud",
    "command": "gcloud",
    "accelerator-type": "gcloud",
    "version": "gcloud",
    "spot": "gcloud",
    "location": "gcloud",
    "logdir": "tensorboard",
    "a": "a placeholder (docs/ROADMAP.md's `# sweep: --a=1,2 --b=x,y`)",
    "b": "a placeholder",
    "X": "a placeholder (docs/DESIGN.md's `--X=v`)",
}
# Files the README names that a run (or report.py) writes, not the repository.
WRITTEN = {"ckpt/", "data/", "done.json", "env_STEP.json", "flags.txt", "metrics.jsonl"}
WRITTEN |= {"config.json", "RESULTS.md", "submission.json"}


def fenced(path):
    """Every fenced block of a Markdown file: (doc, line, language, text, the text of the
    unlabelled block right after it, if any: the output the docs show)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, j = len(opening.group(1)), i + 1
        while not (FENCE.match(lines[j]) and not FENCE.match(lines[j]).group(2)):
            j += 1
        text = "\n".join(line[indent:] for line in lines[i + 1 : j])
        blocks.append([path.name, i + 1, opening.group(2), text, None, j])
        i = j + 1
    for block, after in zip(blocks, blocks[1:], strict=False):
        between = lines[block[5] + 1 : after[1] - 1]
        if after[2] == "" and not "".join(between).strip():
            block[4] = after[3]
    return [block[:5] for block in blocks]


@functools.cache
def commands():
    """(where, command, output shown after its block) of every bash block of the docs:
    continued lines joined, comments dropped, spaces collapsed."""
    found = []
    for doc in DOCS:
        for name, line, language, text, output in fenced(doc):
            if language != "bash":
                continue
            for source in re.sub(r"\\\n\s*", " ", text).splitlines():
                command = " ".join(re.sub(r"(^|\s)#.*$", "", source).split())
                if command:
                    found.append((f"{name}:{line}", command, output))
    return found


def shown(command):
    """The output the docs show after the block of `command`."""
    return next(output for _, c, output in commands() if c == command)


def sh(command, tmp_path, **env):
    """`command` in bash at the repository's root; run_all.sh's python is this one."""
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path), **env)
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, check=False, cwd=ROOT, env=env
    )


def test_every_command_of_the_docs_is_run_or_skipped_with_a_reason():
    """A command added to the docs fails here until it is run by a test of this module or
    skipped with its reason; a rule that no longer matches any command fails too."""
    unclassified = [
        f"{where}: {c}"
        for where, c, _ in commands()
        if c not in RUN and not any(c.startswith(prefix) for prefix, _ in SKIPPED)
    ]
    assert not unclassified, "run these in tests/test_docs.py or say why not:\n" + "\n".join(
        unclassified
    )
    used = {c for _, c, _ in commands()}
    assert set(RUN) <= used, set(RUN) - used
    unused = [p for p, _ in SKIPPED if not any(c.startswith(p) for c in used)]
    assert not unused, unused


def test_run_all_dry_runs_of_the_docs(tmp_path):
    """docs/ROADMAP.md's dry run prints a command for every experiment of the phases (into
    an empty folder of runs: a finished run would be a skip line)."""
    out = sh(f"./run_all.sh --dry_run all --runs={tmp_path}", tmp_path)
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    named = {line.split(f"--workdir={tmp_path}/")[1].split("/")[0].split()[0] for line in commands}
    assert named == {e for phase in phases().values() for e in phase}


def tpu_dry_run(tmp_path):
    """SETUP_GUIDE.md's run_all.sh --dry_run --tpu=... with the values of its `export` line."""
    export = next(c for _, c, _ in commands() if c.startswith("export PROJECT="))
    values = dict(pair.split("=", 1) for pair in export.split()[1:])
    out = sh(TPU_DRY_RUN, tmp_path, **values)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_setup_guide_tpu_dry_run_prints_what_it_shows(tmp_path):
    """The commands as shown, up to where the docs cut them ("..."), the folder of the
    archive aside; of the archive's file list, every file the docs show is in it."""

    def plain(line):
        return re.sub(r"[^\s:]*tmp\.\w+", "TMPDIR", line)

    printed = [plain(x) for x in tpu_dry_run(tmp_path).splitlines() if x.startswith("+ ")]
    expected = [plain(x) for x in shown(TPU_DRY_RUN).splitlines() if x.startswith("+ ")]
    assert len(printed) >= len(expected) > 2
    for got, want in zip(printed, expected, strict=False):
        head = want.removesuffix("...")
        if want.startswith("+ tar czf "):  # the tracked files: the docs show the first ones
            assert set(head.split()[:-1]) <= set(got.split()), (got, want)
        else:
            assert got.startswith(head) if want.endswith("...") else got == want, (got, want)


def test_setup_guide_builds_the_builtin_data_it_shows(tmp_path):
    """data.py builtin, then the `ls` the guide shows, into a folder of this test."""
    build = next(c for c in RUN if c.startswith("python data.py builtin"))
    listing = next(c for _, c, _ in commands() if c.startswith("ls /tmp/builtin "))
    script = f"{build}\n{listing}".replace("python ", f"{sys.executable} ")
    out = sh(script.replace("/tmp/builtin", str(tmp_path / "builtin")), tmp_path)
    assert out.returncode == 0, out.stderr
    folders = [part.splitlines()[1:] for part in out.stdout.strip().split("\n\n")]
    assert [sorted(f) for f in folders] == [
        sorted(line.split()) for line in shown(listing).splitlines()
    ]


COUNTS = [
    pytest.param(
        "ROADMAP.md",
        r"--dry_run all +# print the (\d+) commands",
        "./run_all.sh --dry_run all --runs={tmp_path}",
        id="roadmap-dry-run-all",
    ),
    pytest.param(
        "ROADMAP.md",
        r"--mini phase2 sudoku_mlp +# (\d+) runs",
        "./run_all.sh --dry_run --mini phase2 sudoku_mlp --runs={tmp_path}",
        id="mini-study",
    ),
    pytest.param(
        "SETUP_GUIDE.md",
        r"\((\d+) commands in all",
        TPU_DRY_RUN,
        id="setup-guide-tpu",
    ),
]


@pytest.mark.parametrize("doc, claim, command", COUNTS)
def test_counts_the_docs_give_are_what_run_all_prints(doc, claim, command, tmp_path):
    stated = int(re.search(claim, (ROOT / "docs" / doc).read_text()).group(1))
    if command == TPU_DRY_RUN:
        printed = tpu_dry_run(tmp_path)
    else:
        out = sh(command.format(tmp_path=tmp_path), tmp_path)
        assert out.returncode == 0, out.stderr
        printed = out.stdout
    assert sum(line.startswith("+ ") for line in printed.splitlines()) == stated


def test_the_nan_run_of_the_docs_is_the_tested_one():
    """docs/TROUBLESHOOTING.md's NaN run is test_train.py's (helpers.NAN_RUN), flag for flag."""
    command = next(c for _, c, _ in commands() if c.startswith("python train.py --builtin_train"))
    given = dict(flag.removeprefix("--").split("=", 1) for flag in command.split()[2:])
    assert given == {k: str(v) for k, v in NAN_RUN.items()}


def help_flags(script, text):
    """The flags that absl's --help output lists for the module of `script`."""
    section = text.split(f"\n{script}:\n")[1]
    section = re.split(r"\n\S", section)[0]  # up to the next module's heading
    return set(re.findall(r"^ +--(?:\[no\])?(\w+):", section, re.M))


@functools.cache
def script_help(script):
    out = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, check=False, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    return out.stdout + out.stderr


def test_data_py_help_lists_its_flags_and_datasets():
    """The README's `python data.py --help`: data.py defines its flags when run, so this is
    where they are listed (train.py's are absl's FLAGS of the imported module)."""
    text = script_help("data.py")
    assert {"out", "num_aug", "csv_dir", "download"} <= help_flags("data.py", text), text
    assert "python data.py sudoku " in text and "python data.py builtin " in text


def our_flags():
    """Every flag of train.py, bench.py, data.py and report.py, absl's own, and run_all.sh's
    options."""
    import report  # noqa: PLC0415

    names = help_flags("data.py", script_help("data.py"))
    for module in (train, bench, report):
        names |= {f.name for f in flags.FLAGS.get_flags_for_module(module)}
    names |= {"flagfile", "help", "helpfull", "helpshort", "undefok"}  # absl's own
    run_all = (ROOT / "run_all.sh").read_text()
    return names | set(re.findall(r"^ +--(\w+)(?:=\*)?\)", run_all, re.M))


def test_every_flag_the_docs_mention_is_defined():
    known = our_flags()
    unknown = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for found in re.findall(r"(?<![\w/.-])--(?:\[no\])?([A-Za-z][\w-]*)", line):
                name = found.rstrip("-")
                if name in known or name in NOT_OURS or name.startswith("xla_"):
                    continue
                if name.startswith("no") and name[2:] in known:  # absl's --noflag
                    continue
                unknown.append(f"{doc.name}:{number}: --{name}")
    assert not unknown, "\n".join(unknown)


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_file_link_and_flagfile_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                missing.append(f"{doc.name}: link {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                if anchor not in {slug(h) for h in headings}:
                    missing.append(f"{doc.name}: link {target}: no such heading")
        for name in re.findall(r"configs/(\w+)\.flags", text):
            if not name.isupper() and not (ROOT / "configs" / f"{name}.flags").exists():
                missing.append(f"{doc.name}: configs/{name}.flags")
    readme = re.sub(r"^ *```.*?^ *```", "", DOCS[0].read_text(), flags=re.S | re.M)
    for token in re.findall(r"`([\w./-]+)`", readme):
        is_path = token.endswith("/") or re.search(r"\.(py|sh|md|flags|txt|json|cff)$", token)
        if is_path and token not in WRITTEN and not (ROOT / token).exists():
            missing.append(f"README.md: `{token}`")
    assert not missing, "\n".join(missing)


def test_the_roadmap_tables_list_the_phases_of_run_all():
    """README's roadmap table names each experiment of run_all.sh's phases, and
    docs/ROADMAP.md's table each with its phase; the README's list of configs/ exists."""
    experiments = {e: int(p.removeprefix("phase")) for p, names in phases().items() for e in names}
    readme = DOCS[0].read_text()
    assert set(re.findall(r"^\| E\d\.\d \|.*\| `(\w+)` \|$", readme, re.M)) == set(experiments)
    roadmap = (ROOT / "docs" / "ROADMAP.md").read_text()
    rows = re.findall(r"^\| (\d) \| E\d\.\d [^|]*\| `(\w+)` \|", roadmap, re.M)
    assert {name: int(phase) for phase, name in rows} == experiments
    configs = next(line for line in readme.splitlines() if line.startswith("- `configs/`"))
    for name in re.findall(r"`(\w+)`", configs):
        assert (ROOT / "configs" / f"{name}.flags").exists(), name
