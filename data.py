r"""Sudoku, Maze-Hard and ARC-AGI data in the reference's layout, and ARC scoring.

Build a dataset (each writes `<out>/{train,test}/dataset.json` + `all__*.npy`, the layout of
the official TRM code, so datasets built by either project load in both):

  # Sudoku-Extreme 1K x 1000 augmentations from the official CSVs (train.csv, test.csv):
  python data.py sudoku --csv_dir=DIR --out=data/sudoku-extreme-1k-aug-1000 \
      --subsample=1000 --num_aug=1000
  # ... or let huggingface_hub fetch the CSVs (pip install huggingface_hub; needs a network):
  python data.py sudoku --download --out=data/sudoku-extreme-1k-aug-1000 --subsample=1000 \
      --num_aug=1000
  # Built-in generated puzzles (unique solutions, 40..50 blanks), no download:
  python data.py builtin --out=data/builtin --num_train=2000 --num_test=1000 \
      --min_blanks=40 --max_blanks=50 --num_aug=100
  # Maze-Hard (30x30) from the official CSVs, as the official builder writes it (--aug: the
  # 8 symmetries of each training maze), or fetched:
  python data.py maze --download --out=data/maze-30x30-hard-1k
  # Built-in mazes (the answer: the unique shortest path from S to G), no download:
  python data.py maze_builtin --out=data/maze-builtin --num_train=2000 --num_test=500 \
      --size=15 --min_path=20 --aug
  # ARC-AGI-1 from the Kaggle-format JSON the official repository ships (kaggle/combined/),
  # the same arrays and puzzle ids as its builder (ARC-AGI-2: training2,evaluation2,concept):
  python data.py arc --input_file_prefix=kaggle/combined/arc-agi \
      --subsets=training,evaluation,concept --test_set_name=evaluation --num_aug=1000 \
      --seed=42 --out=data/arc1concept-aug-1000
  # pass@K and a Kaggle submission.json from saved predictions (inputs, puzzle_identifiers,
  # preds, q_halt_logits):
  python data.py arc_score --data=data/arc1concept-aug-1000 --predictions=PRED.npz --out=DIR

Sudoku tokens: PAD 0, blank 1, digits 1..9 -> 2..10 (value + 1), row-major, 81 cells. Maze
tokens: PAD 0, then `#` (wall), ` ` (open), `S`, `G`, `o` (the path) as 1..5, row-major. ARC
tokens: PAD 0, EOS 1, colours 0..9 -> 2..11 on a 30x30 canvas (900 cells).
Training batches follow the reference: an epoch is a permutation of the puzzle groups (one
original puzzle and its augmentations) and each group gives one random member. Here the draw
is a pure function of (seed, position in the stream), so a run resumes exactly.
"""

import csv
import hashlib
import json
import math
import os
import random
import shutil
import time

import numpy as np
from absl import app, flags, logging

PAD, BLANK_ID, IGNORE_LABEL = 0, 0, -100  # pad token, blank puzzle id, ignored label
DIGITS = "123456789"
BLANK_CHARS = ".0"


# ----------------------------------------------------------------------------- Sudoku logic

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_ALL_DIGITS = 0b1111111110  # bit d set = digit d (1..9) still possible


def solve(grid, limit=2, rng=None):
    """Up to `limit` solutions of `grid` (81 ints, 0 = blank), by backtracking on the most
    constrained cell. With `rng`, digits are tried in random order (to make random grids)."""
    rows, cols, boxes, grid = [0] * 9, [0] * 9, [0] * 9, [int(v) for v in grid]
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            if (rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) & bit:
                return []  # the givens already clash
            rows[_ROW[i]] |= bit
            cols[_COL[i]] |= bit
            boxes[_BOX[i]] |= bit
    empty, found = [i for i in range(81) if not grid[i]], []

    def search(k):  # cells empty[:k] are filled; returns True once `limit` solutions are found
        if k == len(empty):
            found.append(list(grid))
            return len(found) >= limit
        best, best_n, best_cand = k, 10, 0
        for j in range(k, len(empty)):
            i = empty[j]
            cand = _ALL_DIGITS & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            n = cand.bit_count()
            if n < best_n:
                best, best_n, best_cand = j, n, cand
                if n <= 1:
                    break
        empty[k], empty[best] = empty[best], empty[k]
        i = empty[k]
        digits = [d for d in range(1, 10) if best_cand >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            grid[i] = d
            rows[_ROW[i]] ^= bit
            cols[_COL[i]] ^= bit
            boxes[_BOX[i]] ^= bit
            if search(k + 1):
                return True
            rows[_ROW[i]] ^= bit
            cols[_COL[i]] ^= bit
            boxes[_BOX[i]] ^= bit
        grid[i] = 0
        empty[k], empty[best] = empty[best], empty[k]
        return False

    search(0)
    return found


def sudoku_error(grid) -> str | None:
    """Why a solved grid (81 ints) is not a valid Sudoku, or None if it is."""
    g = np.asarray(grid).reshape(9, 9)
    units = [
        ("row", g),
        ("column", g.T),
        ("box", g.reshape(3, 3, 3, 3).swapaxes(1, 2).reshape(9, 9)),
    ]
    for name, u in units:
        for k in range(9):
            if sorted(u[k].tolist()) != list(range(1, 10)):
                return f"{name} {k + 1} holds {u[k].tolist()}, not the digits 1..9 once each"
    return None


def generate(num, min_blanks, max_blanks, seed):
    """`num` random puzzles with a unique solution and min_blanks..max_blanks blank cells.

    A random full grid gets b ~ U[min_blanks, max_blanks] random blanks; while the puzzle has
    a second solution, one cell where the two differ is given back. Puzzles that end with
    fewer than min_blanks blanks are redrawn. Returns (questions, answers), (num, 81) uint8.
    """
    if not 0 <= min_blanks <= max_blanks <= 64:
        raise ValueError(
            f"Need 0 <= min_blanks <= max_blanks <= 64, got {min_blanks}, {max_blanks}"
        )
    rng, questions, answers = random.Random(seed), [], []
    while len(questions) < num:
        answer = solve([0] * 81, limit=1, rng=rng)[0]
        question = list(answer)
        for i in rng.sample(range(81), rng.randint(min_blanks, max_blanks)):
            question[i] = 0
        while len(solutions := solve(question)) > 1:  # give back a cell the two disagree on
            i = rng.choice([i for i in range(81) if solutions[0][i] != solutions[1][i]])
            question[i] = answer[i]
        if question.count(0) >= min_blanks:
            questions.append(question)
            answers.append(answer)
    return np.array(questions, np.uint8), np.array(answers, np.uint8)


def augment(question, answer, num, rng):
    """`num` validity-preserving variants of one puzzle, (num, 81) each: relabel the digits,
    transpose with p=0.5, shuffle the bands and the rows in each band, likewise columns."""
    digit_map = np.concatenate(
        [np.zeros((num, 1), int), rng.permuted(np.tile(np.arange(1, 10), (num, 1)), axis=1)], 1
    )

    def line_perm():  # a random order of the 3 bands, and of the 3 lines inside each band
        bands = np.argsort(rng.random((num, 3)), 1)
        inner = np.argsort(rng.random((num, 3, 3)), 2)
        return (bands[:, :, None] * 3 + inner).reshape(num, 9)

    transpose = rng.random(num) < 0.5
    rows, cols = line_perm(), line_perm()

    def apply(grid):
        g = np.broadcast_to(np.asarray(grid).reshape(9, 9), (num, 9, 9))
        g = np.where(transpose[:, None, None], g.swapaxes(1, 2), g)
        g = np.take_along_axis(g, rows[:, :, None], 1)
        g = np.take_along_axis(g, cols[:, None, :], 2)
        return np.take_along_axis(digit_map, g.reshape(num, 81).astype(int), 1).astype(np.uint8)

    return apply(question), apply(answer)


# ----------------------------------------------------------------------------- reading CSVs


def read_csv(path, min_rating=None):
    """Validated puzzles of an official CSV (source,question,answer[,rating]), (N, 81) uint8
    each with 0 = blank. Errors name the file, line and value."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header not in (
            ["source", "question", "answer"],
            ["source", "question", "answer", "rating"],
        ):
            raise ValueError(f"{path}:1: header {header}, expected source,question,answer[,rating]")
        lines, questions, answers = [], [], []
        for row in reader:
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: {len(row)} columns, expected "
                    f"{len(header)} ({','.join(header)}): {row}"
                )
            if min_rating is not None and int(row[3]) < min_rating:
                continue
            for name, text in (("question", row[1]), ("answer", row[2])):
                if len(text) != 81:
                    raise ValueError(
                        f"{path}:{reader.line_num}: {name} has {len(text)} "
                        f"characters, expected 81: {text!r}"
                    )
            lines.append(reader.line_num)
            questions.append(row[1])
            answers.append(row[2])
    q = _parse(path, lines, questions, "question", BLANK_CHARS + DIGITS)
    a = _parse(path, lines, answers, "answer", DIGITS)
    for k in np.flatnonzero(((q != 0) & (q != a)).any(1))[:1]:
        c = int(np.flatnonzero((q[k] != 0) & (q[k] != a[k]))[0])
        raise ValueError(
            f"{path}:{lines[k]}: question and answer disagree at cell {c} (row "
            f"{c // 9 + 1}, column {c % 9 + 1}): given {q[k, c]}, answer {a[k, c]}"
        )
    for k in np.flatnonzero(~_valid_grids(a))[:1]:
        raise ValueError(f"{path}:{lines[k]}: answer is not a valid Sudoku: {sudoku_error(a[k])}")
    return q, a


def _parse(path, lines, texts, name, allowed):
    """(N, 81) uint8 digits of N 81-character strings; '.' and '0' read as blank (0)."""
    raw = np.frombuffer("".join(texts).encode("latin-1", "replace"), np.uint8).reshape(-1, 81)
    ok = np.isin(raw, np.frombuffer(allowed.encode(), np.uint8))
    for k in np.flatnonzero(~ok.all(1))[:1]:
        c = int(np.flatnonzero(~ok[k])[0])
        raise ValueError(
            f"{path}:{lines[k]}: {name} has {texts[k][c]!r} at cell {c}, "
            f"expected one of {allowed!r}"
        )
    return np.where(raw == ord("."), 0, raw - ord("0")).astype(np.uint8)


def _valid_grids(grids_Nx81):
    """Per grid: every row, column and box holds each digit 1..9 exactly once."""
    g = grids_Nx81.reshape(-1, 9, 9).astype(int)
    boxes = g.reshape(-1, 3, 3, 3, 3).swapaxes(2, 3).reshape(-1, 9, 9)
    units = np.concatenate([g, g.swapaxes(1, 2), boxes], axis=1)  # (N, 27, 9)
    return (np.sort(units, -1) == np.arange(1, 10)).all((1, 2))


# ----------------------------------------------------------------------------- writing datasets


def write_split(out, split, questions, answers, num_aug=0, seed=0):
    """One split in the reference layout: each puzzle is a group of itself + num_aug variants."""
    rng = np.random.default_rng(seed)
    inputs, labels = [questions[:, None]], [answers[:, None]]
    if num_aug:
        variants = [augment(q, a, num_aug, rng) for q, a in zip(questions, answers, strict=True)]
        inputs.append(np.stack([v[0] for v in variants]))
        labels.append(np.stack([v[1] for v in variants]))
    per = 1 + num_aug  # examples per group, the original first
    n = len(questions) * per
    arrays = {
        "inputs": np.concatenate(inputs, 1).reshape(n, 81) + 1,  # tokens: value + 1
        "labels": np.concatenate(labels, 1).reshape(n, 81) + 1,
        "puzzle_identifiers": np.full(n, BLANK_ID, np.int32),
        "puzzle_indices": np.arange(n + 1, dtype=np.int32),  # one example per puzzle
        "group_indices": np.arange(0, n + 1, per, dtype=np.int32),
    }
    meta = dict(
        pad_id=PAD,
        ignore_label_id=0,
        blank_identifier_id=BLANK_ID,
        vocab_size=11,
        seq_len=81,
        num_puzzle_identifiers=1,
        total_groups=len(questions),
        mean_puzzle_examples=1,
        total_puzzles=n,
        sets=["all"],
    )
    _save_split(out, split, arrays, meta)


def _save_split(out, split, arrays, meta, identifiers=True):
    """A split's arrays (all__KEY.npy), then its dataset.json (written last: the marker that
    the split is complete), and unless told not to, the dataset's identifiers.json (one blank
    id)."""
    os.makedirs(os.path.join(out, split), exist_ok=True)
    for k, v in arrays.items():
        np.save(os.path.join(out, split, f"all__{k}.npy"), v)
    with open(os.path.join(out, split, "dataset.json"), "w") as f:
        json.dump(meta, f)
    if identifiers:
        with open(os.path.join(out, "identifiers.json"), "w") as f:
            json.dump(["<blank>"], f)


def build_sudoku(csv_dir, out, subsample=None, num_aug=0, seed=0, min_rating=None):
    """Sudoku-Extreme in the reference layout; the train subsample is seeded (reproducible)."""
    for split in ("train", "test"):
        q, a = read_csv(os.path.join(csv_dir, f"{split}.csv"), min_rating)
        if split == "train" and subsample is not None and subsample < len(q):
            keep = np.sort(np.random.default_rng(seed).choice(len(q), subsample, replace=False))
            q, a = q[keep], a[keep]
        write_split(out, split, q, a, num_aug if split == "train" else 0, seed)
        logging.info("%s: %d puzzles x %d -> %s", split, len(q), 1 + num_aug, out)


def build_builtin(out, num_train, num_test, min_blanks, max_blanks, num_aug, seed=0):
    """Generated puzzles; the test puzzles are disjoint from the train puzzles (held out)."""
    train_q, train_a = generate(num_train, min_blanks, max_blanks, seed)
    test_q, test_a = generate(num_test, min_blanks, max_blanks, seed + 1_000_003)
    seen = {bytes(q) for q in train_q}
    held_out = np.array([bytes(q) not in seen for q in test_q], bool)
    write_split(out, "train", train_q, train_a, num_aug, seed)
    write_split(out, "test", test_q[held_out], test_a[held_out])
    return out


def builtin_dataset(directory, task, num_train, num_test, difficulty, num_aug, seed=0):
    """The path of the built-in dataset these settings describe, under `directory`, built on
    first use (aside, then renamed, so never seen half-written). `task` "sudoku":
    `difficulty` = (min, max) blanks, num_aug variants per puzzle (build_builtin); "maze":
    `difficulty` = (size, min path length), num_aug > 0 adds the 8 symmetries
    (build_maze_builtin)."""
    a, b = difficulty
    name = f"builtin-{num_train}-{num_test}-{a}-{b}-{num_aug}-s{seed}"
    path = os.path.join(directory, name if task == "sudoku" else f"{task}-{name}")
    if not os.path.exists(path):
        t0 = time.time()
        tmp = f"{path}.tmp{os.getpid()}"
        if task == "sudoku":
            build_builtin(tmp, num_train, num_test, a, b, num_aug, seed)
            what = f"{num_train} x {num_aug + 1} train / {num_test} test puzzles, {a}..{b} blanks"
        else:
            build_maze_builtin(tmp, num_train, num_test, a, b, num_aug > 0, seed)
            what = f"{num_train} train / {num_test} test {a}x{a} mazes, paths of {b}+ steps"
        try:
            os.rename(tmp, path)
        except OSError:  # another process on this host finished first
            shutil.rmtree(tmp)
        print(f"built-in data: {what} -> {path} ({time.time() - t0:.0f} s)", flush=True)
    return path


def download_csvs(out_dir, repo="sapientinc/sudoku-extreme"):
    """Fetch train.csv and test.csv of a dataset repository on the Hugging Face hub
    (Sudoku-Extreme; Maze-Hard: sapientinc/maze-30x30-hard-1k)."""
    try:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise SystemExit("--download needs huggingface_hub: pip install huggingface_hub") from e
    os.makedirs(out_dir, exist_ok=True)
    for name in ("train.csv", "test.csv"):
        hf_hub_download(repo, name, repo_type="dataset", local_dir=out_dir)
    return out_dir


# ----------------------------------------------------------------------------- Maze-Hard

MAZE_CHARS = "# SGo"  # wall, open, start, goal, the path: tokens 1..5 (PAD 0), as the reference


def read_maze_csv(path):
    """(questions, answers) of an official maze CSV (source,question,answer,rating): (N, n*n)
    uint8 characters of square n x n grids over MAZE_CHARS. A row with another character,
    another length, or a non-square grid is an error naming its line."""
    questions, answers, size = [], [], None
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        for line, row in enumerate(reader, 2):
            if len(row) < 3:
                raise ValueError(
                    f"{path}:{line}: {len(row)} fields, expected source,question,answer"
                )
            for text in row[1:3]:
                n = math.isqrt(len(text))
                if n * n != len(text) or not text or len(text) != (size or len(text)):
                    raise ValueError(
                        f"{path}:{line}: a grid of {len(text)} characters, expected a square "
                        f"one{f' of {size}' if size else ''}"
                    )
                if set(text) - set(MAZE_CHARS):
                    raise ValueError(
                        f"{path}:{line}: characters {sorted(set(text) - set(MAZE_CHARS))} "
                        f"outside {MAZE_CHARS!r}"
                    )
                size = len(text)
            questions.append(row[1])
            answers.append(row[2])
    if not questions:
        raise ValueError(f"{path}: no mazes")
    size = len(questions[0])
    as_array = [
        np.frombuffer("".join(t).encode(), np.uint8).reshape(-1, size) for t in (questions, answers)
    ]
    return as_array[0], as_array[1]


def dihedral(grid, t):
    """The t-th of the 8 symmetries of a square grid, in the reference's order: identity,
    rotations by 90, 180, 270 degrees, left-right flip, up-down flip, transpose,
    anti-transpose."""
    ops = (
        lambda g: g, lambda g: np.rot90(g, 1), lambda g: np.rot90(g, 2), lambda g: np.rot90(g, 3),
        np.fliplr, np.flipud, np.transpose, lambda g: np.fliplr(np.rot90(g, 1)),
    )  # fmt: skip
    return ops[t](grid)


def write_maze_split(out, split, questions, answers, aug=False):
    """One split of mazes (N, n*n characters) in the reference layout, as its maze builder
    writes it: each maze a group; with `aug`, its 8 symmetries are 8 puzzles of that group,
    one example each; tokens 1..5 for MAZE_CHARS; every puzzle id 0."""
    n = math.isqrt(questions.shape[1])
    variants = 8 if aug else 1
    lookup = np.zeros(256, np.uint8)
    lookup[np.frombuffer(MAZE_CHARS.encode(), np.uint8)] = np.arange(1, len(MAZE_CHARS) + 1)

    def tokens(grids):  # (N, n*n) characters -> (N * variants, n*n) tokens, maze-major
        g = grids.reshape(-1, n, n)
        out = [dihedral(m, t).reshape(-1) for m in g for t in range(variants)]
        return lookup[np.stack(out)]

    count = len(questions) * variants
    arrays = {
        "inputs": tokens(questions),
        "labels": tokens(answers),
        "group_indices": np.arange(0, count + 1, variants, dtype=np.int32),
        "puzzle_indices": np.arange(count + 1, dtype=np.int32),
        "puzzle_identifiers": np.zeros(count, np.int32),
    }
    meta = dict(
        seq_len=n * n,
        vocab_size=len(MAZE_CHARS) + 1,
        pad_id=PAD,
        ignore_label_id=0,
        blank_identifier_id=BLANK_ID,
        num_puzzle_identifiers=1,
        total_groups=len(questions),
        mean_puzzle_examples=1,
        total_puzzles=len(questions),
        sets=["all"],
    )  # fmt: skip  (total_puzzles counts mazes, as the reference's builder does)
    _save_split(out, split, arrays, meta)


def build_maze(csv_dir, out, subsample=None, aug=False, seed=0):
    """Maze-Hard in the reference layout from the official train.csv and test.csv; `aug`
    (the 8 symmetries) and the seeded `subsample` apply to the training split."""
    for split in ("train", "test"):
        q, a = read_maze_csv(os.path.join(csv_dir, f"{split}.csv"))
        if split == "train" and subsample is not None and subsample < len(q):
            keep = np.sort(np.random.default_rng(seed).choice(len(q), subsample, replace=False))
            q, a = q[keep], a[keep]
        write_maze_split(out, split, q, a, aug and split == "train")
        logging.info("%s: %d mazes x %d -> %s", split, len(q), 8 if aug else 1, out)


def generate_mazes(num, size, min_path, seed):
    """`num` size x size mazes (N, size*size characters each for the question and the answer):
    a random spanning tree of the cells at odd coordinates (walls between, around), so that
    any two cells are joined by exactly one path, S and G on cells at least `min_path` steps
    apart along it; the answer marks the cells strictly between them 'o' (the unique
    shortest path). Deterministic in `seed`."""
    longest = 2 * (((size - 1) // 2) ** 2 - 1)  # a path through every cell of the lattice
    if size < 5 or not 1 <= min_path <= longest:
        raise ValueError(
            f"mazes of side {size} (at least 5) have paths of 1..{longest} steps, not {min_path}"
        )
    rng, cells = (
        random.Random(seed),
        [(r, c) for r in range(1, size - 1, 2) for c in range(1, size - 1, 2)],
    )
    questions, answers, tries = [], [], 0
    while len(questions) < num:
        grid = np.full((size, size), ord("#"), np.uint8)
        start = rng.choice(cells)
        grid[start], stack, seen = ord(" "), [start], {start}
        while stack:  # randomized depth-first search: a spanning tree of the cells
            r, c = stack[-1]
            nexts = [(r + dr, c + dc) for dr, dc in ((0, 2), (2, 0), (0, -2), (-2, 0))]
            nexts = [
                p for p in nexts if 0 < p[0] < size - 1 and 0 < p[1] < size - 1 and p not in seen
            ]
            if not nexts:
                stack.pop()
                continue
            p = rng.choice(nexts)
            grid[(r + p[0]) // 2, (c + p[1]) // 2] = grid[p] = ord(" ")
            seen.add(p)
            stack.append(p)
        s = rng.choice(cells)
        dist, parent = maze_distances(grid, s)
        far = [p for p in cells if dist.get(p, -1) >= min_path]
        if not far:
            tries += 1
            if tries > 1000 * (len(questions) + 1):
                raise ValueError(f"no {size}x{size} maze with a path of {min_path}+ steps found")
            continue  # no cell that far from S in this maze: draw another
        g = rng.choice(far)
        answer = grid.copy()
        p = parent[g]
        while p != s:
            answer[p] = ord("o")
            p = parent[p]
        grid[s] = answer[s] = ord("S")
        grid[g] = answer[g] = ord("G")
        questions.append(grid.reshape(-1))
        answers.append(answer.reshape(-1))
    return np.stack(questions), np.stack(answers)


def maze_distances(grid, source):
    """Breadth-first search over the non-wall cells of a maze grid (characters): {cell: steps
    from `source`} and {cell: the cell before it on a shortest path}."""
    dist, parent, queue = {source: 0}, {}, [source]
    for r, c in queue:
        for p in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            inside = 0 <= p[0] < grid.shape[0] and 0 <= p[1] < grid.shape[1]
            if inside and grid[p] != ord("#") and p not in dist:
                dist[p], parent[p] = dist[(r, c)] + 1, (r, c)
                queue.append(p)
    return dist, parent


def build_maze_builtin(out, num_train, num_test, size, min_path, aug=False, seed=0):
    """Generated mazes; the test mazes are disjoint from the training mazes (held out)."""
    train_q, train_a = generate_mazes(num_train, size, min_path, seed)
    test_q, test_a = generate_mazes(num_test, size, min_path, seed + 1_000_003)
    seen = {bytes(q) for q in train_q}
    held_out = np.array([bytes(q) not in seen for q in test_q], bool)
    write_maze_split(out, "train", train_q, train_a, aug)
    write_maze_split(out, "test", test_q[held_out], test_a[held_out])
    return out


# ----------------------------------------------------------------------------- ARC-AGI

ARC_SIZE = 30  # every grid sits on a 30 x 30 canvas: 900 tokens
ARC_EOS = 1  # tokens: PAD 0, EOS 1 (the row below and the column right of a grid), colour c: c + 2
AUG_SEPARATOR = "|||"  # an augmented puzzle's name: "<name>|||t<symmetry>|||<colour map>"
ARC_RETRIES = 5  # augmentation draws per augmentation wanted before settling for fewer


def arc_grid(grid, where):
    """An ARC grid (a list of rows of colours 0..9, at most 30 x 30) as uint8; anything else
    is an error naming `where`."""
    try:
        a = np.array(grid)
    except ValueError:
        a = np.zeros(0)
    if a.ndim != 2 or a.size == 0 or a.dtype.kind not in "iu":
        raise ValueError(f"{where}: not a rectangular grid of integers")
    if max(a.shape) > ARC_SIZE:
        raise ValueError(f"{where}: a {a.shape[0]}x{a.shape[1]} grid, larger than 30x30")
    if a.min() < 0 or a.max() > 9:
        raise ValueError(
            f"{where}: colours {sorted(set(np.unique(a).tolist()) - set(range(10)))} outside 0..9"
        )
    return a.astype(np.uint8)


def grid_hash(grid):
    """A grid's identity (shape and colours) as the reference hashes it."""
    return hashlib.sha256(bytes(grid.shape) + grid.tobytes()).hexdigest()


def arc_tokens(grid, corner):
    """900 tokens of a grid placed at `corner` (row, column) of the canvas, closed by EOS
    below and to the right (where the canvas has room)."""
    (r, c), (h, w) = corner, grid.shape
    canvas = np.zeros((ARC_SIZE, ARC_SIZE), np.uint8)
    canvas[r : r + h, c : c + w] = grid + 2
    if r + h < ARC_SIZE:
        canvas[r + h, c : c + w] = ARC_EOS
    if c + w < ARC_SIZE:
        canvas[r : r + h, c + w] = ARC_EOS
    return canvas.reshape(-1)


def arc_augmentation(name, rng):
    """(augmented name, grid -> grid): a random symmetry (dihedral) after a random
    permutation of the colours 1..9 (black stays black)."""
    t = int(rng.randint(0, 8))
    colours = np.concatenate([[0], rng.permutation(np.arange(1, 10, dtype=np.uint8))])
    colours = colours.astype(np.uint8)
    aug_name = AUG_SEPARATOR.join([name, f"t{t}", "".join(map(str, colours))])
    return aug_name, lambda grid: dihedral(colours[grid], t)


def arc_undo(name):
    """(original name, grid -> grid) that maps an augmented puzzle's grid back."""
    if AUG_SEPARATOR not in name:
        return name, lambda grid: grid
    original, t, colours = name.rsplit(AUG_SEPARATOR, 2)
    inverse_t = (0, 3, 2, 1, 4, 5, 6, 7)[int(t[1:])]  # rotations by 90 and 270 swap
    inverse_colours = np.argsort([int(c) for c in colours]).astype(np.uint8)
    return original, lambda grid: inverse_colours[dihedral(grid, inverse_t)]


def read_arc_subset(prefix, subset, dummy_solutions=False):
    """{puzzle name: {"train": [pairs], "test": [pairs]}} of `<prefix>_<subset>_challenges.json`
    with the test outputs from `..._solutions.json`; without that file, an error, or with
    `dummy_solutions` a 1x1 black output for every test input (the reference's fallback for
    hidden test sets: the scores are then meaningless, the submission is not)."""
    path = f"{prefix}_{subset}_challenges.json"
    if not os.path.exists(path):
        raise FileNotFoundError(f"No ARC challenges file {path}")
    with open(path) as f:
        puzzles = json.load(f)
    solutions_path = f"{prefix}_{subset}_solutions.json"
    if os.path.exists(solutions_path):
        with open(solutions_path) as f:
            solutions = json.load(f)
        for name, puzzle in puzzles.items():
            if len(solutions.get(name, ())) != len(puzzle["test"]):
                raise ValueError(
                    f"{solutions_path}: {len(solutions.get(name, ()))} solutions for puzzle "
                    f"{name}, which has {len(puzzle['test'])} test inputs"
                )
            for pair, output in zip(puzzle["test"], solutions[name], strict=True):
                pair["output"] = output
    elif dummy_solutions:
        for puzzle in puzzles.values():
            for pair in puzzle["test"]:
                pair.setdefault("output", [[0]])
    else:
        raise FileNotFoundError(
            f"No ARC solutions file {solutions_path} (--dummy_solutions scores a hidden test "
            "set against 1x1 black grids, for its submission.json only)"
        )
    return puzzles


def arc_variants(name, puzzle, test_split, num_aug, rng):
    """The puzzle and up to num_aug distinct augmentations of it, each {split: (name,
    [(input, output), ...])}: its demonstration pairs go to the train split, its test pairs
    to `test_split`. An augmentation that repeats one already drawn (same pairs, in any
    order) is drawn again, at most ARC_RETRIES * num_aug draws in all."""
    examples = {"train": [], test_split: []}
    for kind, pairs in puzzle.items():  # in the file's order, which sets the examples' order
        if kind not in ("train", "test"):
            raise ValueError(f"ARC puzzle {name}: a key {kind!r}, expected 'train' and 'test'")
        split = "train" if kind == "train" else test_split
        for i, pair in enumerate(pairs):
            where = f"ARC puzzle {name}, {kind} pair {i}"
            examples[split].append(
                (
                    arc_grid(pair["input"], f"{where} input"),
                    arc_grid(pair["output"], f"{where} output"),
                )
            )

    def identity(pairs):  # order-free hash of every pair of every split
        hashes = sorted(f"{grid_hash(a)}|{grid_hash(b)}" for v in pairs.values() for a, b in v)
        return hashlib.sha256("|".join(hashes).encode()).hexdigest()

    variants, seen = [{s: (name, v) for s, v in examples.items()}], {identity(examples)}
    for _ in range(ARC_RETRIES * num_aug if num_aug else 0):
        aug_name, fn = arc_augmentation(name, rng)
        pairs = {s: [(fn(a), fn(b)) for a, b in v] for s, v in examples.items()}
        if identity(pairs) not in seen:
            seen.add(identity(pairs))
            variants.append({s: (aug_name, v) for s, v in pairs.items()})
        if len(variants) > num_aug:
            break
    if len(variants) <= num_aug:
        logging.info(
            "ARC puzzle %s: %d distinct augmentations of %d", name, len(variants) - 1, num_aug
        )
    return variants


def build_arc(
    prefix, out, subsets, test_sets, num_aug=1000, seed=42, dummy_solutions=False, first_id=1
):
    """ARC-AGI in the reference layout, the same arrays, dataset.json, identifiers.json and
    test_puzzles.json as the official dataset/build_arc_dataset.py for the same JSON files,
    subsets and seed (one numpy RandomState draws in the same order).

    Puzzles of a subset in `test_sets` train on their demonstration pairs and are tested on
    their test pairs; other subsets train on both. Each puzzle is a group of itself and its
    augmentations (arc_variants), each with its own puzzle id (from first_id, in order of
    appearance, train split first). Training examples are placed on the canvas at a random
    offset, but for one random example of each puzzle; test examples at the corner.
    """
    rng = np.random.RandomState(seed)
    groups, test_puzzles = {"train": [], "test": []}, {}
    for subset in subsets:
        puzzles = list(read_arc_subset(prefix, subset, dummy_solutions).items())
        rng.shuffle(puzzles)
        for name, puzzle in puzzles:
            test_split = "test" if subset in test_sets else "train"
            if test_split == "test":
                test_puzzles[name] = puzzle
            variants = arc_variants(name, puzzle, test_split, num_aug, rng)
            for split in dict.fromkeys(("train", test_split)):
                groups[split].append([v[split] for v in variants])
    ids = {}
    for split in ("train", "test"):
        for group in groups[split]:
            for name, _ in group:
                ids.setdefault(name, first_id + len(ids))
    num_ids = first_id + len(ids)
    logging.info("ARC: %d puzzles, %d puzzle ids", len(groups["train"]), num_ids)
    for split in ("train", "test"):
        if groups[split]:
            _write_arc_split(out, split, groups[split], ids, num_ids, rng)
    with open(os.path.join(out, "identifiers.json"), "w") as f:
        json.dump(["<blank>"] * first_id + list(ids), f)
    with open(os.path.join(out, "test_puzzles.json"), "w") as f:
        json.dump(test_puzzles, f)
    return out


def _write_arc_split(out, split, groups, ids, num_ids, rng):
    """One split's arrays, written into memory-mapped files (a full ARC build holds millions
    of examples)."""
    os.makedirs(os.path.join(out, split), exist_ok=True)
    puzzles = [p for g in groups for p in g]
    count = sum(len(pairs) for _, pairs in puzzles)
    rows = {
        k: np.lib.format.open_memmap(
            os.path.join(out, split, f"all__{k}.npy"), "w+", np.uint8, (count, ARC_SIZE**2)
        )
        for k in ("inputs", "labels")
    }
    i = 0
    for _, pairs in puzzles:
        fixed = rng.randint(0, len(pairs))  # the one example left at the corner
        for j, (a, b) in enumerate(pairs):
            corner = (0, 0)
            if split == "train" and j != fixed:
                corner = tuple(
                    rng.randint(0, ARC_SIZE - max(a.shape[k], b.shape[k]) + 1) for k in (0, 1)
                )
            rows["inputs"][i], rows["labels"][i] = arc_tokens(a, corner), arc_tokens(b, corner)
            i += 1
    for m in rows.values():
        m.flush()
    sizes = [len(pairs) for _, pairs in puzzles]
    arrays = {
        "puzzle_identifiers": np.array([ids[name] for name, _ in puzzles], np.int32),
        "puzzle_indices": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
        "group_indices": np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(
            np.int32
        ),
    }
    meta = dict(
        pad_id=PAD,
        ignore_label_id=0,
        blank_identifier_id=BLANK_ID,
        vocab_size=12,
        seq_len=ARC_SIZE**2,
        num_puzzle_identifiers=num_ids,
        total_groups=len(groups),
        mean_puzzle_examples=count / len(puzzles),
        total_puzzles=len(puzzles),
        sets=["all"],
    )
    _save_split(out, split, arrays, meta, identifiers=False)


ARC_PASS_KS = (1, 2, 5, 10, 100, 1000)


def arc_crop(tokens):
    """The grid an answer row holds, as the reference reads it: the largest rectangle at the
    canvas's top-left corner with only colours in it (no PAD, no EOS), colours 0..9."""
    colour = (tokens.reshape(ARC_SIZE, ARC_SIZE) >= 2) & (tokens.reshape(ARC_SIZE, ARC_SIZE) < 12)
    run = np.where(colour.all(1), ARC_SIZE, np.argmin(colour, 1))  # colours from column 0
    width = np.minimum.accumulate(run)  # the widest rectangle of rows 0..r
    area = width * np.arange(1, ARC_SIZE + 1)
    h = int(np.argmax(area)) + 1 if area.max() > 0 else 0
    return (tokens.reshape(ARC_SIZE, ARC_SIZE)[:h, : width[h - 1] if h else 0] - 2).astype(np.uint8)


class ArcVotes:
    """ARC scoring by votes across augmentations, as the reference's evaluator: each
    prediction is cropped, mapped back through its puzzle's augmentation and counted as a vote
    for that grid on its test input; a test input's candidates rank by votes, then by the mean
    sigmoid(q_halt) of their voters; pass@K counts a test input solved when the right grid
    is among the top K, averaged over a puzzle's test inputs, then over puzzles."""

    def __init__(self, data_dir):
        with open(os.path.join(data_dir, "identifiers.json")) as f:
            self.names = json.load(f)
        path = os.path.join(data_dir, "test_puzzles.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"No {path}: ARC scoring needs a dataset from data.py arc")
        with open(path) as f:
            self.test_puzzles = json.load(f)
        self.grids = {}  # grid hash -> grid
        self.votes = {}  # puzzle name -> input hash -> [(answer hash, sigmoid(q_halt))]

    def add(self, puzzle_identifiers, inputs, preds, q_halt_logits):
        """One batch (numpy): rows with the blank puzzle id are padding and left out."""
        q = 1 / (1 + np.exp(-np.asarray(q_halt_logits, np.float64)))
        for i in np.flatnonzero(np.asarray(puzzle_identifiers) != BLANK_ID):
            name, undo = arc_undo(self.names[puzzle_identifiers[i]])
            answer = undo(arc_crop(np.asarray(preds[i])))
            key = grid_hash(answer)
            self.grids[key] = answer
            by_input = self.votes.setdefault(name, {})
            by_input.setdefault(grid_hash(undo(arc_crop(np.asarray(inputs[i])))), []).append(
                (key, float(q[i]))
            )

    def result(self, pass_ks=ARC_PASS_KS, attempts=2):
        """({"pass@K": fraction of test puzzles}, Kaggle submission {name: [{"attempt_1":
        grid, ...} per test input]}). A test input without any vote counts as unsolved and
        has no submission entry, as in the reference."""
        solved, submission = np.zeros(len(pass_ks)), {}
        for name, puzzle in self.test_puzzles.items():
            submission[name], per_input = [], np.zeros(len(pass_ks))
            for i, pair in enumerate(puzzle["test"]):
                where = f"test_puzzles.json, {name} test pair {i}"
                answer = grid_hash(arc_grid(pair["output"], f"{where} output"))
                tally = {}  # answer hash -> [votes, summed q], in order of first vote
                for key, q in self.votes.get(name, {}).get(
                    grid_hash(arc_grid(pair["input"], f"{where} input")), ()
                ):
                    tally.setdefault(key, [0, 0.0])
                    tally[key][0] += 1
                    tally[key][1] += q
                if not tally:
                    logging.warning("ARC puzzle %s test input %d: no predictions", name, i)
                    continue
                ranked = sorted(
                    tally, key=lambda k: (tally[k][0], tally[k][1] / tally[k][0]), reverse=True
                )
                per_input += [answer in ranked[:k] for k in pass_ks]
                top = [self.grids[k].tolist() for k in ranked[:attempts]]
                top += top[:1] * (attempts - len(top))
                submission[name].append({f"attempt_{j + 1}": g for j, g in enumerate(top)})
            solved += per_input / len(puzzle["test"])
        scores = {
            f"pass@{k}": s / max(len(self.test_puzzles), 1)
            for k, s in zip(pass_ks, solved, strict=True)
        }
        return scores, submission


def arc_score(data_dir, predictions, out):
    """pass@K of saved predictions (an .npz with the arrays the reference's evaluator gets:
    inputs, puzzle_identifiers, preds, q_halt_logits) on an ARC dataset; writes
    <out>/submission.json."""
    with np.load(predictions) as f:
        missing = [
            k for k in ("inputs", "puzzle_identifiers", "preds", "q_halt_logits") if k not in f
        ]
        if missing:
            raise ValueError(
                f"{predictions}: no array {', '.join(missing)} (it has {', '.join(f.files)})"
            )
        arrays = {k: f[k] for k in f.files}
    votes = ArcVotes(data_dir)
    num_ids = len(votes.names)
    bad = arrays["puzzle_identifiers"][
        (arrays["puzzle_identifiers"] < 0) | (arrays["puzzle_identifiers"] >= num_ids)
    ]
    if len(bad):
        raise ValueError(
            f"{predictions}: puzzle ids {bad[:5].tolist()} outside the dataset's 0..{num_ids - 1}"
        )
    votes.add(
        arrays["puzzle_identifiers"], arrays["inputs"], arrays["preds"], arrays["q_halt_logits"]
    )
    scores, submission = votes.result()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "submission.json"), "w") as f:
        json.dump(submission, f)
    return scores


# ----------------------------------------------------------------------------- loading, batches


def load(paths, split):
    """One split of one or more dataset folders, merged: arrays + the reference's metadata."""
    ds = None
    for path in paths:
        meta_path = os.path.join(path, split, "dataset.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"No dataset at {meta_path}: build one with `python data.py`")
        with open(meta_path) as f:
            meta = json.load(f)
        for set_name in meta["sets"]:
            part = {
                k: np.load(os.path.join(path, split, f"{set_name}__{k}.npy"), mmap_mode="r")
                for k in (
                    "inputs",
                    "labels",
                    "puzzle_identifiers",
                    "puzzle_indices",
                    "group_indices",
                )
            }
            ds = part | {"meta": meta} if ds is None else _merge(ds, part, meta, path)
    return ds


def _merge(ds, part, meta, path):
    for key in ("seq_len", "vocab_size", "pad_id", "ignore_label_id"):
        if ds["meta"][key] != meta[key]:
            raise ValueError(
                f"{path}: {key}={meta[key]} differs from {ds['meta'][key]} of the "
                "datasets before it in --data_paths"
            )
    ex, pz, ids = (
        len(ds["inputs"]),
        len(ds["puzzle_identifiers"]),
        ds["meta"]["num_puzzle_identifiers"],
    )
    merged_meta = dict(
        ds["meta"],
        num_puzzle_identifiers=ids + meta["num_puzzle_identifiers"],
        total_groups=ds["meta"]["total_groups"] + meta["total_groups"],
    )
    return {
        "inputs": np.concatenate([ds["inputs"], part["inputs"]]),
        "labels": np.concatenate([ds["labels"], part["labels"]]),
        "puzzle_identifiers": np.concatenate(
            [ds["puzzle_identifiers"], part["puzzle_identifiers"] + ids]
        ),
        "puzzle_indices": np.concatenate([ds["puzzle_indices"], part["puzzle_indices"][1:] + ex]),
        "group_indices": np.concatenate([ds["group_indices"], part["group_indices"][1:] + pz]),
        "meta": merged_meta,
    }


def subset(ds, puzzles=None, aug=None):
    """The first `puzzles` groups (original puzzles) of a split, each with its first `aug`
    augmented variants; None keeps all. The data-size and augmentation-count ablations take
    nested subsets of one built dataset: 1K of a 10K build are the 1K of the 5K."""
    gi, pi = np.asarray(ds["group_indices"]), np.asarray(ds["puzzle_indices"])
    groups = len(gi) - 1
    if puzzles is not None and not 1 <= puzzles <= groups:
        raise ValueError(f"--train_puzzles={puzzles}: this dataset has {groups} puzzles")
    if aug is not None and aug < 0:
        raise ValueError(f"--train_aug={aug}: a count of augmented variants, >= 0")
    keep_groups = range(groups if puzzles is None else puzzles)
    kept = [  # puzzles (rows of puzzle_indices) kept, group by group
        np.arange(gi[g], gi[g + 1] if aug is None else min(gi[g + 1], gi[g] + 1 + aug))
        for g in keep_groups
    ]
    p_idx = np.concatenate(kept)
    sizes = pi[p_idx + 1] - pi[p_idx]
    examples = np.concatenate([np.arange(pi[p], pi[p + 1]) for p in p_idx])
    meta = dict(ds["meta"], total_groups=len(kept))
    meta["mean_puzzle_examples"] = len(examples) / len(p_idx)
    return {
        "inputs": ds["inputs"][examples],
        "labels": ds["labels"][examples],
        "puzzle_identifiers": np.asarray(ds["puzzle_identifiers"])[p_idx],
        "puzzle_indices": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32),
        "group_indices": np.concatenate([[0], np.cumsum([len(k) for k in kept])]).astype(np.int32),
        "meta": meta,
    }


def _collate(ds, example_idx, puzzle_idx, size, rows):
    """The `rows` (a slice: this process's share) of an int32 batch of `size` rows; rows past
    the given examples are padding: PAD inputs, ignored labels, the blank puzzle id."""
    example_idx = np.pad(example_idx, (0, size - len(example_idx)), constant_values=-1)[rows]
    puzzle_idx = np.pad(puzzle_idx, (0, size - len(puzzle_idx)), constant_values=-1)[rows]
    real, meta = example_idx >= 0, ds["meta"]
    batch = {
        "inputs": np.full((len(real), meta["seq_len"]), meta["pad_id"], np.int32),
        "labels": np.full((len(real), meta["seq_len"]), IGNORE_LABEL, np.int32),
        "puzzle_identifiers": np.full(len(real), meta["blank_identifier_id"], np.int32),
    }
    batch["inputs"][real] = ds["inputs"][example_idx[real]]
    labels = np.asarray(ds["labels"][example_idx[real]], np.int32)
    if meta["ignore_label_id"] is not None:
        labels[labels == meta["ignore_label_id"]] = IGNORE_LABEL
    batch["labels"][real] = labels
    batch["puzzle_identifiers"][real] = ds["puzzle_identifiers"][puzzle_idx[real]]
    return batch


def train_sampler(ds, batch_size, seed, rows=slice(None)):
    """sample(cursor) -> (batch, next cursor); cursor = groups drawn so far.

    Every process draws the same global batch and loads only its `rows` of it.

    Position p of the endless group stream is group perm_e[p % G] of epoch e = p // G, where
    perm_e and the member drawn from each group come from an RNG seeded with (seed, e). A
    puzzle adds all its examples (in a seeded order) while the batch has room; the rest of a
    puzzle cut at the batch's end is dropped, as in the reference.
    """
    gi, pi = np.asarray(ds["group_indices"]), np.asarray(ds["puzzle_indices"])
    num_groups, epochs = len(gi) - 1, {}

    def epoch(e):  # (group order, member draw in [0, 1) per position); two epochs cached
        if e not in epochs:
            rng = np.random.default_rng([seed, e])
            epochs[e] = rng.permutation(num_groups), rng.random(num_groups)
            epochs.pop(e - 2, None)
        return epochs[e]

    def sample(cursor):
        examples, puzzles = [], []
        while len(examples) < batch_size:
            e, i = divmod(cursor, num_groups)
            order, draw = epoch(e)
            g = order[i]
            p = gi[g] + int(draw[i] * (gi[g + 1] - gi[g]))
            size = pi[p + 1] - pi[p]
            take = min(size, batch_size - len(examples))
            chosen = (
                [0] if size == 1 else np.random.default_rng([seed, e, i]).permutation(size)[:take]
            )
            examples.extend(pi[p] + np.asarray(chosen))
            puzzles.extend([p] * take)
            cursor += 1
        return _collate(ds, np.array(examples), np.array(puzzles), batch_size, rows), cursor

    return sample


def process_rows(sharding, batch_size):
    """Rows of a global batch that this process's devices hold (a slice)."""
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    spans = sorted(idx[0].indices(batch_size)[:2] for idx in index_map.values())
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise ValueError(f"This process's devices hold rows {spans}: not one contiguous block")
    return slice(spans[0][0], spans[-1][1])


def to_global(sharding, local_batch):
    """This process's rows of a batch -> one array over all devices."""
    import jax  # noqa: PLC0415 (building datasets needs no jax)

    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def eval_batch_size(requested, num_devices):
    """Puzzles per evaluation batch: the requested number rounded up to a multiple of the
    device count, so that any batch size runs on any number of devices. The extra rows hold
    more test examples; the last batch is padded with rows that count nowhere
    (eval_batches)."""
    return -(-requested // num_devices) * num_devices


def eval_batches(ds, batch_size, max_examples=None, rows=slice(None)):
    """The test set in order (or a fixed random subset of max_examples), in padded batches
    of which this process loads `rows`; `index` is each row's example number (-1: padding),
    what test-time noise is keyed by."""
    n = len(ds["inputs"])
    idx = np.arange(n)
    if max_examples is not None and max_examples < n:
        idx = np.sort(np.random.default_rng(0).choice(n, max_examples, replace=False))
    puzzle_of = np.searchsorted(np.asarray(ds["puzzle_indices"]), idx, side="right") - 1
    for start in range(0, len(idx), batch_size):
        sel = slice(start, start + batch_size)
        batch = _collate(ds, idx[sel], puzzle_of[sel], batch_size, rows)
        index = np.pad(idx[sel], (0, batch_size - len(idx[sel])), constant_values=-1)
        yield batch | {"index": index[rows].astype(np.int32)}


# ----------------------------------------------------------------------------- command line


COMMANDS = ("sudoku", "builtin", "maze", "maze_builtin", "arc", "arc_score")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python data.py {'|'.join(COMMANDS)} --out=DIR; see --help")
    F = flags.FLAGS
    try:  # a bad file or value is one clear line, not a traceback
        build(argv[1], F)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"data.py: error: {e}") from e
    logging.info("wrote %s", F.out)


def build(what, F):
    if what == "arc":
        if not F.input_file_prefix:
            raise app.UsageError("arc needs --input_file_prefix=P (P_<subset>_challenges.json)")
        seed = F.seed if F["seed"].present else 42  # the official builder's default
        build_arc(
            F.input_file_prefix, F.out, F.subsets, F.test_set_name, F.num_aug, seed,
            F.dummy_solutions,
        )  # fmt: skip
    elif what == "arc_score":
        if not (F.data and F.predictions):
            raise app.UsageError("arc_score needs --data=DATASET and --predictions=PRED.npz")
        scores = arc_score(F.data, F.predictions, F.out)
        print(" ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    elif what == "builtin":
        build_builtin(F.out, F.num_train, F.num_test, F.min_blanks, F.max_blanks, F.num_aug, F.seed)
    elif what == "maze_builtin":
        build_maze_builtin(F.out, F.num_train, F.num_test, F.size, F.min_path, F.aug, F.seed)
    else:
        if not (F.csv_dir or F.download):
            raise app.UsageError(f"{what} needs --csv_dir=DIR (train.csv, test.csv) or --download")
        repo = "sapientinc/sudoku-extreme" if what == "sudoku" else "sapientinc/maze-30x30-hard-1k"
        csv_dir = F.csv_dir or os.path.join(F.out, "csv")
        csv_dir = download_csvs(csv_dir, repo) if F.download else csv_dir
        if what == "sudoku":
            build_sudoku(csv_dir, F.out, F.subsample, F.num_aug, F.seed, F.min_rating)
        else:
            build_maze(csv_dir, F.out, F.subsample, F.aug, F.seed)


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "output folder (arc_score: of submission.json)", required=True)
    flags.DEFINE_integer("num_aug", 0, "augmented variants per training puzzle")
    flags.DEFINE_integer("seed", 0, "seed of the subsample, augmentations, generator (arc: 42)")
    flags.DEFINE_string("csv_dir", None, "sudoku, maze: folder with the official train/test.csv")
    flags.DEFINE_bool("download", False, "sudoku, maze: fetch the CSVs with huggingface_hub")
    flags.DEFINE_integer("subsample", None, "sudoku, maze: training puzzles kept")
    flags.DEFINE_integer("min_rating", None, "sudoku: keep puzzles rated at least this")
    flags.DEFINE_integer("num_train", 2000, "builtin, maze_builtin: training puzzles")
    flags.DEFINE_integer("num_test", 1000, "builtin, maze_builtin: held-out test puzzles")
    flags.DEFINE_integer("min_blanks", 40, "builtin: fewest blank cells (difficulty)")
    flags.DEFINE_integer("max_blanks", 50, "builtin: most blank cells (difficulty)")
    flags.DEFINE_bool("aug", False, "maze, maze_builtin: add each training maze's 8 symmetries")
    flags.DEFINE_integer("size", 15, "maze_builtin: grid side (the official mazes: 30)")
    flags.DEFINE_integer("min_path", 20, "maze_builtin: fewest steps from S to G (difficulty)")
    flags.DEFINE_string("input_file_prefix", None, "arc: P of P_<subset>_challenges.json")
    flags.DEFINE_list("subsets", ["training", "evaluation", "concept"], "arc: subsets, in order")
    flags.DEFINE_list("test_set_name", ["evaluation"], "arc: subsets whose test pairs test")
    flags.DEFINE_bool("dummy_solutions", False, "arc: 1x1 answers where no solutions file")
    flags.DEFINE_string("data", None, "arc_score: the dataset folder from data.py arc")
    flags.DEFINE_string(
        "predictions", None, "arc_score: .npz of inputs, puzzle_identifiers, preds, q_halt_logits"
    )
    app.run(main)
