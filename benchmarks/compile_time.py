"""Compile time of the training gradient versus depth, with scanned and with unrolled layers.

`jax.jit(jax.grad(loss))` of the model (`models.apply`, mean token NLL) is lowered and compiled
for a shallow and a deep copy of the same preset (only `num_layers` differs), once with
`scan_layers=True` and once with `scan_layers=False`.  Nothing is allocated for the lowering
(abstract params).  The figure of merit is the ratio deep / shallow of lower + compile time:
unrolled it grows with depth, scanned it should stay near 1 (target: at most 2 for 46 vs 4
layers).  With `--steps N` the compiled gradients are also run and timed, together with the cost
of stacking the per-layer params that the scanned apply pays inside every step.

    python benchmarks/compile_time.py                          # gemma2_tiny, 4 and 46 layers, CPU
    python benchmarks/compile_time.py --steps 5 --json out.json

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxnucl import losses, models
from maxnucl.models import decoder

import arguments  # benchmarks/arguments.py


def _loss(cfg, params, batch):
  logits = models.apply(cfg, params, batch["tokens"])
  return losses.nll(logits, batch, "mean")


def _timed(fn, steps: int) -> float:
  """Median seconds of `fn()` (blocking) over `steps` calls, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(cfg, batch_size: int, seq_len: int, steps: int) -> dict:
  """Lower and compile seconds of the gradient of `cfg`; with steps > 0 also step seconds."""
  jax.clear_caches()  # no compilation reused from another variant
  params = models.abstract_params(cfg)
  batch = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
           "targets": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)}
  grad = jax.jit(jax.grad(lambda p, b: _loss(cfg, p, b)))
  start, cpu_start = time.perf_counter(), time.process_time()
  lowered = grad.lower(params, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # Process CPU seconds as well: wall time on a shared machine also counts other processes.
  out = {"layers": cfg.num_layers, "scan_layers": cfg.scan_layers, "lower_s": lower_s,
         "compile_s": compile_s, "total_s": lower_s + compile_s,
         "cpu_s": time.process_time() - cpu_start}
  if steps:
    real_params = models.init(cfg, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, cfg.vocab_size, (batch_size, seq_len + 1)), jnp.int32)
    real_batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                  "loss_mask": jnp.ones((batch_size, seq_len), jnp.float32)}
    out["step_s"] = _timed(lambda: compiled(real_params, real_batch), steps)
    if cfg.scan_layers:
      runs = [run for run in decoder.scan_runs(cfg) if len(run) > 1]
      stack = jax.jit(lambda p: [decoder.stack_run(p, run) for run in runs])
      out["stack_s"] = _timed(lambda: stack(real_params), steps)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gemma2_tiny")
  parser.add_argument("--shallow", type=arguments.positive_int, default=4,
                      help="layers of the shallow model")
  parser.add_argument("--deep", type=arguments.positive_int, default=46,
                      help="layers of the deep model")
  parser.add_argument("--batch", type=arguments.positive_int, default=2)
  parser.add_argument("--seq_len", type=arguments.positive_int, default=64)
  parser.add_argument("--steps", type=arguments.nonnegative_int, default=0,
                      help="also time this many gradient steps of each variant (0: compile only)")
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)
  for depth in (args.shallow, args.deep):
    arguments.model_config(parser, args.preset, num_layers=depth)

  rows = []
  for scan in (True, False):
    for depth in (args.shallow, args.deep):
      cfg = models.get_config(args.preset, num_layers=depth, scan_layers=scan)
      rows.append(measure(cfg, args.batch, args.seq_len, args.steps))

  print(f"{args.preset}, batch {args.batch} x {args.seq_len}, jax {jax.__version__}, "
        f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})")
  header = (f"{'layers':>6} {'scan':>5} {'lower s':>8} {'compile s':>10} {'total s':>8} "
            f"{'cpu s':>7}")
  if args.steps:
    header += f" {'step s':>8} {'stack s':>8}"
  print(header)
  for row in rows:
    line = (f"{row['layers']:>6} {str(row['scan_layers']):>5} {row['lower_s']:>8.2f} "
            f"{row['compile_s']:>10.2f} {row['total_s']:>8.2f} {row['cpu_s']:>7.2f}")
    if args.steps:
      stack = f"{row['stack_s']:>8.4f}" if "stack_s" in row else f"{'-':>8}"
      line += f" {row['step_s']:>8.4f} {stack}"
    print(line)
  ratios = {}
  for scan in (True, False):
    shallow, deep = [r for r in rows if r["scan_layers"] == scan]
    name = "scanned" if scan else "unrolled"
    ratios[name] = deep["total_s"] / shallow["total_s"]
    ratios[name + "_cpu"] = deep["cpu_s"] / shallow["cpu_s"]
  print(f"compile ratio {args.deep}/{args.shallow} layers (wall / cpu): "
        f"scanned {ratios['scanned']:.2f}x / {ratios['scanned_cpu']:.2f}x, "
        f"unrolled {ratios['unrolled']:.2f}x / {ratios['unrolled_cpu']:.2f}x "
        f"(target for scanned: <= 2x)")
  result = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "rows": rows,
            "ratio_deep_over_shallow": ratios, "backend": jax.devices()[0].platform}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
