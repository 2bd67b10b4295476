"""DeepMind `gemma` (Orbax) -> maxnucl params, one tensor at a time.

Two layouts of the same tensors are read (DeepMind's `gemma` library, gm/ckpts/_checkpoint.py):
  flat    the released checkpoints: a dict of small dicts, `transformer/layer_0/attn/q_einsum`
          -> {"w": ...}
  nested  what `gm.ckpts.save_params` writes (the Flax `model.init()["params"]` tree, e.g. after
          fine-tuning with the library): no `transformer/` prefix, `layer_0/attn/q_einsum/w`, and
          the MLP's matrices without `/w` (`layer_0/mlp/gating_einsum`, `layer_0/mlp/linear`).
Keys below are written in the flat layout (`FlatKey`); `flat_key` maps a nested path onto it.

  transformer/embedder                 input_embedding (V_pad, d) -> embedder/embedding [V, d]
                                       (rows past the config's vocab_size are padding: dropped)
  transformer/final_norm               scale (d,)         -> final_norm/scale
  transformer/layer_{i}/attn/q_einsum  w (N, d, H)        -> layers_i/attn/q [d, N, H]
  transformer/layer_{i}/attn/kv_einsum w (2, K, d, H)     -> layers_i/attn/k, v [d, K, H] ([0], [1])
  transformer/layer_{i}/attn/qkv_einsum w (3, N, d, H)    -> layers_i/attn/q, k, v [d, N, H]
                                       (instead of q_ and kv_einsum when K == N, as the library
                                       builds such models)
  transformer/layer_{i}/attn/attn_vec_einsum w (N, H, d)  -> layers_i/attn/o [N, H, d]
  transformer/layer_{i}/mlp/gating_einsum w (2, d, m) or (2, m, d)
                                                          -> layers_i/mlp/gate (U), up (V) [d, m]
  transformer/layer_{i}/mlp/linear     w (m, d)           -> layers_i/mlp/out (W) [m, d]
  transformer/layer_{i}/{pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm}
                                       scale (d,)         -> the same names in maxnucl
Norm scales use the same `(1 + scale)` convention on both sides.  `gating_einsum` is (2, d, m) in
the 2b checkpoints and (2, m, d) in 9b/27b; the orientation is detected from the shape (when
d == m it cannot be, and `gating_layout` decides).

The checkpoint does not store the query scale: a config's `query_pre_attn_scalar` must be right
(head_dim for Gemma-2 2b and 9b, d_model / num_heads = 144 for 27b; the presets have it).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np

from maxnucl import ffn, paths
from maxnucl.models.config import ModelConfig

GATING_LAYOUTS = ("dm", "md")  # (2, d, m) / (2, m, d)
FLAT, NESTED = "flat", "nested"
TOKENIZER = "tokenizer.model"  # beside the checkpoint folder in DeepMind's downloads
# Files that make a directory an Orbax checkpoint (older Orbax versions wrote no _METADATA).
_CHECKPOINT_FILES = ("_METADATA", "manifest.ocdbt", "checkpoint")

_NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
_PREFIX = "transformer/"

FlatKey = tuple[str, str]  # ("transformer/layer_0/attn/q_einsum", "w")
Shapes = dict[FlatKey, tuple[int, ...]]
# maxnucl leaf -> (DeepMind key, to_maxnucl(array, cfg))
Entry = tuple[FlatKey, Callable[[np.ndarray, ModelConfig], np.ndarray]]


# ---- where the checkpoint is, and which layout it has --------------------------------------------

def find_checkpoint(directory) -> tuple[paths.Path, Optional[paths.Path]]:
  """(the Orbax checkpoint, the tokenizer.model beside it or None) of `directory`: the checkpoint
  itself, or a download folder holding it as its one subfolder (DeepMind's `gemma2-2b/` with
  `gemma2-2b/` and `tokenizer.model`)."""
  directory = paths.as_path(directory)
  if not directory.is_dir():
    problem = "is not a directory" if directory.exists() else "does not exist"
    raise FileNotFoundError(f"{directory} {problem} (expected a DeepMind Orbax checkpoint or the "
                            f"folder holding it)")
  tokenizer = directory / TOKENIZER
  tokenizer = tokenizer if tokenizer.is_file() else None
  if _is_checkpoint(directory):
    return directory, tokenizer
  found = sorted((p for p in directory.iterdir() if p.is_dir() and _is_checkpoint(p)),
                 key=lambda p: p.name)
  if len(found) != 1:
    held = f"{len(found)}: {[p.name for p in found]}" if found else "none"
    raise FileNotFoundError(f"{directory} is no Orbax checkpoint (no {_CHECKPOINT_FILES[0]}) "
                            f"and holds one checkpoint folder only if it is a DeepMind "
                            f"download; its checkpoint folders: {held}")
  return found[0], tokenizer


def _is_checkpoint(directory) -> bool:
  return any((directory / name).exists() for name in _CHECKPOINT_FILES)


def flat_key(path: tuple[str, ...]) -> FlatKey:
  """The flat layout's key of a nested layout's leaf path (`gm.ckpts`' `_nested_to_flat`)."""
  if len(path) >= 2 and path[-2] == "mlp":  # the MLP's matrices are stored without "/w"
    return _PREFIX + "/".join(path), "w"
  return _PREFIX + "/".join(path[:-1]), path[-1]


def stored_keys(stored: dict[tuple[str, ...], object]) -> tuple[str, dict[FlatKey, tuple]]:
  """(layout, flat key -> the stored key path) of a checkpoint's leaf paths."""
  if stored and all(len(k) == 2 and k[0].startswith(_PREFIX) for k in stored):
    return FLAT, {k: k for k in stored}
  if stored and not any(k[0].startswith(_PREFIX) for k in stored):
    return NESTED, {flat_key(k): k for k in stored}
  sample = sorted("/".join(k) for k in stored)[:3]
  raise ValueError(f"neither DeepMind layout (flat `transformer/layer_0/attn/q_einsum/w` or "
                   f"nested `layer_0/attn/q_einsum/w`): stored tensors {sample}")


def stored_name(key: FlatKey, layout: str) -> str:
  """How the error messages name a tensor: as the checkpoint stores it."""
  if layout == FLAT:
    return "/".join(key)
  path = key[0].removeprefix(_PREFIX)
  return path if path.split("/")[-2:-1] == ["mlp"] else f"{path}/{key[1]}"


# ---- the model the checkpoint holds, against the config ------------------------------------------

def checkpoint_sizes(shapes: Shapes) -> dict[str, object]:
  """The config's key sizes as the stored shapes give them (those the stored tensors show)."""
  sizes: dict[str, object] = {}
  layers = sorted({int(m.group(1)) for key in shapes
                   if (m := re.match(r"transformer/layer_(\d+)/", key[0]))})
  embedding = shapes.get(("transformer/embedder", "input_embedding"))
  if embedding and len(embedding) == 2:
    sizes["d_model"] = embedding[1]
  if layers:
    sizes["num_layers"] = layers[-1] + 1
  layer = "transformer/layer_0/attn"
  q, kv = shapes.get((f"{layer}/q_einsum", "w")), shapes.get((f"{layer}/kv_einsum", "w"))
  qkv = shapes.get((f"{layer}/qkv_einsum", "w"))
  if qkv and len(qkv) == 4:
    sizes.update(num_heads=qkv[1], num_kv_heads=qkv[1], head_dim=qkv[3])
  if q and len(q) == 3:
    sizes.update(num_heads=q[0], head_dim=q[2])
  if kv and len(kv) == 4:
    sizes["num_kv_heads"] = kv[1]
  widths = [shapes.get((f"transformer/layer_{i}/mlp/linear", "w"), (0,))[0] for i in layers]
  if layers and len(set(widths)) == 1:
    sizes["ffn_dim"] = widths[0]
  elif layers:
    sizes["layer FFN widths"] = tuple(widths)
  order = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim")
  return {name: sizes[name] for name in sorted(sizes, key=lambda n: (order + (n,)).index(n))}


def size_mismatch(sizes: dict[str, object], cfg: ModelConfig) -> Optional[str]:
  """One line naming each key size in which the checkpoint and `cfg` differ, or None."""
  widths = cfg.layer_ffn_widths
  own = {"d_model": cfg.d_model, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
         "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
         "ffn_dim": widths[0] if len(set(widths)) == 1 else widths,
         "layer FFN widths": tuple(widths)}
  differ = [(name, value, own[name]) for name, value in sizes.items() if value != own[name]]
  if not differ:
    return None
  return ("the checkpoint's " + ", ".join(f"{n} is {v}" for n, v, _ in differ)
          + f"; model {cfg.name!r} has " + ", ".join(f"{n} {o}" for n, _, o in differ)
          + " (give the --size or --config of this checkpoint)")


def default_gating_layout(cfg: ModelConfig) -> str:
  """The orientation DeepMind used for a model of this size: (2, d, m) for 2b, else (2, m, d)."""
  return "dm" if cfg.d_model == 2304 else "md"


def gating_layout_of(shape: tuple[int, ...], cfg: ModelConfig, layer: int,
                     fallback: Optional[str] = None) -> str:
  d, m = cfg.d_model, cfg.layer_ffn_widths[layer]
  if d == m:
    return fallback or default_gating_layout(cfg)
  if tuple(shape) == (2, d, m):
    return "dm"
  if tuple(shape) == (2, m, d):
    return "md"
  raise ValueError(f"transformer/layer_{layer}/mlp/gating_einsum has shape {tuple(shape)}; "
                   f"expected (2, {d}, {m}) or (2, {m}, {d})")


def fused_qkv(cfg: ModelConfig) -> bool:
  """Whether the library stores one `qkv_einsum` (as many KV heads as query heads)."""
  return cfg.num_kv_heads == cfg.num_heads


def expected_shapes(cfg: ModelConfig, gating_layouts: dict[int, str]
                    ) -> dict[FlatKey, tuple[Optional[int], ...]]:
  """DeepMind key -> expected shape (the embedding's row count is checked separately)."""
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {("transformer/embedder", "input_embedding"): (None, d),
         ("transformer/final_norm", "scale"): (d,)}
  for i, m in enumerate(cfg.layer_ffn_widths):
    layer = f"transformer/layer_{i}"
    if fused_qkv(cfg):
      out[(f"{layer}/attn/qkv_einsum", "w")] = (3, n, d, h)
    else:
      out[(f"{layer}/attn/q_einsum", "w")] = (n, d, h)
      out[(f"{layer}/attn/kv_einsum", "w")] = (2, k, d, h)
    out[(f"{layer}/attn/attn_vec_einsum", "w")] = (n, h, d)
    for norm in _NORMS:
      if m or "ffw" not in norm:
        out[(f"{layer}/{norm}", "scale")] = (d,)
    if m:
      out[(f"{layer}/mlp/gating_einsum", "w")] = ((2, d, m) if gating_layouts[i] == "dm"
                                                  else (2, m, d))
      out[(f"{layer}/mlp/linear", "w")] = (m, d)
  return out


def tensor_map(cfg: ModelConfig, gating_layouts: dict[int, str]
               ) -> dict[tuple[str, ...], Entry]:
  """Every maxnucl leaf -> (DeepMind key, to_maxnucl), in checkpoint order (the leaves read from
  one stored tensor follow each other)."""
  def embedding(w, cfg):
    return w[:cfg.vocab_size]

  def heads_first(w, cfg):  # (n, d, H) -> [d, n, H]
    return w.transpose(1, 0, 2)

  def part(index):  # one of a stacked (q,) k, v
    return lambda w, cfg: w[index].transpose(1, 0, 2)

  def gating(index, layout):
    return lambda w, cfg: w[index] if layout == "dm" else w[index].T

  def same(w, cfg):
    return w

  out = {("embedder", "embedding"): (("transformer/embedder", "input_embedding"), embedding)}
  for i, m in enumerate(cfg.layer_ffn_widths):
    layer, dm = ffn.layer_name(i), f"transformer/layer_{i}"
    if fused_qkv(cfg):
      for index, name in enumerate(("q", "k", "v")):
        out[(layer, "attn", name)] = ((f"{dm}/attn/qkv_einsum", "w"), part(index))
    else:
      out[(layer, "attn", "q")] = ((f"{dm}/attn/q_einsum", "w"), heads_first)
      out[(layer, "attn", "k")] = ((f"{dm}/attn/kv_einsum", "w"), part(0))
      out[(layer, "attn", "v")] = ((f"{dm}/attn/kv_einsum", "w"), part(1))
    out[(layer, "attn", "o")] = ((f"{dm}/attn/attn_vec_einsum", "w"), same)
    for norm in _NORMS:
      if m or "ffw" not in norm:
        out[(layer, norm, "scale")] = ((f"{dm}/{norm}", "scale"), same)
    if m:
      out[(layer, "mlp", ffn.GATE)] = ((f"{dm}/mlp/gating_einsum", "w"), gating(0, gating_layouts[i]))
      out[(layer, "mlp", ffn.UP)] = ((f"{dm}/mlp/gating_einsum", "w"), gating(1, gating_layouts[i]))
      out[(layer, "mlp", ffn.OUT)] = ((f"{dm}/mlp/linear", "w"), same)
  out[("final_norm", "scale")] = (("transformer/final_norm", "scale"), same)
  return out
