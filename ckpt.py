"""Storage: run directories (local or gs://) and import of weights saved by the official TRM.

`kvstore(path)` opens a local directory or a gs://bucket/prefix as a tensorstore key-value
store: the one code path for files of a run, wherever they live.

`params_from_reference(state, cfg)` maps a reference `state_dict()` (as numpy arrays, keys
as the reference names them, with or without the `_orig_mod.model.` prefix that its
torch.compile'd training adds) onto `model.init_params`' pytree, strictly: a missing, extra
or mis-shaped tensor is an error that names the keys.
"""

import os

import jax
import numpy as np
import tensorstore as ts

import model

REFERENCE_PREFIXES = ("_orig_mod.", "model.")


def kvstore(path: str):
    """A tensorstore key-value store at a local directory or a gs://bucket/prefix URL."""
    url = path if "://" in path else "file://" + os.path.abspath(path)
    return ts.KvStore.open(url.rstrip("/") + "/").result()


def read_text(store, key: str) -> str:
    """The text stored under `key`, or '' if there is none."""
    found = store.read(key).result()
    return found.value.decode() if found.state == "value" else ""


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
