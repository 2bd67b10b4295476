"""Float tolerances derived from the computation, never fitted to one CPU (tests/README.md).

Two float32 computations of the same quantity — in another order, fused differently, on another
CPU, under another XLA optimisation level — each carry a rounding error of at most n u |x|
(Higham, "Accuracy and Stability of Numerical Algorithms", sec. 3.1: a sum or dot product of n
terms is off by at most gamma_n = n u / (1 - n u) times the sum of the terms' magnitudes, u = eps/2
the unit roundoff), so they differ by at most

    terms x eps x magnitude

with `terms` the roundings accumulated along the computation and `magnitude` the size of the
values compared.  The bound is a worst case (errors of random sign grow like sqrt(terms)), so on
any one machine a comparison sits far below it; the suite asks for at least 10x headroom on the
machine that wrote the test (`MAXNUCL_TOLERANCE_LOG`, tests/tolerance_log.py, measures it).
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
EPS_BF16 = 2.0 ** -7                      # bfloat16 keeps 8 significant bits
EPS64 = float(np.finfo(np.float64).eps)  # 2**-52: float64 references (numpy, t5)


def rounding_atol(magnitude: float, terms: int, eps: float = EPS32) -> float:
  """The largest difference of two computations of values up to `magnitude` that accumulate
  `terms` roundings each: terms x eps x magnitude."""
  return float(terms) * eps * float(magnitude)


def typical_rounding_atol(magnitude: float, terms: int, eps: float = EPS32) -> float:
  """The typical size of the same difference when the roundings have random signs (they add like
  a random walk): sqrt(terms) x eps x magnitude.  A bound for a mean over many values, not for
  the largest one."""
  return float(terms) ** 0.5 * eps * float(magnitude)


def magnitude(*values) -> float:
  """The largest |value| of the arrays or numbers given (at least the smallest normal float32:
  a comparison of zeros still has a positive bound)."""
  return max([float(np.max(np.abs(np.asarray(v, np.float64)))) for v in values]
             + [float(np.finfo(np.float32).tiny)])


def decoder_terms(cfg, length: int) -> int:
  """Roundings accumulated along the path from the input to one logit of a decoder over `length`
  positions: per layer, the reductions of its norms (d each; Gemma-2 has four), the q/k/v
  projections (d), the scores (head_dim), softmax and the value mix (length each), the output
  projection (heads x head_dim), and the FFN (d into the gate and up, m out of it); then the
  final norm and the unembedding (d each)."""
  d, h = cfg.d_model, cfg.head_dim
  norms = {"gemma2": 4, "gemma3": 4, "llama": 2}.get(cfg.family, 1)
  attention = d + h + 2 * length + cfg.num_heads * h + (2 * h if cfg.qk_norm else 0)
  per_layer = [norms * d + attention + d + m for m in cfg.layer_ffn_widths]
  return sum(per_layer) + 2 * d


def bf16_rounding_sites(cfg) -> int:
  """bfloat16 roundings along the path to one logit when activations are bfloat16: reductions
  accumulate in float32 and round once, so each operation's output is one site.  Per layer:
  every norm (normalise, scale: 2), the q projection, RoPE (2), the scores and their scale and
  soft-cap (4), softmax (3), the value mix, the output projection, the FFN's gate, activation
  (4), up, product and output, and the residual additions (2); then the embedding scale, the
  final norm (2), the unembedding and its soft-cap (3)."""
  norms = 4 if cfg.family == "gemma2" else 1
  per_layer = 2 * norms + 1 + 2 + 4 + 3 + 1 + 1 + 1 + 4 + 1 + 1 + 1 + 2
  return cfg.num_layers * per_layer + 1 + 2 + 1 + 3


def gradient_terms(cfg, length: int, tokens: int) -> int:
  """Roundings along a gradient of a mean loss: the forward path, the backward path through the
  same reductions, the log-softmax over the vocabulary, and the sum over `tokens` loss tokens."""
  return 2 * decoder_terms(cfg, length) + cfg.vocab_size + tokens


def central_difference_atol(h: float, third_derivative: float, value_atol: float) -> float:
  """The largest error of a central difference (f(x + h) - f(x - h)) / 2h against f'(x): the
  truncation h^2 / 6 x |f'''| (Taylor's remainder; `third_derivative` bounds |f'''| within h of
  x) plus the rounding of the two evaluations of f (each off by at most `value_atol`, e.g.
  `rounding_atol(|f|, terms, EPS64)` for a float64 f) divided by 2h."""
  return h * h / 6.0 * float(third_derivative) + float(value_atol) / h
