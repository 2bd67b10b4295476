"""Training FLOPs and model FLOPs utilisation (MFU), MaxText's accounting.

Training FLOPs per step = 3 x the forward pass's matmul FLOPs (forward + 2x backward), with
B = batch rows, S = sequence length, d = d_model, H = query heads, K = kv heads, hd = head_dim,
m_i = layer i's FFN width (0 = no FFN), V = vocabulary:

  per layer   QKV projections   2·B·S·d·(H + 2K)·hd
              attention output  2·B·S·H·hd·d
              FFN (gated: U, V, W) 2·B·S·m_i·d·3
              attention scores and values, causal:
                global layer    2·B·S²·H·hd
                local layer     4·B·(S·W − W²/2)·H·hd   (sliding window W < S; W >= S = global)
  once        unembedding       2·B·S·d·V

Element-wise work (norms, softmax, RoPE, NUCL) is not counted; MFU is therefore a lower bound of
the hardware's busy fraction, as in MaxText.  Rematerialisation's recomputed forward is not
counted either (MFU, not HFU).  See docs/training.md.
"""

from __future__ import annotations

from typing import Optional

import gin
import jax

from maxnucl.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (no sparsity), matched as substrings of `device_kind`.
PEAK_FLOPS_BY_DEVICE_KIND = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def attention_flops(batch: int, seq_len: int, num_heads: int, head_dim: int,
                    window: Optional[int]) -> float:
  """Causal attention scores + values of one layer (forward); window None = global."""
  s = seq_len
  if window is None or window >= s:
    return 2.0 * batch * s * s * num_heads * head_dim
  return 4.0 * batch * (s * window - window * window / 2.0) * num_heads * head_dim


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass over [batch, seq_len] tokens."""
  tokens = float(batch) * seq_len
  d, hd = cfg.d_model, cfg.head_dim
  total = 0.0
  for width, window in zip(cfg.layer_ffn_widths, cfg.layer_windows):
    total += 2.0 * tokens * d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd  # Q, K, V
    total += 2.0 * tokens * cfg.num_heads * hd * d  # attention output
    total += 2.0 * tokens * width * d * 3  # gated FFN: U, V (in) and W (out)
    total += attention_flops(batch, seq_len, cfg.num_heads, hd, window)
  total += 2.0 * tokens * d * cfg.vocab_size  # unembedding (tied embedding matrix)
  return total


def training_flops_per_step(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """3 x forward matmul FLOPs for one optimizer step over a global batch of [batch, seq_len]."""
  return 3.0 * forward_flops(cfg, batch, seq_len)


@gin.configurable
def peak_flops_per_device(value: Optional[float] = None,
                          device: Optional[jax.Device] = None) -> Optional[float]:
  """Peak FLOP/s of one device: `value` if bound in gin, else looked up by device_kind.

  None for devices not in PEAK_FLOPS_BY_DEVICE_KIND (e.g. CPU): MFU is then reported as null.
  """
  if value is not None:
    return float(value)
  kind = (device or jax.devices()[0]).device_kind
  for key, peak in PEAK_FLOPS_BY_DEVICE_KIND:
    if key.lower() in kind.lower():
      return peak
  return None
