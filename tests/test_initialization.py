"""Initialisation: every kernel of every preset starts with standard deviation 1/sqrt(fan_in),
fan_in = the product of the axes its einsum contracts over (MaxText's `DenseGeneral` rule), and
the other parameters start where docs/models.md says."""

import collections
import math
import re

import jax
import numpy as np
import pytest

from maxnucl import models
from maxnucl.models import config as model_config

# The axes each kernel's einsum contracts with its input (layers/attentions.py, layers/linears.py):
# q, k, v "BTD,DNH->BTNH": D; o "BTNH,NHD->BTD": N and H; gate, up "BTD,DM->BTM": D;
# out "BTM,MD->BTD": M.
FAN_IN_AXES = {"q": (0,), "k": (0,), "v": (0,), "o": (0, 1), "gate": (0,), "up": (0,),
               "out": (0,)}
# jax's truncated normal cuts the underlying normal at +-2 sigma and rescales it to unit variance
TRUNCATION = 2.0 / 0.87962566103423978
# Presets up to this many parameters are initialised whole; larger ones as two small models that
# keep every fan-in of the preset (see _models_with_the_fan_ins_of).
WHOLE_MODEL_LIMIT = 60_000_000


def _models_with_the_fan_ins_of(cfg):
  """Models whose kernels have exactly `cfg`'s fan-ins, small enough to initialise here: one keeps
  d_model (the fan-in of q, k, v, gate, up) and shrinks the heads, FFN width and vocabulary; the
  other keeps heads x head_dim (o) and the FFN width (out) and shrinks d_model and the vocabulary.
  Two layers (a local/global pair where the pattern has one)."""
  if models.param_count(cfg)["total"] <= WHOLE_MODEL_LIMIT:
    return [cfg]
  # The special token ids move into the shrunk vocabulary (they do not touch any kernel).
  small_vocab = dict(vocab_size=64, pad_id=0, eos_id=1, bos_id=2)
  keep_d = cfg.replace(num_layers=2, num_heads=1, num_kv_heads=1, head_dim=8, ffn_dim=8,
                       query_pre_attn_scalar=None, **small_vocab)
  keep_inner = cfg.replace(num_layers=2, d_model=8, **small_vocab)
  return [keep_d, keep_inner]


def _kernels_by_kind(params):
  """{(path without the layer index, fan-in): [arrays]}: one kind pooled over layers."""
  pooled = collections.defaultdict(list)
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    if keys[-1] in FAN_IN_AXES and keys[-2] in ("attn", "mlp"):
      fan_in = math.prod(value.shape[a] for a in FAN_IN_AXES[keys[-1]])
      kind = re.sub(r"layers_\d+", "layers_*", "/".join(keys))
      pooled[(kind, fan_in)].append(np.asarray(value, np.float64).ravel())
  return pooled


@pytest.mark.parametrize("preset", sorted(model_config.PRESETS))
def test_every_kernel_starts_with_std_one_over_sqrt_fan_in(preset):
  """Measured over each kernel kind pooled across layers.  The sample standard deviation of N
  draws has a relative standard error of sqrt((kurtosis - 1) / 4N) <= 1/sqrt(2N) (a normal's
  kurtosis is 3, the truncated normal's less); six of them is the tolerance (a chance failure
  has probability ~1e-9), 2 % for the smallest kinds (N ~ 10^5) down to 0.2 %.  The defect this
  guards against (the output axes counted as receptive field) was off by sqrt(fan_out): >= 4x."""
  checked = set()
  for cfg in _models_with_the_fan_ins_of(model_config.PRESETS[preset]()):
    params = models.init(cfg, jax.random.PRNGKey(0))
    for (kind, fan_in), arrays in _kernels_by_kind(params).items():
      values = np.concatenate(arrays)
      expected = fan_in ** -0.5
      tolerance = 6.0 / math.sqrt(2 * values.size)
      measured = values.std()
      assert abs(measured / expected - 1) <= tolerance, (
          f"{preset} {kind}: std {measured:.5f}, 1/sqrt(fan_in={fan_in}) = {expected:.5f}")
      # truncated at two standard deviations of the underlying normal
      assert np.abs(values).max() <= TRUNCATION * expected * (1 + 1e-6), kind
      checked.add(kind.rsplit("/", 1)[-1])
  assert checked == set(FAN_IN_AXES), checked


@pytest.mark.parametrize("preset", ["gemma2_tiny", "gemma3_tiny", "llama_tiny", "palm_tiny"])
def test_embedding_and_norm_scales_start_as_documented(preset):
  """Gemma's embedding: std 1/sqrt(d) (the lookup is multiplied by sqrt(d): unit-scale inputs);
  Llama's input and output tables: 1/sqrt(d) (unscaled logits of unit-RMS hidden states);
  PaLM's: std 1 (logits divided by sqrt(d)).  Norm scales: 0 under Gemma's (1 + scale) offset,
  1 otherwise; both make every norm the identity scale at step 0."""
  cfg = model_config.PRESETS[preset]()
  params = models.init(cfg, jax.random.PRNGKey(0))
  expected = 1.0 if cfg.family == "palm" else cfg.d_model ** -0.5
  tables = [params["embedder"]["embedding"]] + (
      [] if cfg.tie_embeddings else [params["lm_head"]["embedding"]])
  for table in tables:
    table = np.asarray(table, np.float64)
    assert abs(table.std() / expected - 1) <= 6.0 / math.sqrt(2 * table.size)
  effective_scales = [np.asarray(v) + (1.0 if cfg.norm_offset else 0.0)
                      for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
                      if path[-1].key == "scale"]
  assert effective_scales and all(np.all(s == 1.0) for s in effective_scales)
