"""NUCL overhead: train-step time with NUCL-mstd (alpha > 0) over the same step without it.

Both steps (`maxnucl.train.train_step`: forward, backward, Adafactor update) are compiled in one
process for the same model, batch and optimizer; the only difference is `total_loss.terms`
({} vs {'nucl_mstd': alpha}).  The two are timed interleaved (A, B, A, B, ...) so drift in the
machine's speed affects both alike; the reported overhead is median(B) / median(A).  Target: at
most 1.03.

    python benchmarks/nucl_overhead.py                                 # gemma2_tiny, CPU
    python benchmarks/nucl_overhead.py --preset gemma2_2b --batch 2 --seq_len 2048 --remat full  # GPU
    python benchmarks/nucl_overhead.py --json out.json                 # also write the figures

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from maxnucl import models
from maxnucl import train

import arguments  # benchmarks/arguments.py


def compiled_step(cfg, tx, schedule, terms, state, batch, rng):
  """train_step compiled with `total_loss.terms = terms` (gin is read while tracing)."""
  with gin.unlock_config():
    gin.bind_parameter("total_loss.terms", terms)
  step = jax.jit(functools.partial(train.train_step, cfg=cfg, tx=tx, schedule=schedule))
  return step.lower(state, batch, rng).compile()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gemma2_tiny")
  parser.add_argument("--batch", type=arguments.positive_int, default=8)
  parser.add_argument("--seq_len", type=arguments.positive_int, default=128)
  parser.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
  parser.add_argument("--remat", default=None,
                      help="remat_policy: none | full | save_dots (default: the preset's)")
  parser.add_argument("--alpha", type=arguments.positive_float, default=100.0)
  parser.add_argument("--steps", type=arguments.positive_int, default=30,
                      help="timed steps of each variant")
  parser.add_argument("--warmup", type=arguments.nonnegative_int, default=3)
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)

  overrides = {"dtype": args.dtype} if args.dtype else {}
  if args.remat:
    overrides["remat_policy"] = args.remat
  cfg = arguments.model_config(parser, args.preset, **overrides)
  gin.parse_config("import maxnucl.losses")
  schedule = train.learning_rate_schedule(1000, peak_learning_rate=1e-6, warmup_steps=0)
  tx = train.create_optimizer(schedule, name="adafactor")
  params = models.init(cfg, jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(1)
  tokens = jax.random.randint(rng, (args.batch, args.seq_len), 3, cfg.vocab_size)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": jnp.ones(tokens.shape, jnp.float32),
           "segment_ids": jnp.ones(tokens.shape, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(args.seq_len), tokens.shape)}

  def fresh_state():
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  variants = {"nll": {}, "nll+nucl_mstd": {"nucl_mstd": args.alpha}}
  steps = {name: compiled_step(cfg, tx, schedule, terms, fresh_state(), batch, rng)
           for name, terms in variants.items()}
  states = {name: fresh_state() for name in variants}
  times = {name: [] for name in variants}
  for i in range(args.warmup + args.steps):
    for name, step in steps.items():
      t0 = time.perf_counter()
      states[name], metrics = step(states[name], batch, rng)
      jax.block_until_ready((states[name], metrics))
      if i >= args.warmup:
        times[name].append(time.perf_counter() - t0)

  median = {name: statistics.median(t) for name, t in times.items()}
  result = {
      "preset": cfg.name, "batch": args.batch, "seq_len": args.seq_len, "dtype": cfg.dtype,
      "alpha": args.alpha, "steps": args.steps,
      "device": jax.devices()[0].device_kind, "platform": platform.processor() or platform.machine(),
      "step_time_s": median,
      "overhead": median["nll+nucl_mstd"] / median["nll"],
      "params": models.param_count(cfg)["total"],
  }
  print(f"{cfg.name} batch {args.batch}x{args.seq_len} {cfg.dtype} on {result['device']}: "
        f"step {median['nll'] * 1e3:.2f} ms without NUCL, {median['nll+nucl_mstd'] * 1e3:.2f} ms "
        f"with NUCL-mstd -> overhead {result['overhead']:.3f} (target <= 1.03)")
  print(f"  p10/p90 without: {np.percentile(times['nll'], 10) * 1e3:.2f}/"
        f"{np.percentile(times['nll'], 90) * 1e3:.2f} ms, with: "
        f"{np.percentile(times['nll+nucl_mstd'], 10) * 1e3:.2f}/"
        f"{np.percentile(times['nll+nucl_mstd'], 90) * 1e3:.2f} ms")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
