"""Checkpoints of the whole train state, local or gs://, import of PyTorch TRM weights, a run
directory's records (flags, config, metrics, TensorBoard events, environment), and the faults
a run comes back from: a failed save (the previous checkpoint stays), a lost process of a
multi-host run (`PeerWatch`: the others exit restartable, EXIT_RESTARTABLE).

Every file goes through tensorstore: `kvstore(path)` opens a local directory or a
gs://bucket/prefix, and each leaf of the train state is one zarr v3 array (dtype as trained,
bfloat16 included) that any zarr reader can open. Layout of a run's checkpoints:

  <workdir>/ckpt/step_00001000/
      params/blocks/0/gate_up/    one zarr array per leaf, named by its path in the state
      opt/.../m/...  ema/...  carry/...  step/  rng/  ...
      done.0, done.1, ...         each process: the regions it wrote and their sha256
      COMMIT                      written last, by process 0: the step, the host-side extras
                                  (data cursor, flags, score) and every region's sha256

Protocol (preemption-safe on any store, GCS included, where nothing renames atomically):
1. Process p writes the regions it owns: its shards of row-sharded leaves (the ACT carry)
   and, on process 0 only, the replicated leaves; then done.p.
2. Process 0 waits for every done.p, then writes COMMIT. A step folder without COMMIT is a
   save that was interrupted; one whose regions no longer hash to COMMIT's sha256 was
   truncated or tampered with. `latest` skips both with a warning naming them.
3. Saves run in a background thread, one at a time; the device-to-host copy happens before
   the next step, so training goes on while the files are written. `wait()` before exit.
4. After a commit, process 0 deletes all but the newest `keep` steps (and the best-scoring
   one with keep_best).

`params_from_reference(state, cfg)` maps a reference `state_dict()` (numpy arrays, keys as the
reference names them, with or without the `_orig_mod.model.` prefix of its torch.compile'd
training) onto `model.init_params`' pytree, strictly: a missing, extra or mis-shaped tensor
is an error that names the keys. `load_torch(path, cfg)` reads such a file with torch.
"""

import atexit
import concurrent.futures
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import tensorstore as ts
from absl import logging

import model

REFERENCE_PREFIXES = ("_orig_mod.", "model.")
STEP_PREFIX = "step_"
COMMIT = "COMMIT"
DONE_TIMEOUT_S = 600  # how long process 0 waits for the other processes' regions
# One tensorstore context for every open: one pool of HTTP connections (GCS) and threads.
# (A context per open piled up connections until GCS requests stalled.)
CONTEXT = ts.Context()


def kvstore(path: str):
    """A tensorstore key-value store at a local directory or a gs://bucket/prefix URL."""
    return ts.KvStore.open(_url(path), context=CONTEXT).result()


def _url(path: str) -> str:
    url = path if "://" in path else "file://" + os.path.abspath(path)
    return url.rstrip("/") + "/"


def read_text(store, key: str) -> str:
    """The text stored under `key`, or '' if there is none."""
    found = store.read(key).result()
    return found.value.decode() if found.state == "value" else ""


# ----------------------------------------------------------------------------- save


def checkpointer(directory: str, keep: int = 3, keep_best: bool = False):
    """save(step, state, extra, score=None) and wait() for checkpoints under `directory`.
    A failed save is reported by the next save or wait() (which returns False); the next
    save tries again.

    `state` is a pytree of jax arrays (typed PRNG keys allowed); `extra` a JSON-able dict of
    host-side values (data cursor, flags) returned by `restore`. `score` (higher is better)
    ranks checkpoints for keep_best.
    """
    base, executor, pending = _url(directory), concurrent.futures.ThreadPoolExecutor(1), []

    def wait():
        """Finish the save in flight. A save that failed (a full disk, a lost bucket) leaves
        the previous checkpoint as it was: one line on stderr, and False."""
        ok = True
        while pending:
            step, future = pending.pop()
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 (any write error: the run goes on)
                ok = False
                print(
                    f"ckpt: checkpoint step_{step:08d} in {directory} was not saved "
                    f"({type(e).__name__}: {e}); the newest before it is intact",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
        return ok

    def save(step, state, extra, score=None):
        wait()  # at most one save in flight
        leaves = {name: _storable(x) for name, x in _named_leaves(state).items()}
        plan = {
            name: (x.shape, str(x.dtype), _chunks(x), _owned_regions(x))
            for name, x in leaves.items()
        }  # host copies now: the next step donates x
        meta = {"step": int(step), "extra": extra, "score": score}
        pending.append((step, executor.submit(_write, base, plan, meta, keep, keep_best)))

    return save, wait


def _write(base, plan, meta, keep, keep_best):
    folder = f"{base}{STEP_PREFIX}{meta['step']:08d}/"
    store, pid, hashes = ts.KvStore.open(folder, context=CONTEXT).result(), jax.process_index(), {}
    try:
        _write_regions(folder, plan, hashes)
    except Exception:
        with contextlib.suppress(Exception):  # process 0 stops waiting for this one
            store.write(f"failed.{pid}", b"").result()
        raise
    store.write(f"done.{pid}", json.dumps(hashes).encode()).result()
    if pid:
        return
    deadline = time.time() + DONE_TIMEOUT_S
    for other in range(1, jax.process_count()):
        while (found := store.read(f"done.{other}").result()).state != "value":
            if store.read(f"failed.{other}").result().state == "value":
                raise OSError(f"process {other} could not write its part of {folder}")
            if time.time() > deadline:
                raise TimeoutError(f"process {other} did not finish its part of {folder}")
            time.sleep(0.2)
        hashes |= json.loads(found.value)
    leaves = {
        name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype, *_) in plan.items()
    }
    commit = meta | {"leaves": leaves, "sha256": hashes}
    store.write(COMMIT, json.dumps(commit, indent=1).encode()).result()
    _prune(base, keep, keep_best)


def _write_regions(folder, plan, hashes):
    """Write this process's regions of every leaf; their sha256 into `hashes`."""
    for name, (shape, dtype, chunks, regions) in plan.items():
        array = ts.open(
            _array_spec(folder, name),
            context=CONTEXT,
            create=True,
            open=True,
            dtype=ts.dtype(dtype),
            shape=shape,
            chunk_layout=ts.ChunkLayout(write_chunk_shape=chunks),
        ).result()
        for index, data in regions:
            array[index].write(data).result()
            hashes[name + _index_str(index, shape)] = _sha(data)


def _prune(base, keep, keep_best):
    """Delete all but the newest `keep` complete steps (and the best one), and old debris."""
    store = ts.KvStore.open(base, context=CONTEXT).result()
    steps, complete = _steps(store)
    kept = set(sorted(complete)[-keep:])
    if keep_best:
        scored = [(c["score"], s) for s, c in complete.items() if c.get("score") is not None]
        kept |= {max(scored)[1]} if scored else set()
    newest = max(complete)
    for step in steps:
        if step not in kept and step < newest:  # never an unfinished save newer than the commit
            _delete_step(base, store, step)


def _delete_step(base, store, step):
    """Delete one step folder under `base` (its store: `store`)."""
    name = f"{STEP_PREFIX}{step:08d}/"
    store.delete_range(ts.KvStore.KeyRange(name, name[:-1] + "0")).result()
    if base.startswith("file://"):  # the file driver leaves the empty folders
        shutil.rmtree(base[len("file://") :] + name, ignore_errors=True)


# ----------------------------------------------------------------------------- restore


def latest(directory: str):
    """(step, commit) of the newest complete, intact checkpoint under `directory`, or None.
    Interrupted saves and checkpoints whose data no longer match their sha256 are skipped,
    each with a warning naming it."""
    return next(intact(directory), None)


def intact(directory: str):
    """(step, commit) of each complete, intact checkpoint under `directory`, newest first
    (checked lazily, one at a time), skipping broken ones with a warning as `latest`."""
    base = _url(directory)
    steps, complete = _steps(ts.KvStore.open(base, context=CONTEXT).result())
    for step in sorted(steps, reverse=True):
        name = f"{base}{STEP_PREFIX}{step:08d}"
        if step not in complete:
            logging.warning("Skipping %s: no %s (a save was interrupted)", name, COMMIT)
            continue
        problem = _verify(f"{name}/", complete[step])
        if problem is None:
            yield step, complete[step]
        else:
            logging.warning("Skipping %s: %s", name, problem)


def restore(directory: str, step: int, target):
    """The state saved at `step`, shaped and sharded like `target` (a pytree of arrays or
    ShapeDtypeStructs with shardings), and the `extra` dict given to save."""
    folder = f"{_url(directory)}{STEP_PREFIX}{step:08d}/"
    commit = json.loads(
        ts.KvStore.open(folder, context=CONTEXT).result().read(COMMIT).result().value
    )
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, like in flat:
        name = _name(path)
        if name not in commit["leaves"]:
            raise ValueError(f"{folder} has no leaf {name}; it has {sorted(commit['leaves'])}")
        array = ts.open(_array_spec(folder, name), context=CONTEXT).result()
        is_key = jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key)
        stored = jax.eval_shape(jax.random.key_data, like) if is_key else like
        if tuple(array.shape) != stored.shape or array.dtype.numpy_dtype != stored.dtype:
            raise ValueError(
                f"{folder}{name}: stored {array.dtype} {tuple(array.shape)}, "
                f"this run needs {stored.dtype} {stored.shape}"
            )
        x = jax.make_array_from_callback(
            stored.shape, like.sharding, lambda index, a=array: a[index].read().result()
        )
        leaves.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(like)) if is_key else x)
    return jax.tree_util.tree_unflatten(treedef, leaves), commit["extra"]


def load_weights(path, cfg: model.Config, state, prefer_ema=True):
    """(weights with the buffers, what they are) from a PyTorch TRM checkpoint file or a
    checkpoint folder of ours (or a run directory holding one), shaped like the train
    `state`. From ours: the EMA where the run kept one (it is what the run evaluated), unless
    not `prefer_ema`; the puzzle table is always the trained one."""
    if os.path.isfile(path):
        return load_torch(path, cfg), "the weights of the PyTorch checkpoint"
    where, found = path, latest(path)
    if not found:
        where = f"{path.rstrip('/')}/ckpt"
        found = latest(where)
    if not found:
        raise ValueError("not a trmx checkpoint folder (none complete in it) nor a file")
    step, commit = found
    target = {"params": state["params"], "buffers": state["buffers"]}
    kept_ema = any(name.startswith("ema/") for name in commit["leaves"])
    if prefer_ema and kept_ema:
        target["ema"] = {k: v for k, v in state["params"].items() if k != "puzzle_emb"}
        what = f"the EMA weights of step {step}"
    else:
        what = f"the raw weights of step {step}" + ("" if kept_ema else " (the run kept no EMA)")
    weights, _ = restore(where, step, target)
    return weights["params"] | weights.get("ema", {}) | weights["buffers"], what


def with_weights(state, weights):
    """The train state with these weights and buffers (numpy or jax arrays, shaped as the
    state's), placed as the state's; the rest of the state untouched."""

    def place(like, x):
        x = np.asarray(x, like.dtype)
        if x.shape != like.shape:
            raise ValueError(f"a weight of shape {x.shape}, this model needs {like.shape}")
        return jax.make_array_from_callback(like.shape, like.sharding, lambda i: x[i])

    params = jax.tree.map(place, state["params"], {k: weights[k] for k in state["params"]})
    buffers = jax.tree.map(place, state["buffers"], {k: weights[k] for k in state["buffers"]})
    return state | {"params": params, "buffers": buffers}


def remove_newer(directory, step):
    """Delete the step folders under `directory` newer than `step` (the one a run resumes
    from): saves that did not complete, whose markers a new save of the same step must not
    see. Process 0 calls it; the others wait for it."""
    base = _url(directory)
    store = ts.KvStore.open(base, context=CONTEXT).result()
    for newer in (s for s in _steps(store)[0] if s > step):
        _delete_step(base, store, newer)


def newest_weights(directory, k, state, key):
    """The `key` weights ("ema" or "params", less the puzzle table) of the newest k intact
    checkpoints under `directory` (shaped like the train `state`), and their steps."""
    found = list(itertools.islice(intact(directory), k)) if directory else []
    if len(found) < k:
        raise ValueError(
            f"{len(found)} intact checkpoints in {directory} (steps {[s for s, _ in found]}); "
            f"train with --keep >= {k}"
        )
    trees = []
    for step, _ in found:
        weights = restore(directory, step, {key: state[key]})[0][key]
        trees.append({name: w for name, w in weights.items() if name != "puzzle_emb"})
    return trees, [s for s, _ in found]


def _verify(folder, commit):
    """None if every region of the checkpoint hashes as committed, else what is wrong."""
    try:
        for region, digest in commit["sha256"].items():
            name, index = region.split("[", 1)
            array = ts.open(_array_spec(folder, name), context=CONTEXT).result()
            if _sha(array[_parse_index(index)].read().result()) != digest:
                return f"{name}[{index} does not match its sha256 (truncated or modified)"
    except (ValueError, KeyError) as e:  # missing or unreadable array files
        return f"unreadable ({str(e).splitlines()[0]})"
    return None


# ----------------------------------------------------------------------------- the run's records


def open_workdir(workdir, files, resume_step=0):
    """log(step, metrics) and close() for a run directory, local or gs://, written through
    tensorstore: `files` ({name: text}; the run's flags, config, environment) now, then at
    every log metrics.jsonl and the TensorBoard events. A resumed run keeps the metrics up to
    its checkpoint's step and appends from there."""
    if not workdir:
        return (lambda step, log: None), (lambda: None)
    store = kvstore(workdir)
    for name, text in files.items():
        store.write(name, text.encode()).result()
    old = read_text(store, "metrics.jsonl").splitlines(keepends=True)
    lines = [line for line in old if json.loads(line)["step"] <= resume_step]
    events = tempfile.mkdtemp(prefix="trmx-events-")  # copied into the store at every log
    atexit.register(shutil.rmtree, events, ignore_errors=True)  # also when the run fails
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (only when writing)

    # purge_step: TensorBoard drops what an interrupted run logged after the checkpoint
    writer = SummaryWriter(events, purge_step=resume_step + 1 if resume_step else None)

    def log(step, metrics):
        lines.append(json.dumps({"step": step} | metrics) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                writer.add_scalar(k, v, step)
        writer.flush()
        writes = [store.write("metrics.jsonl", "".join(lines).encode())]
        for name in os.listdir(events):
            with open(os.path.join(events, name), "rb") as f:
                writes.append(store.write(name, f.read()))
        for w in writes:
            w.result()

    def close():
        writer.close()
        shutil.rmtree(events, ignore_errors=True)

    return log, close


def environment():
    """What a run ran on and with, for its record (report.py prints it)."""
    cpuinfo = [line for line in read_lines("/proc/cpuinfo") if line.startswith("model name")]
    cpu = cpuinfo[0].split(":", 1)[1].strip() if cpuinfo else platform.processor()
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        git = ["git", "-C", here, "describe", "--always", "--dirty"]
        commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    versions = {name: _version(name) for name in ("jax", "numpy", "optax", "jaxlib")}
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit or "unknown",
        "python": platform.python_version(),
        "versions": versions,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "host_cpu": cpu,
        "host_cores": os.cpu_count(),
    }


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def read_lines(path):
    """The lines of a text file, or [] when it cannot be read."""
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def check_writable(path):
    """Raise ValueError saying why when `path` (local or gs://) cannot be created and written."""
    try:
        if "://" not in path:
            os.makedirs(path, exist_ok=True)
        store = kvstore(path)
        store.write(".trmx-write-check", b"").result()
        store.delete_range(ts.KvStore.KeyRange(".trmx-write-check", ".trmx-write-check\0")).result()
    except OSError as e:
        raise ValueError(f"cannot create {path}: {e.strerror or e}") from e
    except ValueError as e:  # tensorstore's errors
        raise ValueError(f"cannot write to {path}: {str(e).splitlines()[0]}") from e


# ----------------------------------------------------------------------------- lost processes

EXIT_RESTARTABLE = 75  # the run stopped for a fault it recovers from: rerunning it resumes


class PeerWatch:
    """Ends this process within `timeout` seconds of another process of the run being gone
    (killed, its host down): one line naming it, the step and the checkpoint the run resumes
    from, exit code EXIT_RESTARTABLE; no traceback, no wait in jax.distributed's shutdown
    barrier. Without it a survivor waits in a collective or dies with a C++ stack dump when
    jax.distributed's heartbeat gives up.

    A side channel beside jax.distributed's: every process keeps a TCP connection to process
    0 (at `host`) and sends a byte a second on it; a connection that closes or stays silent
    for `timeout` seconds is a lost peer. Process 0 tells the others which one before it exits.
    `close()` says goodbye when the process finishes, so that the others stop watching it."""

    def __init__(self, host, timeout, ckpt_dir):
        from jax.experimental import multihost_utils  # noqa: PLC0415

        self.timeout, self.ckpt_dir, self.step, self.done = timeout, ckpt_dir, 0, False
        self.lock, self.conns, me = threading.Lock(), {}, jax.process_index()
        server = socket.create_server(("", 0)) if me == 0 else None
        port = multihost_utils.broadcast_one_to_all(
            np.int32(server.getsockname()[1] if server else 0)
        )
        try:
            if server:
                server.settimeout(timeout)
                for _ in range(jax.process_count() - 1):
                    conn, _ = server.accept()
                    conn.settimeout(timeout)
                    self.conns[int.from_bytes(conn.recv(4), "big")] = conn
            else:
                self.conns[0] = socket.create_connection((host, int(port)), timeout=timeout)
                self.conns[0].sendall(me.to_bytes(4, "big"))
        except OSError:
            self.lost("a peer (it did not connect)")
        for peer, conn in self.conns.items():
            threading.Thread(target=self._listen, args=(peer, conn), daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self):
        while not self.done:
            for conn in list(self.conns.values()):
                with contextlib.suppress(OSError):
                    conn.sendall(b".")
            time.sleep(1)

    def _listen(self, peer, conn):
        while not self.done:
            try:
                got = conn.recv(256)
            except OSError:  # silent for `timeout` seconds, or reset
                got = b""
            if b"!" in got:  # process 0 lost another one
                self.lost(got.split(b"!")[1].split(b"\n")[0].decode())
            elif b"f" in got:  # it stopped with an error (its own line says which)
                self.failed(f"process {peer}")
            elif b"x" in got:  # goodbye: it finished
                return
            elif not got:
                self.lost(f"process {peer}")

    def lost(self, who):
        """End this process: `who` is gone."""
        with self.lock:
            if self.done:
                return
            for conn in self.conns.values():
                with contextlib.suppress(OSError):
                    conn.sendall(f"!{who}\n".encode())
            found = []  # the newest intact checkpoint, if it can be told in a few seconds
            if self.ckpt_dir:
                t = threading.Thread(
                    target=lambda: found.append(latest(self.ckpt_dir)), daemon=True
                )
                t.start()
                t.join(min(10, self.timeout / 2))
            if found and found[0]:
                where = f"resumes from {self.ckpt_dir}/{STEP_PREFIX}{found[0][0]:08d}"
            elif self.ckpt_dir:
                where = f"resumes from the newest checkpoint in {self.ckpt_dir}, if any"
            else:
                where = "starts over (no --workdir)"
            print(
                f"train.py: lost {who} at step {self.step}; the run {where} when started "
                f"again (exit {EXIT_RESTARTABLE}: restartable)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            sys.stdout.flush()
            os._exit(EXIT_RESTARTABLE)

    def failed(self, who=None):
        """This process (`who` None) or `who` stopped with an error: tell the others, so that
        they end too, with exit code 1 (an error is not worth retrying), instead of counting
        a lost peer."""
        with self.lock:
            if self.done:
                return
            self.done = True
            self._send_and_close(b"f")
            if who is not None:
                print(f"train.py: {who} stopped with an error (its log says why)", file=sys.stderr)
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(1)

    def close(self):
        """This process finished: say goodbye, stop watching."""
        with self.lock:
            self.done = True
            self._send_and_close(b"x")

    def _send_and_close(self, message):
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.sendall(message)
                conn.shutdown(socket.SHUT_WR)  # not close(): unread heartbeats would reset it


# ----------------------------------------------------------------------------- helpers


def _steps(store):
    """All step numbers with a folder, and {step: COMMIT dict} of the committed ones."""
    steps, complete = set(), {}
    for key in (k.decode() for k in store.list().result()):
        folder = key[len(STEP_PREFIX) :].split("/", 1)[0]
        if key.startswith(STEP_PREFIX) and folder.isdigit():
            step = int(folder)
            steps.add(step)
            if key.endswith("/" + COMMIT):
                complete[step] = json.loads(store.read(key).result().value)
    return steps, complete


def _named_leaves(state):
    return {_name(path): x for path, x in jax.tree_util.tree_leaves_with_path(state)}


def _name(path) -> str:
    """A leaf's folder: its path in the state, e.g. params/blocks/0/gate_up."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _storable(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _chunks(x):
    """Chunk = one device's shard: processes never write into the same chunk."""
    return list(x.sharding.shard_shape(x.shape)) if x.ndim else []


def _owned_regions(x):
    """(index, host copy) of the parts of x this process writes: one replica of each shard
    it holds; replicated arrays are written by process 0 alone."""
    if x.is_fully_replicated:
        return (
            [(tuple(slice(None) for _ in x.shape), np.asarray(x))]
            if jax.process_index() == 0
            else []
        )
    return [(s.index, np.asarray(s.data)) for s in x.addressable_shards if s.replica_id == 0]


def _array_spec(folder, name):
    # Every chunk is stored, also one equal to the fill value: reads never depend on a
    # missing object (absent data can then only mean a broken checkpoint).
    return {
        "driver": "zarr3",
        "kvstore": f"{folder}{name}/",
        "store_data_equal_to_fill_value": True,
    }


def _index_str(index, shape):
    return (
        "["
        + ",".join(
            f"{a}:{b}" for a, b, _ in (s.indices(n) for s, n in zip(index, shape, strict=True))
        )
        + "]"
    )


def _parse_index(text):
    text = text.rstrip("]")
    if not text:
        return ()
    return tuple(slice(*map(int, part.split(":"))) for part in text.split(","))


def _sha(data):
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- PyTorch weights


def load_torch(path_or_state_dict, cfg: model.Config) -> dict:
    """Params for `model.predict` from a checkpoint saved by the official PyTorch TRM (a path
    to its torch.save file, or its state dict); its training saves the EMA weights."""
    state = path_or_state_dict
    if not isinstance(state, dict):
        with open(state, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save: zip, or a pickle
            raise ValueError("not a trmx checkpoint folder nor a PyTorch state dict file")
        try:
            import torch  # noqa: PLC0415 (optional: only to read PyTorch files)
        except ImportError as e:
            raise ImportError(
                "Reading a PyTorch checkpoint needs torch, which trmx does not require: "
                "pip install torch --index-url https://download.pytorch.org/whl/cpu"
            ) from e
        try:
            state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
            raise ValueError(f"not a PyTorch state dict file ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict):
            raise ValueError(f"a PyTorch file holding a {type(state).__name__}, not a state dict")
    to_numpy = lambda v: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v)  # noqa: E731
    return params_from_reference({k: to_numpy(v) for k, v in state.items()}, cfg)


def reference_names(cfg: model.Config) -> dict:
    """Our param path -> (reference state_dict key, transpose?)."""
    names = {
        ("embed",): ("inner.embed_tokens.embedding_weight", False),
        ("lm_head",): ("inner.lm_head.weight", True),
        ("q_head", "w"): ("inner.q_head.weight", True),
        ("q_head", "b"): ("inner.q_head.bias", False),
        ("H_init",): ("inner.H_init", False),
        ("L_init",): ("inner.L_init", False),
    }
    if cfg.puzzle_emb_ndim:
        names["puzzle_emb",] = ("inner.puzzle_emb.weights", False)
    if cfg.pos_encodings == "learned":
        names["pos",] = ("inner.embed_pos.embedding_weight", False)
    ours_theirs = {"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
    if cfg.mlp_t:
        ours_theirs.update(token_gate_up="mlp_t.gate_up_proj", token_down="mlp_t.down_proj")
    else:
        ours_theirs.update(qkv="self_attn.qkv_proj", out="self_attn.o_proj")
    for i in range(cfg.layers):
        for ours, theirs in ours_theirs.items():
            names["blocks", i, ours] = (f"inner.L_level.layers.{i}.{theirs}.weight", True)
    return names


def params_from_reference(state: dict, cfg: model.Config) -> dict:
    """Our params (float32) from a reference state dict of numpy arrays."""
    state = {_strip(k): np.asarray(v) for k, v in state.items()}
    names = reference_names(cfg)
    expected = {key for key, _ in names.values()}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(
            f"Reference state dict does not match {cfg}: missing {missing}, unexpected {extra}"
        )
    target = jax.eval_shape(lambda key: model.init_params(key, cfg), jax.random.key(0))
    params = jax.tree.map(lambda _: None, target)
    bad = []
    for path, (key, transpose) in names.items():
        value = state[key].T if transpose else state[key]
        node = params
        for p in path[:-1]:
            node = node[p]
        want = _get(target, path).shape
        if value.shape != want:
            bad.append(f"{key}: {state[key].shape} (ours {want}, transposed={transpose})")
        node[path[-1]] = np.asarray(value, np.float32)
    if bad:
        raise ValueError("Reference tensors of the wrong shape: " + "; ".join(bad))
    return params


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _strip(key: str) -> str:
    for prefix in REFERENCE_PREFIXES:
        key = key.removeprefix(prefix)
    return key
