r"""Sudoku data: the official Sudoku-Extreme CSVs or built-in puzzles, in the reference's layout.

Build a dataset (both write `<out>/{train,test}/dataset.json` + `all__*.npy`, the layout of
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

Tokens: PAD 0, blank 1, digits 1..9 -> 2..10 (value + 1), row-major, 81 cells.
Training batches follow the reference: an epoch is a permutation of the puzzle groups (one
original puzzle and its augmentations) and each group gives one random member. Here the draw
is a pure function of (seed, position in the stream), so a run resumes exactly.
"""

import csv
import json
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
    os.makedirs(os.path.join(out, split), exist_ok=True)
    for k, v in arrays.items():
        np.save(os.path.join(out, split, f"all__{k}.npy"), v)
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
    with open(os.path.join(out, split, "dataset.json"), "w") as f:  # written last: the marker
        json.dump(meta, f)
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


def builtin_dataset(directory, num_train, num_test, min_blanks, max_blanks, num_aug, seed=0):
    """The path of the built-in dataset these settings describe, under `directory`, built
    (`build_builtin`) on first use: aside, then renamed, so never seen half-written."""
    name = f"builtin-{num_train}-{num_test}-{min_blanks}-{max_blanks}-{num_aug}-s{seed}"
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        t0 = time.time()
        tmp = f"{path}.tmp{os.getpid()}"
        build_builtin(tmp, num_train, num_test, min_blanks, max_blanks, num_aug, seed)
        try:
            os.rename(tmp, path)
        except OSError:  # another process on this host finished first
            shutil.rmtree(tmp)
        print(
            f"built-in data: {num_train} x {num_aug + 1} train / {num_test} test puzzles with "
            f"{min_blanks}..{max_blanks} blanks -> {path} ({time.time() - t0:.0f} s)",
            flush=True,
        )
    return path


def download_csvs(out_dir, repo="sapientinc/sudoku-extreme"):
    """Fetch train.csv and test.csv of Sudoku-Extreme from the Hugging Face hub."""
    try:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise SystemExit("--download needs huggingface_hub: pip install huggingface_hub") from e
    os.makedirs(out_dir, exist_ok=True)
    for name in ("train.csv", "test.csv"):
        hf_hub_download(repo, name, repo_type="dataset", local_dir=out_dir)
    return out_dir


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


def main(argv):
    if len(argv) != 2 or argv[1] not in ("sudoku", "builtin"):
        raise app.UsageError("usage: python data.py sudoku|builtin --out=DIR [flags]; see --help")
    F = flags.FLAGS
    try:  # a bad file or value is one clear line, not a traceback
        build(argv[1], F)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"data.py: error: {e}") from e
    logging.info("wrote %s", F.out)


def build(what, F):
    if what == "builtin":
        build_builtin(F.out, F.num_train, F.num_test, F.min_blanks, F.max_blanks, F.num_aug, F.seed)
    else:
        if not (F.csv_dir or F.download):
            raise app.UsageError(
                "sudoku needs --csv_dir=DIR (with train.csv, test.csv) or --download"
            )
        csv_dir = (
            download_csvs(F.csv_dir or os.path.join(F.out, "csv")) if F.download else F.csv_dir
        )
        build_sudoku(csv_dir, F.out, F.subsample, F.num_aug, F.seed, F.min_rating)


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "output dataset folder", required=True)
    flags.DEFINE_integer("num_aug", 0, "augmented variants per training puzzle")
    flags.DEFINE_integer("seed", 0, "seed of the subsample, augmentations and generator")
    flags.DEFINE_string("csv_dir", None, "sudoku: folder with the official train.csv, test.csv")
    flags.DEFINE_bool("download", False, "sudoku: fetch the CSVs with huggingface_hub")
    flags.DEFINE_integer("subsample", None, "sudoku: training puzzles kept (the paper: 1000)")
    flags.DEFINE_integer("min_rating", None, "sudoku: keep puzzles rated at least this")
    flags.DEFINE_integer("num_train", 2000, "builtin: training puzzles")
    flags.DEFINE_integer("num_test", 1000, "builtin: held-out test puzzles")
    flags.DEFINE_integer("min_blanks", 40, "builtin: fewest blank cells (difficulty)")
    flags.DEFINE_integer("max_blanks", 50, "builtin: most blank cells (difficulty)")
    app.run(main)
