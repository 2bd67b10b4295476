"""Attention memory and time: `xla` (the [T, S] scores) against `chunked` (online softmax over key
blocks, recomputing backward), for the gradient of one attention layer.

For each sequence length: the compiled program's temporary memory (`memory_analysis()`, what XLA
allocates beside arguments and outputs) and the median wall time of forward + backward, for a
global layer and a sliding-window layer with Gemma-2's soft-cap.  Target: at 4096 positions the
chunked gradient needs at most a quarter of xla's memory.

    python benchmarks/attention_memory.py                       # CPU: 1024, 2048, 4096
    python benchmarks/attention_memory.py --lengths 4096 8192 --heads 8 --kv_heads 4 --head_dim 256

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxnucl.layers import attentions
from maxnucl.layers.chunked_attention import chunked_attention

import arguments  # benchmarks/arguments.py


def gradient(impl: str, window):
  def loss(q, k, v, segments):
    if impl == "xla":
      out = attentions.dot_product_attention(q, k, v, attentions.attention_mask(segments, window),
                                             scale=0.0625, softcap=50.0)
    else:
      out = chunked_attention(q, k, v, segments, scale=0.0625, softcap=50.0, window=window)
    return jnp.sum(out.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(impl, window, length, args):
  groups = args.heads // args.kv_heads
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, length, args.kv_heads, groups, args.head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, length, args.kv_heads, args.head_dim)), jnp.float32)
  segments = jnp.ones((1, length), jnp.int32)
  compiled = gradient(impl, window).lower(q, k, k, segments).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(q, k, k, segments))
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, k, segments))
    times.append(time.perf_counter() - start)
  return temp, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", type=arguments.positive_int, nargs="+",
                      default=[1024, 2048, 4096])
  parser.add_argument("--heads", type=arguments.positive_int, default=2)
  parser.add_argument("--kv_heads", type=arguments.positive_int, default=1)
  parser.add_argument("--head_dim", type=arguments.positive_int, default=32)
  parser.add_argument("--window", type=arguments.positive_int, default=512,
                      help="the sliding-window layer's W")
  parser.add_argument("--repeats", type=arguments.positive_int, default=3)
  args = parser.parse_args()
  if args.heads % args.kv_heads:
    parser.error(f"--heads {args.heads} is not a multiple of --kv_heads {args.kv_heads}")
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, float32, soft-cap 50")
  print(f"{'T':>6} {'layer':>8} {'xla MiB':>9} {'chunked MiB':>12} {'ratio':>6} "
        f"{'xla s':>7} {'chunked s':>10}")
  for length in args.lengths:
    for name, window in (("global", None), (f"W={args.window}", args.window)):
      (mx, tx), (mc, tc) = (measure(impl, window, length, args) for impl in ("xla", "chunked"))
      print(f"{length:>6} {name:>8} {mx / 2**20:>9.1f} {mc / 2**20:>12.1f} {mc / mx:>6.3f} "
            f"{tx:>7.3f} {tc:>10.3f}", flush=True)


if __name__ == "__main__":
  main()
