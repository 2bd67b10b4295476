"""Public model API (a contract: tools, tests and users call it).

    from maxnucl import models
    cfg = models.get_config("gemma2_2b", **overrides)
    params = models.init(cfg, rng)                       # plain nested dict of arrays
    logits = models.apply(cfg, params, tokens, segment_ids=None, positions=None)  # f32 [B, T, V]
    counts = models.param_count(cfg)                     # from shapes, nothing allocated
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from maxnucl import ffn
from maxnucl.models.config import (PRESETS, ConfigError, ModelConfig, get_config,
                                   register_preset)
from maxnucl.models.decoder import Decoder

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "get_config", "register_preset", "configured_model", "init",
           "apply", "apply_with_ffn", "abstract_params", "logical_axes", "param_count",
           "positions_from_segments", "ffn_layer_names"]


@gin.configurable("model_config")
def configured_model(preset: str = gin.REQUIRED, **overrides: Any) -> ModelConfig:
  """The gin entry point: `model_config.preset = "gemma2_2b"`, `model_config.num_layers = 2`."""
  return get_config(preset, **overrides)


def _dummy_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def _init_boxed(cfg: ModelConfig, rng):
  tokens = _dummy_tokens()
  return Decoder(cfg).init(rng, tokens, tokens, tokens)["params"]


def init(cfg: ModelConfig, rng: jax.Array, shardings: Any = None) -> dict:
  """Randomly initialised params (plain nested dict), optionally created directly sharded."""
  fn = jax.jit(lambda r: nn.meta.unbox(_init_boxed(cfg, r)), out_shardings=shardings)
  return fn(rng)


def abstract_params(cfg: ModelConfig) -> dict:
  """The params tree as `jax.ShapeDtypeStruct`s (no memory allocated)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.PRNGKey(0))
  return nn.meta.unbox(boxed)


def logical_axes(cfg: ModelConfig) -> dict:
  """Same tree as the params, each leaf a tuple of logical axis names (e.g. ("embed", "mlp"))."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions restarting at 0 at the start of each segment of a packed row. [B, T] -> [B, T]."""
  length = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - segment_start


def _inputs(tokens, segment_ids, positions):
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  if positions is None:
    positions = positions_from_segments(segment_ids)
  return tokens, segment_ids, jnp.asarray(positions, jnp.int32)


def apply(cfg: ModelConfig, params: dict, tokens, segment_ids=None, positions=None, *,
          dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """Float32 logits [batch, length, vocab].

  segment_ids [B, T] (packed examples never attend to each other; default: one segment per row);
  positions [B, T] (default: restart at 0 for every segment).  Dropout is active iff
  `dropout_rng` is given and cfg.dropout_rate > 0.
  """
  tokens, segment_ids, positions = _inputs(tokens, segment_ids, positions)
  if dropout_rng is None or cfg.dropout_rate == 0.0:
    return _apply(cfg, params, tokens, segment_ids, positions)
  return _apply_dropout(cfg, params, tokens, segment_ids, positions, dropout_rng)


# Jitted with the (hashable) config static; inside an outer jit these are simply inlined.
@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, segment_ids, positions):
  return Decoder(cfg, deterministic=True).apply({"params": params}, tokens, segment_ids, positions)


@functools.partial(jax.jit, static_argnums=0)
def _apply_dropout(cfg, params, tokens, segment_ids, positions, dropout_rng):
  return Decoder(cfg, deterministic=False).apply(
      {"params": params}, tokens, segment_ids, positions, rngs={"dropout": dropout_rng})


def apply_with_ffn(cfg: ModelConfig, params: dict, tokens, segment_ids=None, positions=None, *,
                   ffn_inner_scale: Optional[dict] = None) -> tuple[jax.Array, dict]:
  """Logits and every FFN's inner activation a = act(xU) * (xV).

  Returns (logits [B, T, V], {"layers_i": a_i [B, T, m_i]}).  `ffn_inner_scale` maps layer names
  to multipliers broadcastable to [B, T, m_i] applied to a; the gradient of a loss with respect to
  a multiplier of ones is a * dL/da (the loss proxy of the SCAR paper).
  """
  tokens, segment_ids, positions = _inputs(tokens, segment_ids, positions)
  return _apply_with_ffn(cfg, params, tokens, segment_ids, positions, ffn_inner_scale)


@functools.partial(jax.jit, static_argnums=0)
def _apply_with_ffn(cfg, params, tokens, segment_ids, positions, ffn_inner_scale):
  logits, state = Decoder(cfg).apply({"params": params}, tokens, segment_ids, positions,
                                     ffn_inner_scale, mutable=["intermediates"])
  inner = {name: layer["mlp"]["inner"][0]
           for name, layer in state["intermediates"].items() if "mlp" in layer}
  return logits, inner


def ffn_layer_names(cfg: ModelConfig) -> list[str]:
  """Names of the layers that have an FFN (width > 0), in order."""
  return ffn.ffn_layer_names(cfg.layer_ffn_widths)


def _group(path: tuple[str, ...]) -> str:
  if path[0] in ("embedder", "lm_head"):
    return "embedding"
  if "attn" in path:
    return "attention"
  if "mlp" in path:
    return "ffn"
  if path[-1] == "scale":
    return "norm"
  raise ValueError(f"parameter {'/'.join(path)} belongs to no known group")


def param_count(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts by group, from shapes only.

  Keys: total, embedding, attention, ffn (U, V and W), ffn_in (U and V), ffn_out (W), norm.
  """
  counts = dict.fromkeys(["total", "embedding", "attention", "ffn", "ffn_in", "ffn_out",
                          "norm"], 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
    keys = tuple(p.key for p in path)
    size = int(np.prod(leaf.shape))
    counts["total"] += size
    group = _group(keys)
    counts[group] += size
    if group == "ffn":
      counts["ffn_out" if keys[-1] == ffn.OUT else "ffn_in"] += size
  return counts
