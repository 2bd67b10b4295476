"""Attention on the machine at hand: each implementation's gradient against the float32 reference,
its speed and its memory, for one Gemma-2-like layer (grouped heads, soft-cap, window, packed
segments).

For every implementation asked for and every sequence length: forward + backward of
`sum(attention(q, k, v))` in the compute dtype, compiled for the default backend (so on a GPU
`pallas_gpu` is compiled by Triton, on a TPU `splash` by Mosaic; elsewhere they run in Pallas's
interpreter). Reported per implementation:
- `max_rel_error`: the largest |dq|, |dk|, |dv| difference from `xla` in float32 at the highest
  matmul precision, relative to that reference gradient's largest entry;
- the median wall time of the compiled step and its temporary memory (`memory_analysis()`).

The exit status is 1 when an implementation's error is above `--tolerance` (default 2e-2, which
bfloat16 inputs meet; the CPU tests hold the kernels to 1e-5 in float32), or when one fails to
compile or run (its error message is in the JSON).

    python benchmarks/attention_check.py --impls xla chunked pallas_gpu --lengths 2048 8192  # GPU
    python benchmarks/attention_check.py --impls xla chunked splash --lengths 2048 8192      # TPU
    python benchmarks/attention_check.py --lengths 256 --heads 4 --kv_heads 2 --head_dim 32  # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from maxnucl.layers import attentions
from maxnucl.layers.chunked_attention import chunked_attention

import arguments  # benchmarks/arguments.py

IMPLS = ("xla", "chunked", "pallas_gpu", "splash", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")


def _attention(impl: str, segments, *, scale, softcap, window):
  """`impl`'s attention as a function of (q, k, v), q [B, T, K, G, H]."""
  if impl == "xla":
    mask = attentions.attention_mask(segments, window)
    return lambda q, k, v: attentions.dot_product_attention(q, k, v, mask, scale=scale,
                                                            softcap=softcap)
  if impl == "chunked":
    return lambda q, k, v: chunked_attention(q, k, v, segments, scale=scale, softcap=softcap,
                                             window=window)
  if impl == "pallas_gpu":
    from maxnucl.layers import gpu_attention  # pylint: disable=import-outside-toplevel
    return lambda q, k, v: gpu_attention.flash_attention(q, k, v, segments, scale=scale,
                                                         softcap=softcap, window=window)
  if impl == "splash":
    from maxnucl.layers.splash_attention import splash_attention  # pylint: disable=import-outside-toplevel
    return lambda q, k, v: splash_attention(q, k, v, segments, scale=scale, softcap=softcap,
                                            window=window)
  if impl == "cudnn":
    if softcap is not None:
      raise ValueError("cudnn has no soft-cap: run it with --softcap 0")
    return lambda q, k, v: attentions.cudnn_attention(q, k, v, segments, scale=scale,
                                                      window=window)
  raise ValueError(f"unknown attention implementation {impl!r}")


def _inputs(length, args):
  rng = np.random.default_rng(0)
  groups = args.heads // args.kv_heads
  q = rng.normal(size=(args.batch, length, args.kv_heads, groups, args.head_dim))
  k = rng.normal(size=(args.batch, length, args.kv_heads, args.head_dim))
  v = rng.normal(size=(args.batch, length, args.kv_heads, args.head_dim))
  segments = np.ones((args.batch, length), np.int32)  # three packed documents, then padding
  segments[:, length // 3:], segments[:, 2 * length // 3:], segments[:, -length // 16:] = 2, 3, 0
  return [jnp.asarray(x, jnp.float32) for x in (q, k, v)], jnp.asarray(segments)


def _gradient(attend):
  def loss(q, k, v, weights):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * weights)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(impl, length, args, reference_cache):
  (q, k, v), segments = _inputs(length, args)
  opts = dict(scale=args.head_dim ** -0.5, softcap=args.softcap or None,
              window=args.window or None)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  if length not in reference_cache:
    with jax.default_matmul_precision("highest"):
      reference_cache[length] = _gradient(_attention("xla", segments, **opts))(q, k, v, weights)
  expected = reference_cache[length]
  dtype = jnp.dtype(args.dtype)
  inputs = [x.astype(dtype) for x in (q, k, v)] + [weights]
  compiled = _gradient(_attention(impl, segments, **opts)).lower(*inputs).compile()
  memory = compiled.memory_analysis()
  actual = jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
  errors = {name: float(jnp.max(jnp.abs(a.astype(jnp.float32) - e)) / float(jnp.max(jnp.abs(e))))
            for name, a, e in zip("qkv", actual, expected)}
  return {"max_rel_error": max(errors.values()), "rel_errors": errors,
          "seconds": statistics.median(times),
          "temp_mib": None if memory is None else memory.temp_size_in_bytes / 2**20}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", maxsplit=1)[1])
  parser.add_argument("--impls", nargs="+", default=["xla", "chunked", "pallas_gpu"],
                      choices=IMPLS, metavar="IMPL", help=" | ".join(IMPLS))
  parser.add_argument("--lengths", type=arguments.positive_int, nargs="+", default=[2048])
  parser.add_argument("--batch", type=arguments.positive_int, default=1)
  parser.add_argument("--heads", type=arguments.positive_int, default=8,
                      help="query heads (Gemma-2-2B: 8)")
  parser.add_argument("--kv_heads", type=arguments.positive_int, default=4, help="Gemma-2-2B: 4")
  parser.add_argument("--head_dim", type=arguments.positive_int, default=256,
                      help="Gemma-2-2B: 256")
  parser.add_argument("--window", type=arguments.nonnegative_int, default=4096,
                      help="0: a global layer")
  parser.add_argument("--softcap", type=arguments.nonnegative_float, default=50.0,
                      help="0: none")
  parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
  parser.add_argument("--tolerance", type=arguments.positive_float, default=2e-2)
  parser.add_argument("--repeats", type=arguments.positive_int, default=5)
  parser.add_argument("--json", type=arguments.output_file, help="also write the results here")
  args = parser.parse_args()
  if args.heads % args.kv_heads:
    parser.error(f"--heads {args.heads} is not a multiple of --kv_heads {args.kv_heads}")
  if "cudnn" in args.impls and args.softcap:
    parser.error(f"--impls cudnn has no soft-cap: run it with --softcap 0, not {args.softcap}")
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}; "
        f"{platform.processor() or platform.machine()}), jax {jax.__version__}; heads "
        f"{args.heads}/{args.kv_heads}, head_dim {args.head_dim}, window {args.window}, soft-cap "
        f"{args.softcap}, {args.dtype}, batch {args.batch}")
  print(f"{'T':>6} {'impl':>11} {'max rel err':>12} {'ms':>9} {'temp MiB':>9}")
  rows, failed, reference_cache = [], False, {}
  for length in args.lengths:
    for impl in args.impls:
      row = {"impl": impl, "length": length}
      try:
        row.update(measure(impl, length, args, reference_cache))
        ok = row["max_rel_error"] <= args.tolerance
        temp = "-" if row["temp_mib"] is None else f"{row['temp_mib']:.1f}"
        print(f"{length:>6} {impl:>11} {row['max_rel_error']:>12.2e} "
              f"{row['seconds'] * 1e3:>9.2f} {temp:>9}{'' if ok else '  ABOVE TOLERANCE'}",
              flush=True)
      except Exception as error:  # pylint: disable=broad-except
        ok = False
        row["error"] = f"{type(error).__name__}: {error}"[:4000]
        print(f"{length:>6} {impl:>11} FAILED: {row['error'][:300]}", flush=True)
        traceback.print_exc()
      row["ok"] = ok
      failed |= not ok
      rows.append(row)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"device": device.device_kind, "backend": jax.default_backend(),
                 "jax": jax.__version__, "args": vars(args), "rows": rows}, f, indent=1)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
