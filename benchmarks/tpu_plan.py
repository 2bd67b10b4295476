"""Plan a Gemma-2 NUCL fine-tuning run on a TPU slice: mesh, memory per chip, expected step time.

    python benchmarks/tpu_plan.py                                   # the tables of docs/tpu.md
    python benchmarks/tpu_plan.py --slices v5litepod-16,v5p-32 --mfu 0.35
    python benchmarks/tpu_plan.py --runs gin/gemma2_9b_mbpp.gin --json plan.json
    python benchmarks/tpu_plan.py --gin_param="model_config.param_dtype = 'bfloat16'"

Nothing is allocated and no accelerator is needed: every number comes from the code.  Each run
file is parsed as the trainer parses it (model preset, param and compute dtypes, remat policy,
optimizer, batch, sequence length, accumulation steps), then for each slice:

  mesh        (data, fsdp, tensor) = (1, f, n / f) with f the largest divisor of the chip count n
              that divides the microbatch: the trainer refuses a microbatch that the data x fsdp
              shards do not divide (train._check_data), and the input pipeline a batch that the
              hosts do not divide.  When the batch is not a multiple of the host count the batch
              is raised to the least common multiple (marked *): the paper's 16 rows do not spread
              over 64 hosts.
  params,     the bytes of this chip's shard of every parameter, gradient and optimizer
  grads,      statistic, from `models.abstract_params`, `jax.eval_shape(tx.init)` of the gin
  opt state   optimizer and `train.state_shardings` on an abstract mesh of that shape (the
              trainer's own placement: a dimension the mesh axis does not divide is replicated).
  activations an estimate for remat 'full' (the recipe's): each layer's saved input
              [b, S, d] in the compute dtype, plus the larger of one layer's recomputation
              (attention scores/probabilities/their gradient in float32, 3 x [b, N/t, S, S];
              FFN gate, up, product and gradients, 6 x [b, S, m/t]) and the output layer
              (float32 logits, their soft-capped value and gradient, 3 x [b, S, V/t]); b rows
              per chip, t = tensor.  Other policies keep every layer's working set (an upper
              bound).  XLA's own buffer assignment decides the real peak: measure it on the
              slice (the trainer logs compile-time memory when JAX reports it).
  step time   training_flops_per_step (maxnucl/flops.py: 3 x forward matmul FLOPs, remat's
              recomputation not counted) / (chips x peak bf16 FLOP/s x MFU), MFU assumed (--mfu,
              default 0.4).

Per chip: v5e 16 GiB HBM, 197 TFLOP/s; v5p 95 GiB, 459 TFLOP/s (maxnucl/tpu_vm.py GENERATIONS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only; no accelerator is touched

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from maxnucl import flops, gin_config, models, outputs, sharding, train, tpu_vm  # noqa: E402

GIB = 2.0 ** 30
TIGHT = 0.85  # above this fraction of HBM the estimate leaves too little room to count on
DEFAULT_RUNS = ("gin/gemma2_2b_gsm8k.gin", "gin/gemma2_9b_gsm8k.gin", "gin/gemma2_27b_gsm8k.gin")
DEFAULT_SLICES = ("v5litepod-8", "v5litepod-16", "v5litepod-32", "v5litepod-64", "v5litepod-256",
                  "v5p-8", "v5p-16", "v5p-32")


def _macro_value(value):
  """A gin binding's value with a macro reference (%NAME) resolved."""
  if isinstance(value, gin.config.ConfigurableReference):
    return gin.query_parameter("%" + value.scoped_selector.rsplit("/", 1)[0])
  return value


def read_run(gin_file: str, gin_params: Sequence[str] = ()) -> dict:
  """What the plan needs from a run file (and bindings), read as the trainer reads them."""
  return with_shapes(read_settings(gin_file, gin_params))


def read_settings(gin_file: str, gin_params: Sequence[str] = ()) -> dict:
  """The run file's settings (GinConfigError, OSError, ... for a bad file or binding)."""
  gin.clear_config()
  try:
    gin_config.parse([gin_file], list(gin_params))
    cfg = models.configured_model()
    run = {
        "gin_file": gin_file, "cfg": cfg,
        "batch": int(_macro_value(gin.query_parameter("create_data_iterator.batch_size"))),
        "seq_len": int(_macro_value(gin.query_parameter("create_data_iterator.seq_len"))),
        "accumulation_steps": int(gin.query_parameter("train_loop.accumulation_steps")),
        "num_steps": int(gin.query_parameter("train_loop.num_steps")),
        "rules": sharding.logical_axis_rules(),
    }
    run["tx"] = train.create_optimizer(optax.constant_schedule(1e-6))
  finally:
    gin.clear_config()
  return run


def with_shapes(run: dict) -> dict:
  """`run` with its params' and optimizer state's shapes."""
  cfg, tx = run["cfg"], run["tx"]
  # The shapes, once per run (tracing a 42-layer model takes seconds); placed per mesh in `plan`.
  run["abstract_params"] = models.abstract_params(cfg)
  run["logical_axes"] = models.logical_axes(cfg)
  run["abstract_opt_state"] = jax.eval_shape(tx.init, run["abstract_params"])
  return run


def state_shardings(run: dict, mesh) -> tuple:
  """The shardings of the params and the optimizer state, as `train.state_shardings` places
  them (the same two functions), from the shapes `read_run` traced once."""
  param_sh = sharding.tree_shardings(run["logical_axes"], run["abstract_params"], mesh,
                                     run["rules"])
  like_params = train._like_params  # pylint: disable=protected-access
  opt_sh = like_params(run["abstract_opt_state"], run["abstract_params"], param_sh, mesh)
  return param_sh, opt_sh


def choose_mesh(chips: int, hosts: int, batch: int, accumulation_steps: int
                ) -> tuple[tuple[int, int, int], int]:
  """((data, fsdp, tensor), batch): fsdp as wide as the microbatch allows, the rest tensor."""
  if batch % hosts:
    batch = math.lcm(batch, hosts)
  micro = batch // accumulation_steps
  fsdp = math.gcd(chips, micro)
  return (1, fsdp, chips // fsdp), batch


def _shard_bytes(abstract_tree, sharding_tree) -> float:
  total = 0.0
  for leaf, sh in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree)):
    total += float(np.prod(sh.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  return total


def _split(dim: int, ways: int) -> int:
  """A dimension's size per chip: split if the mesh axis divides it, else replicated."""
  return dim // ways if dim % ways == 0 else dim


def activation_bytes(cfg, rows: int, seq_len: int, tensor: int) -> float:
  """The activation estimate of the module docstring, per chip."""
  act = np.dtype(jax.numpy.dtype(cfg.dtype)).itemsize
  heads, mlp = _split(cfg.num_heads, tensor), _split(cfg.ffn_dim, tensor)
  vocab = _split(cfg.vocab_size, tensor)
  saved = cfg.num_layers * rows * seq_len * cfg.d_model * act
  attention = 3 * rows * heads * seq_len * seq_len * 4
  ffn = 6 * rows * seq_len * mlp * act
  layer = attention + ffn
  logits = 3 * rows * seq_len * vocab * 4
  if cfg.remat_policy == "full":
    return saved + max(layer, logits)
  return saved + cfg.num_layers * layer + logits


def plan(run: dict, accelerator: tpu_vm.AcceleratorType, mfu: float) -> dict:
  cfg, generation = run["cfg"], accelerator.generation
  shape, batch = choose_mesh(accelerator.chips, accelerator.hosts, run["batch"],
                             run["accumulation_steps"])
  param_sh, opt_sh = state_shardings(run, AbstractMesh(shape, sharding.MESH_AXES))
  params = _shard_bytes(run["abstract_params"], param_sh)
  opt_state = _shard_bytes(run["abstract_opt_state"], opt_sh)
  rows = batch // run["accumulation_steps"] // (shape[0] * shape[1])
  activations = activation_bytes(cfg, rows, run["seq_len"], shape[2])
  total = 2 * params + opt_state + activations  # gradients: the params' dtype and sharding
  step_flops = flops.training_flops_per_step(cfg, batch, run["seq_len"])
  step_s = step_flops / (accelerator.chips * generation.peak_bf16_flops * mfu)
  return {
      "model": cfg.name, "gin_file": run["gin_file"], "slice": accelerator.text,
      "chips": accelerator.chips, "hosts": accelerator.hosts, "mesh": shape, "batch": batch,
      "batch_raised": batch != run["batch"], "rows_per_chip": rows, "seq_len": run["seq_len"],
      "param_dtype": cfg.param_dtype,
      "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run["abstract_params"])),
      "gib_per_chip": {"params": params / GIB, "grads": params / GIB,
                       "opt_state": opt_state / GIB, "activations": activations / GIB,
                       "total": total / GIB},
      "hbm_gib": generation.hbm_gib, "hbm_fraction": total / GIB / generation.hbm_gib,
      "step_tflop": step_flops / 1e12, "mfu": mfu, "step_s": step_s,
      "num_steps": run["num_steps"], "run_hours": step_s * run["num_steps"] / 3600,
      "chip_hours": step_s * run["num_steps"] * accelerator.chips / 3600,
  }


def _mesh_param(row: dict) -> str:
  data, fsdp, tensor = row["mesh"]
  return "(1, -1, 1)" if tensor == 1 and data == 1 else f"({data}, {fsdp}, {tensor})"


def markdown(rows: list[dict]) -> str:
  lines = ["| model | slice (chips/hosts) | `create_mesh.shape` | batch | rows/chip | params | "
           "grads | opt state | activations | total GiB/chip | HBM | step (s) | run (h) | "
           "chip-hours |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    g = r["gib_per_chip"]
    fraction = r["hbm_fraction"]
    fit = " **over**" if fraction > 1 else " (tight)" if fraction > TIGHT else ""
    lines.append(
        f"| {r['model']} ({r['param_dtype']}) | {r['slice']} ({r['chips']}/{r['hosts']}) | "
        f"{_mesh_param(r)} | {r['batch']}{'*' if r['batch_raised'] else ''} | "
        f"{r['rows_per_chip']} | {g['params']:.2f} | {g['grads']:.2f} | {g['opt_state']:.3f} | "
        f"{g['activations']:.2f} | {g['total']:.1f}{fit} | {r['hbm_gib']:.0f} | "
        f"{r['step_s']:.2f} | {r['run_hours']:.2f} | {r['chip_hours']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                      help="comma-separated run files (default: %(default)s)")
  parser.add_argument("--slices", default=",".join(DEFAULT_SLICES),
                      help="comma-separated accelerator types (default: %(default)s)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="binding applied to every run file, e.g. \"model_config.param_dtype "
                           "= 'bfloat16'\" (repeatable)")
  parser.add_argument("--mfu", type=float, default=0.4,
                      help="assumed model FLOPs utilisation (default: %(default)s)")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  args = parser.parse_args(argv)
  if not 0 < args.mfu <= 1:
    parser.error(f"--mfu {args.mfu}: expected a fraction in (0, 1]")
  try:
    accelerators = [tpu_vm.parse_accelerator_type(s) for s in args.slices.split(",") if s]
  except tpu_vm.UsageError as error:
    parser.error(str(error).replace("--accelerator_type", "--slices", 1))
  gin_files = [f for f in args.runs.split(",") if f]
  if not accelerators or not gin_files:
    parser.error(f"--{'slices' if not accelerators else 'runs'}: expected at least one")
  if args.json:
    try:
      outputs.check_output_file(args.json, {}, flag="--json")
    except outputs.OutputPathError as error:
      parser.error(str(error))
  try:  # every run file's settings before any shape is traced
    settings = [read_settings(gin_file, args.gin_param) for gin_file in gin_files]
  except (OSError, ValueError, KeyError, SyntaxError) as error:
    parser.error(" ".join(gin_config.error_message(error).split()))
  rows = []
  for run in map(with_shapes, settings):
    rows.extend(plan(run, accelerator, args.mfu) for accelerator in accelerators)
  print(markdown(rows))
  print(f"\nbatch x seq_len as in each run file; * = raised to a multiple of the host count. "
        f"Memory: estimate, (tight) above {TIGHT:.0%} of HBM. Step time at an assumed "
        f"{args.mfu:.0%} MFU; run = train_loop.num_steps steps.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
