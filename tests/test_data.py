"""data.py: valid puzzles, faithful augmentations, strict CSV reading, reproducible batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
from helpers import ROOT

GIVENS = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def grid(text):
    return np.array([0 if c in ".0" else int(c) for c in text], np.uint8)


def write_csv(path, rows, header="source,question,answer,rating"):
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return str(path)


def test_solver_finds_the_unique_solution_and_detects_ambiguity():
    assert data.solve(grid(GIVENS)) == [list(grid(SOLUTION))]
    ambiguous = grid(GIVENS)
    ambiguous[:9] = 0  # the first row blank: still solvable, no longer unique
    assert len(data.solve(ambiguous)) == 2
    clash = grid(GIVENS)
    clash[2] = 5  # two 5s in row 1
    assert data.solve(clash) == []


def test_generated_puzzles_are_unique_consistent_and_within_the_blank_range():
    questions, answers = data.generate(60, 40, 50, seed=3)
    blanks = (questions == 0).sum(1)
    assert blanks.min() >= 40 and blanks.max() <= 50
    assert data._valid_grids(answers).all()
    for q, a in zip(questions, answers, strict=True):
        assert ((q == 0) | (q == a)).all()
        assert data.solve(q) == [list(a)]  # exactly one solution, and it is the answer
    again = data.generate(60, 40, 50, seed=3)
    assert (again[0] == questions).all()  # seeded


def test_augmentations_keep_puzzles_valid_and_consistent():
    rng = np.random.default_rng(0)
    q, a = data.augment(grid(GIVENS), grid(SOLUTION), 200, rng)
    assert data._valid_grids(a).all()
    assert ((q == 0) | (q == a)).all()
    assert ((q == 0).sum(1) == (grid(GIVENS) == 0).sum()).all()  # blanks stay blanks
    assert len({bytes(x) for x in q}) == 200
    for k in range(5):
        assert data.solve(q[k]) == [list(a[k])]


@pytest.mark.parametrize(
    "row,message",
    [
        (["x", GIVENS, SOLUTION], r"t.csv:2: 3 columns, expected 4"),
        (["x", GIVENS[:80] + "a", SOLUTION, "0"], r"t.csv:2: question has 'a' at cell 80"),
        (["x", GIVENS, SOLUTION[:-1], "0"], r"t.csv:2: answer has 80 characters"),
        (
            ["x", "1" + GIVENS[1:], SOLUTION, "0"],
            r"t.csv:2: question and answer disagree at cell 0 "
            r"\(row 1, column 1\): given 1, answer 5",
        ),
        (["x", "." * 81, SOLUTION[1:] + "5", "0"], r"t.csv:2: answer is not a valid Sudoku: row 1"),
    ],
)
def test_csv_reader_rejects_bad_rows_naming_file_line_and_value(tmp_path, row, message):
    path = write_csv(tmp_path / "t.csv", [row])
    with pytest.raises(ValueError, match=message):
        data.read_csv(path)


def test_csv_reader_header_blanks_and_rating(tmp_path):
    with pytest.raises(ValueError, match="header"):
        data.read_csv(write_csv(tmp_path / "h.csv", [], header="q,a"))
    path = write_csv(
        tmp_path / "ok.csv",
        [["a", GIVENS, SOLUTION], ["b", GIVENS.replace(".", "0"), SOLUTION]],
        header="source,question,answer",
    )
    q, a = data.read_csv(path)
    assert (q[0] == q[1]).all() and (q[0] == grid(GIVENS)).all() and (a == grid(SOLUTION)).all()
    rated = write_csv(
        tmp_path / "r.csv", [["a", GIVENS, SOLUTION, "3"], ["b", GIVENS, SOLUTION, "9"]]
    )
    assert len(data.read_csv(rated, min_rating=5)[0]) == 1


def test_build_sudoku_writes_the_reference_layout(tmp_path):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    rng = np.random.default_rng(0)
    q, a = data.augment(grid(GIVENS), grid(SOLUTION), 30, rng)
    rows = [
        ["s", "".join(map(str, x)).replace("0", "."), "".join(map(str, y)), "0"]
        for x, y in zip(q, a, strict=True)
    ]
    write_csv(csv_dir / "train.csv", rows[:20])
    write_csv(csv_dir / "test.csv", rows[20:])
    out = tmp_path / "ds"
    data.build_sudoku(str(csv_dir), str(out), subsample=5, num_aug=3, seed=1)
    meta = json.loads((out / "train" / "dataset.json").read_text())
    assert meta["vocab_size"] == 11 and meta["seq_len"] == 81 and meta["total_groups"] == 5
    train = data.load([str(out)], "train")
    assert train["inputs"].shape == (20, 81) and train["group_indices"].tolist() == [
        0,
        4,
        8,
        12,
        16,
        20,
    ]
    assert train["inputs"].min() == 1 and train["labels"].min() == 2  # blank 1, digits 2..10
    assert data._valid_grids(np.asarray(train["labels"]) - 1).all()
    test = data.load([str(out)], "test")
    assert len(test["inputs"]) == 10
    again = tmp_path / "ds2"
    data.build_sudoku(str(csv_dir), str(again), subsample=5, num_aug=3, seed=1)
    assert (data.load([str(again)], "train")["inputs"] == train["inputs"]).all()  # seeded
    merged = data.load([str(out), str(again)], "train")
    assert merged["group_indices"][-1] == 40 and merged["meta"]["num_puzzle_identifiers"] == 2
    assert merged["puzzle_identifiers"][20:].min() == 1  # ids of the second set are offset


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    path = tmp_path_factory.mktemp("builtin")
    return data.build_builtin(
        str(path), num_train=40, num_test=15, min_blanks=40, max_blanks=45, num_aug=3, seed=0
    )


def test_builtin_test_set_is_held_out(builtin):
    train, test = data.load([builtin], "train"), data.load([builtin], "test")
    seen = {bytes(x) for x in np.asarray(train["inputs"])}
    assert not any(bytes(x) in seen for x in np.asarray(test["inputs"]))
    assert ((np.asarray(test["inputs"]) == 1).sum(1) >= 40).all()


def test_sampler_epochs_are_permutations_of_groups_and_resume_exactly(builtin):
    ds = data.load([builtin], "train")
    sample = data.train_sampler(ds, batch_size=8, seed=5)
    batches, cursor = [], 0
    for _ in range(10):  # 80 draws = 2 epochs of 40 groups
        batch, cursor = sample(cursor)
        batches.append(batch)
    groups = [
        np.searchsorted(ds["group_indices"], _example_of(ds, b), side="right") - 1 for b in batches
    ]
    first, second = np.concatenate(groups[:5]), np.concatenate(groups[5:])
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert (first != second).any()
    resumed, _ = data.train_sampler(ds, 8, seed=5)(56)  # a fresh sampler at batch 7's cursor
    for k in resumed:
        assert (resumed[k] == batches[7][k]).all()
    other, _ = data.train_sampler(ds, 8, seed=6)(0)
    assert (other["inputs"] != batches[0]["inputs"]).any()


def _example_of(ds, batch):
    inputs = np.asarray(ds["inputs"])
    return np.array([np.flatnonzero((inputs == row).all(1))[0] for row in batch["inputs"]])


def test_eval_batches_walk_the_test_set_and_pad_the_last(builtin):
    test = data.load([builtin], "test")
    batches = list(data.eval_batches(test, 4))
    n = len(test["inputs"])
    assert len(batches) == -(-n // 4)
    flat = np.concatenate([b["inputs"] for b in batches])
    assert (flat[:n] == test["inputs"]).all() and (flat[n:] == data.PAD).all()
    labels = np.concatenate([b["labels"] for b in batches])
    assert (labels[n:] == data.IGNORE_LABEL).all()
    assert sum(len(b["inputs"]) for b in data.eval_batches(test, 4, max_examples=5)) == 8


def test_command_line_download_and_errors(tmp_path):
    """`python data.py sudoku --download` through a stand-in huggingface_hub (no network
    here) that serves two small CSVs, and a bad CSV reported in one line."""
    rng = np.random.default_rng(0)
    q, a = data.augment(grid(GIVENS), grid(SOLUTION), 6, rng)
    rows = [
        ["s", "".join(map(str, x)).replace("0", "."), "".join(map(str, y)), "0"]
        for x, y in zip(q, a, strict=True)
    ]
    hub = tmp_path / "hub"
    hub.mkdir()
    write_csv(hub / "train.csv", rows[:4])
    write_csv(hub / "test.csv", rows[4:])
    fake = tmp_path / "fake" / "huggingface_hub"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import shutil\n"
        "def hf_hub_download(repo, name, repo_type, local_dir):\n"
        f"    assert repo == 'sapientinc/sudoku-extreme' and repo_type == 'dataset'\n"
        f"    return shutil.copy({str(hub)!r} + '/' + name, local_dir)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    out = subprocess.run(
        [
            sys.executable,
            "data.py",
            "sudoku",
            "--download",
            f"--out={tmp_path / 'ds'}",
            "--num_aug=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(data.load([str(tmp_path / "ds")], "train")["inputs"]) == 12
    write_csv(hub / "train.csv", [["s", GIVENS, SOLUTION[:-1] + "x", "0"]])
    out = subprocess.run(
        [sys.executable, "data.py", "sudoku", f"--csv_dir={hub}", f"--out={tmp_path / 'bad'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "train.csv:2: answer has 'x' at cell 80" in out.stderr


# ----------------------------------------------------------------------------- Maze-Hard

MAZE = ROOT / "tests" / "testdata" / "maze_tiny"


def shortest_paths(grid, source, target):
    """(length, number of distinct shortest paths) from source to target over open cells."""
    dist, _ = data.maze_distances(grid, source)
    count = {source: 1}
    for cell in sorted(dist, key=dist.get):
        r, c = cell
        for p in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if dist.get(p) == dist[cell] + 1:
                count[p] = count.get(p, 0) + count[cell]
    return dist.get(target), count.get(target, 0)


@pytest.mark.parametrize("size,min_path", [(7, 4), (15, 20), (30, 60)])
def test_generated_mazes_answer_with_the_unique_shortest_path(size, min_path):
    """Every answer is the question with the cells strictly between S and G on a path marked
    'o'; that path is a shortest path, the only one, and at least min_path steps long."""
    questions, answers = data.generate_mazes(20, size, min_path, seed=3)
    assert questions.shape == answers.shape == (20, size * size)
    for q, a in zip(
        questions.reshape(-1, size, size), answers.reshape(-1, size, size), strict=True
    ):
        assert set(np.unique(q).tobytes()) <= set(b"# SG") and set(np.unique(a).tobytes()) <= set(
            b"# SGo"
        )
        (s,), (g,) = map(tuple, np.argwhere(q == ord("S"))), map(tuple, np.argwhere(q == ord("G")))
        path = set(map(tuple, np.argwhere(a == ord("o"))))
        assert ((a == q) | (a == ord("o"))).all() and all(q[p] == ord(" ") for p in path)
        length, count = shortest_paths(q, s, g)
        assert count == 1 and length >= min_path and len(path) == length - 1
        # the marked cells are that path: S, the path cells and G form a chain of neighbours
        open_a = a.copy()
        open_a[a == ord(" ")] = ord("#")  # only the marked path is open
        assert shortest_paths(open_a, s, g)[0] == length
    assert not (questions == data.generate_mazes(20, size, min_path, seed=4)[0]).all()
    assert (questions == data.generate_mazes(20, size, min_path, seed=3)[0]).all()


@pytest.mark.parametrize("aug", [False, True])
def test_build_maze_writes_what_the_official_builder_writes(tmp_path, aug):
    """data.py maze on tests/testdata/maze_tiny's CSVs gives the arrays (values, dtypes),
    dataset.json and identifiers.json that the official dataset/build_maze_dataset.py wrote
    for them (tests/testdata/README.md), with and without the 8 symmetries."""
    golden = np.load(MAZE / "official.npz")
    metas = json.loads((MAZE / "official.json").read_text())
    data.build_maze(str(MAZE), str(tmp_path), aug=aug)
    for split in ("train", "test"):
        for key in ("inputs", "labels", "group_indices", "puzzle_indices", "puzzle_identifiers"):
            ours, theirs = (
                np.load(tmp_path / split / f"all__{key}.npy"),
                golden[f"aug{int(aug)}/{split}/{key}"],
            )
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (split, key)
            assert (ours == theirs).all(), (split, key)
        meta = json.loads((tmp_path / split / "dataset.json").read_text())
        assert meta == metas[f"aug{int(aug)}/{split}"]
    assert (
        json.loads((tmp_path / "identifiers.json").read_text())
        == metas[f"aug{int(aug)}/identifiers"]
    )
    ds = data.load([str(tmp_path)], "train")  # and trmx reads it: 8 puzzles per maze with aug
    assert ds["meta"]["seq_len"] == 81 and ds["meta"]["vocab_size"] == 6
    assert len(ds["inputs"]) == 6 * (8 if aug else 1)


@pytest.mark.parametrize(
    "row,message",
    [
        ("a,####,####", "3: a grid of 4 characters"),  # square, but not the first row's size
        ("a,#####,#####", "a grid of 5 characters, expected a square one"),
        ("a,#x#######,#x#######", r"2: characters \['x'\] outside"),
        ("a,#########", "2 fields"),
    ],
)
def test_maze_csv_reader_rejects_bad_rows_naming_file_and_line(tmp_path, row, message):
    good = "#" * 9
    lines = (
        ["source,question,answer,rating", f"s,{good},{good},0"]
        if "4 char" in message
        else ["source,question,answer,rating"]
    )
    (tmp_path / "train.csv").write_text("\n".join([*lines, row]) + "\n")
    with pytest.raises(ValueError, match=message):
        data.read_maze_csv(str(tmp_path / "train.csv"))


def test_train_py_builtin_mazes(tmp_path):
    """train.py --builtin_task=maze: the built-in data are generated mazes (with the 8
    symmetries when --builtin_aug > 0), cached under --builtin_dir by their settings, and
    the test mazes are held out."""
    import train  # noqa: PLC0415 (its flags; the rest of this module needs no jax)

    o = train.options(
        builtin_task="maze", builtin_maze=["7", "4"], builtin_train=10, builtin_test=6,
        builtin_aug=1, builtin_dir=str(tmp_path), data_paths=[],
    )  # fmt: skip
    train_ds, test_ds = train.load_data(o, is_main=True)
    assert train_ds["meta"]["seq_len"] == 49 and train_ds["meta"]["vocab_size"] == 6
    assert len(train_ds["inputs"]) == 10 * 8 and train_ds["meta"]["total_groups"] == 10
    seen = {bytes(x) for x in np.asarray(train_ds["inputs"])[::8]}  # each maze as drawn
    assert not any(bytes(x) in seen for x in np.asarray(test_ds["inputs"]))
    assert [p.name for p in tmp_path.iterdir()] == ["maze-builtin-10-6-7-4-1-s0"]


# ----------------------------------------------------------------------------- ARC-AGI

ARC = ROOT / "tests" / "testdata" / "arc_tiny"
ARC_KEYS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")


@pytest.mark.parametrize("num_aug", [0, 3])
def test_arc_builder_writes_what_the_official_builder_writes(tmp_path, num_aug):
    """data.py arc on tests/testdata/arc_tiny's made-up puzzles (three subsets, one the test
    set; a 30x30 grid, a 1x1 grid, a puzzle whose augmentations all repeat, test pairs listed
    before the demonstrations) gives the arrays, dataset.json, identifiers.json and
    test_puzzles.json that the official dataset/build_arc_dataset.py wrote for them with seed
    42 (tests/testdata/README.md)."""
    golden = np.load(ARC / "official.npz")
    metas = json.loads((ARC / "official.json").read_text())
    data.build_arc(
        str(ARC / "arc-tiny"), str(tmp_path), ["training", "evaluation", "concept"],
        ["evaluation"], num_aug=num_aug, seed=42,
    )  # fmt: skip
    for split in ("train", "test"):
        for key in ARC_KEYS:
            ours = np.load(tmp_path / split / f"all__{key}.npy")
            theirs = golden[f"aug{num_aug}/{split}/{key}"]
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (split, key)
            assert (ours == theirs).all(), (split, key)
        meta = json.loads((tmp_path / split / "dataset.json").read_text())
        assert meta == metas[f"aug{num_aug}/{split}"]
    for name in ("identifiers", "test_puzzles"):
        ours = json.loads((tmp_path / f"{name}.json").read_text())
        assert ours == metas[f"aug{num_aug}/{name}"], name
    ds = data.load([str(tmp_path)], "train")  # and trmx reads it
    assert ds["meta"]["num_puzzle_identifiers"] == len(metas[f"aug{num_aug}/identifiers"])


def forward(name, grid):
    """A grid of the original puzzle as its augmented copy `name` shows it."""
    if data.AUG_SEPARATOR not in name:
        return grid
    _, t, colours = name.split(data.AUG_SEPARATOR)
    return data.dihedral(np.array([int(c) for c in colours], np.uint8)[grid], int(t[1:]))


def test_arc_augmentations_are_undone_and_answers_cropped():
    rng = np.random.RandomState(0)
    grid = np.arange(12, dtype=np.uint8).reshape(3, 4) % 10
    for _ in range(20):
        name, fn = data.arc_augmentation("p", rng)
        assert (forward(name, grid) == fn(grid)).all()
        original, undo = data.arc_undo(name)
        assert original == "p" and (undo(fn(grid)) == grid).all()
    # An answer at the corner, closed by EOS, is read back; so is a 30x30 one (no EOS).
    assert (data.arc_crop(data.arc_tokens(grid, (0, 0))) == grid).all()
    full = np.ones((30, 30), np.uint8)
    assert (data.arc_crop(data.arc_tokens(full, (0, 0))) == full).all()
    # A PAD in row 1 at column 2: the largest all-colour top-left rectangle is 3 rows x 2.
    tokens = data.arc_tokens(grid, (0, 0))
    tokens[30 + 2] = data.PAD
    assert data.arc_crop(tokens).shape == (3, 2)
    assert data.arc_crop(np.zeros(900, np.uint8)).shape == (0, 0)


def test_arc_votes_rank_by_count_then_mean_q_and_write_the_submission(tmp_path):
    """Puzzle p (two test inputs, three copies each: itself and 2 augmentations) and puzzle q
    (no predictions). Input A: the right grid gets 2 votes, a wrong one 1 (with a higher q):
    solved at K=1. Input B: one vote each for a wrong grid (q 0.88), an empty answer (0.5)
    and the right grid (0.12): solved from K=5 on. pass@K averages p's inputs, then the 2
    puzzles; q has no submission entry."""
    A, a, B, b = [[1, 2], [3, 4]], [[4, 3], [2, 1]], [[5]], [[6, 6]]
    wrong_a, wrong_b = np.array([[7]], np.uint8), np.array([[6], [6]], np.uint8)
    challenges = {
        "p": {"train": [{"input": A, "output": a}], "test": [{"input": A}, {"input": B}]},
        "q": {"train": [{"input": B, "output": b}], "test": [{"input": B}]},
    }
    (tmp_path / "x_ev_challenges.json").write_text(json.dumps(challenges))
    (tmp_path / "x_ev_solutions.json").write_text(json.dumps({"p": [a, b], "q": [b]}))
    out = tmp_path / "ds"
    data.build_arc(str(tmp_path / "x"), str(out), ["ev"], ["ev"], num_aug=2, seed=0)
    names = json.loads((out / "identifiers.json").read_text())
    test = data.load([str(out)], "test")
    right_a, right_b, empty = (
        np.array(a, np.uint8),
        np.array(b, np.uint8),
        np.zeros((0, 0), np.uint8),
    )
    plan = {  # (test input, copy of p) -> (answer in the original colours, q_halt logit)
        (0, 0): (wrong_a, 3.0), (0, 1): (right_a, -1.0), (0, 2): (right_a, -1.0),
        (1, 0): (wrong_b, 2.0), (1, 1): (empty, 0.0), (1, 2): (right_b, -2.0),
    }  # fmt: skip
    rows = {"puzzle_identifiers": [], "inputs": [], "preds": [], "q_halt_logits": []}
    copies = [
        p
        for p in range(len(test["puzzle_identifiers"]))
        if names[test["puzzle_identifiers"][p]].startswith("p")
    ]
    for copy, p in enumerate(copies):
        name = names[test["puzzle_identifiers"][p]]
        for j, e in enumerate(range(test["puzzle_indices"][p], test["puzzle_indices"][p + 1])):
            answer, q = plan[j, copy]
            rows["puzzle_identifiers"].append(test["puzzle_identifiers"][p])
            rows["inputs"].append(test["inputs"][e])
            rows["preds"].append(data.arc_tokens(forward(name, answer), (0, 0)))
            rows["q_halt_logits"].append(q)
    np.savez(tmp_path / "pred.npz", **{k: np.array(v) for k, v in rows.items()})
    scores = data.arc_score(str(out), str(tmp_path / "pred.npz"), str(tmp_path / "score"))
    assert scores == {"pass@1": 0.25, "pass@2": 0.25, "pass@5": 0.5, "pass@10": 0.5,
                      "pass@100": 0.5, "pass@1000": 0.5}  # fmt: skip
    submission = json.loads((tmp_path / "score" / "submission.json").read_text())
    assert submission == {
        "p": [{"attempt_1": a, "attempt_2": wrong_a.tolist()},
              {"attempt_1": wrong_b.tolist(), "attempt_2": []}],
        "q": [],
    }  # fmt: skip
    rows.pop("q_halt_logits")
    np.savez(tmp_path / "bad.npz", **{k: np.array(v) for k, v in rows.items()})
    result = subprocess.run(
        [sys.executable, str(ROOT / "data.py"), "arc_score", f"--data={out}",
         f"--predictions={tmp_path / 'bad.npz'}", f"--out={tmp_path}"],
        check=False, capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 1 and "no array q_halt_logits" in result.stderr


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda c, s: c["p"]["train"][0].update(input=[[0] * 31]),
            "a 1x31 grid, larger than 30x30",
        ),
        (lambda c, s: c["p"]["train"][0].update(output=[[10]]), r"colours \[10\] outside 0..9"),
        (lambda c, s: c["p"]["train"][0].update(output=[[1], [1, 2]]), "not a rectangular grid"),
        (lambda c, s: s.update(p=[]), "0 solutions for puzzle p, which has 1 test inputs"),
        (lambda c, s: s.clear(), "No ARC solutions file .*--dummy_solutions"),
    ],
)
def test_arc_builder_rejects_bad_json_naming_it(tmp_path, change, message):
    challenges = {"p": {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}}
    solutions = {"p": [[[4]]]}
    change(challenges, solutions)
    (tmp_path / "x_ev_challenges.json").write_text(json.dumps(challenges))
    if solutions:
        (tmp_path / "x_ev_solutions.json").write_text(json.dumps(solutions))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.build_arc(str(tmp_path / "x"), str(tmp_path / "out"), ["ev"], ["ev"], num_aug=1)
