"""DeepMind `gemma` (flat Orbax layout) -> maxnucl params, one tensor at a time.

The flat layout is a dict of small dicts (see docs/gemma2.md):
  transformer/embedder                 input_embedding (V_pad, d) -> embedder/embedding [V, d]
                                       (rows past the config's vocab_size are padding: dropped)
  transformer/final_norm               scale (d,)         -> final_norm/scale
  transformer/layer_{i}/attn/q_einsum  w (N, d, H)        -> layers_i/attn/q [d, N, H]
  transformer/layer_{i}/attn/kv_einsum w (2, K, d, H)     -> layers_i/attn/k, v [d, K, H] ([0], [1])
  transformer/layer_{i}/attn/attn_vec_einsum w (N, H, d)  -> layers_i/attn/o [N, H, d]
  transformer/layer_{i}/mlp/gating_einsum w (2, d, m) or (2, m, d)
                                                          -> layers_i/mlp/gate (U), up (V) [d, m]
  transformer/layer_{i}/mlp/linear     w (m, d)           -> layers_i/mlp/out (W) [m, d]
  transformer/layer_{i}/{pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm}
                                       scale (d,)         -> the same names in maxnucl
Norm scales use the same `(1 + scale)` convention on both sides.  `gating_einsum` is (2, d, m) in
the 2b checkpoints and (2, m, d) in 9b/27b; the orientation is detected from the shape (when
d == m it cannot be, and `gating_layout` decides).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from maxnucl import ffn
from maxnucl.models.config import ModelConfig

GATING_LAYOUTS = ("dm", "md")  # (2, d, m) / (2, m, d)

_NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")

# maxnucl leaf -> (DeepMind key path, to_maxnucl(array, cfg))
Entry = tuple[tuple[str, str], Callable[[np.ndarray, ModelConfig], np.ndarray]]


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


def expected_shapes(cfg: ModelConfig, gating_layouts: dict[int, str]
                    ) -> dict[tuple[str, str], tuple[int, ...]]:
  """DeepMind key path -> expected shape (the embedding's row count is checked separately)."""
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {("transformer/embedder", "input_embedding"): (None, d),
         ("transformer/final_norm", "scale"): (d,)}
  for i, m in enumerate(cfg.layer_ffn_widths):
    layer = f"transformer/layer_{i}"
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
  """Every maxnucl leaf -> (DeepMind key path, to_maxnucl), in checkpoint order."""
  def embedding(w, cfg):
    return w[:cfg.vocab_size]

  def heads_first(w, cfg):  # (n, d, H) -> [d, n, H]
    return w.transpose(1, 0, 2)

  def kv(index):
    return lambda w, cfg: w[index].transpose(1, 0, 2)

  def gating(index, layout):
    return lambda w, cfg: w[index] if layout == "dm" else w[index].T

  def same(w, cfg):
    return w

  out = {("embedder", "embedding"): (("transformer/embedder", "input_embedding"), embedding)}
  for i, m in enumerate(cfg.layer_ffn_widths):
    layer, dm = ffn.layer_name(i), f"transformer/layer_{i}"
    out[(layer, "attn", "q")] = ((f"{dm}/attn/q_einsum", "w"), heads_first)
    out[(layer, "attn", "k")] = ((f"{dm}/attn/kv_einsum", "w"), kv(0))
    out[(layer, "attn", "v")] = ((f"{dm}/attn/kv_einsum", "w"), kv(1))
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
