"""Training throughput: maxnucl's train step against the PyTorch peer (transformers'
`Gemma2ForCausalLM`, eager attention — the implementation that applies Gemma-2's soft-caps —
AdamW) on the same model shape, batch and sequence length, in the same run.

Each side runs in its own subprocess (so its peak memory is its own): `--steps` timed optimizer
steps after `--warmup` untimed ones (compilation).  Reported per side: tokens/s, TFLOP/s per
device and MFU with the documented formula (`maxnucl.flops`: 3 x forward matmul FLOPs, remat not
counted, the same count for both sides), peak device memory (GPU: the allocator's peak; CPU: the
process's peak RSS), and the final loss (both sides start from the same weights and batches).
The batch is the largest of `--batches` that fits (an out-of-memory step tries the next smaller).

    python benchmarks/train_throughput.py                               # CPU: a reduced shape
    python benchmarks/train_throughput.py --preset gemma2_2b --seq_lens 2048 4096 8192 \\
        --batches 8 4 2 1 --dtype bfloat16 --remat full                # one H100
    python benchmarks/train_throughput.py --json out.json               # also write the figures

Results are recorded in docs/benchmarks.md with the device named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

import arguments  # benchmarks/arguments.py

CPU_DEFAULTS = {"num_layers": 2, "vocab_size": 4096, "d_model": 256, "num_heads": 4,
                "num_kv_heads": 2, "head_dim": 64, "query_pre_attn_scalar": 64, "ffn_dim": 1024,
                "sliding_window": 128}


def _config(args):
  from maxnucl import models  # pylint: disable=import-outside-toplevel
  overrides = json.loads(args.overrides) if args.overrides else {}
  return models.get_config(args.preset, dtype=args.dtype, param_dtype=args.param_dtype,
                           remat_policy=args.remat, attention_impl=args.attention_impl,
                           scan_layers=args.scan_layers, dropout_rate=0.0,
                           max_positions=max(args.seq_lens), **overrides)


def _batches(cfg, batch, seq_len, count, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, cfg.vocab_size, size=(batch, seq_len + 1), dtype=np.int64)
          for _ in range(count)]


def run_maxnucl(args, batch, seq_len) -> dict:
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from maxnucl import models, train  # pylint: disable=import-outside-toplevel
  cfg = _config(args)
  params = models.init(cfg, jax.random.PRNGKey(0))
  schedule = optax.constant_schedule(args.learning_rate)
  tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  step = jax.jit(functools.partial(train.train_step, cfg=cfg, tx=tx, schedule=schedule),
                 donate_argnums=0)

  def device_batch(tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    ones = jnp.ones(tokens[:, 1:].shape, jnp.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": ones.astype(jnp.float32), "segment_ids": ones,
            "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), ones.shape)}

  data = [device_batch(b) for b in _batches(cfg, batch, seq_len, args.warmup + args.steps)]
  rng = jax.random.PRNGKey(1)
  compiled = step.lower(state, data[0], rng).compile()
  memory = compiled.memory_analysis()
  for b in data[:args.warmup]:
    state, metrics = compiled(state, b, rng)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for b in data[args.warmup:]:
    state, metrics = compiled(state, b, rng)
  loss = float(metrics["loss"])
  seconds = (time.perf_counter() - start) / args.steps
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  return {"side": "maxnucl", "seconds_per_step": seconds, "final_loss": loss,
          "peak_bytes": (stats or {}).get("peak_bytes_in_use") or _peak_rss(),
          "compiled_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
          "device": device.device_kind, "num_devices": 1}


def run_peer(args, batch, seq_len) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from maxnucl import models  # pylint: disable=import-outside-toplevel
  from maxnucl.conversion import hf_gemma2  # pylint: disable=import-outside-toplevel
  cfg = _config(args)
  on_gpu = torch.cuda.is_available()
  device = "cuda" if on_gpu else "cpu"
  config = transformers.Gemma2Config(**hf_gemma2.hf_config(cfg))
  config._attn_implementation = "eager"  # the one transformers implementation with soft-caps
  model = transformers.Gemma2ForCausalLM(config)
  params = models.init(cfg, jax.random.PRNGKey(0))  # the same weights as the maxnucl side
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
           hf_gemma2.hf_state_from_params(cfg, params).items()}
  model.load_state_dict(state, strict=False)
  model.tie_weights()
  model = model.to(getattr(torch, args.param_dtype)).to(device).train()
  if args.remat != "none":
    model.gradient_checkpointing_enable()
  optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0, fused=on_gpu)
  data = [torch.as_tensor(b, device=device)
          for b in _batches(cfg, batch, seq_len, args.warmup + args.steps)]
  autocast = torch.autocast(device_type=device, dtype=getattr(torch, args.dtype),
                            enabled=args.dtype != args.param_dtype)

  def one_step(tokens):
    with autocast:
      logits = model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if on_gpu else (lambda: None)
  for tokens in data[:args.warmup]:
    one_step(tokens)
  sync()
  if on_gpu:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for tokens in data[args.warmup:]:
    loss = one_step(tokens)
  sync()
  seconds = (time.perf_counter() - start) / args.steps
  return {"side": "transformers", "seconds_per_step": seconds, "final_loss": float(loss),
          "peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else _peak_rss(),
          "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
          "num_devices": 1}


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_oom(text: str) -> bool:
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "OutOfMemoryError",
                                 "out of memory"))


def _child(args, side, batch, seq_len) -> dict:
  command = [sys.executable, __file__, "--_side", side, "--_batch", str(batch), "--_seq_len",
             str(seq_len), *args.forward]
  env = dict(args.child_env)
  if side == "transformers":
    # The peer's process uses jax only to draw the shared initial weights: on the CPU, so that
    # XLA's GPU client does not reserve most of the accelerator's memory away from torch.
    env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  if done.returncode:
    if _is_oom(done.stderr):
      return {"oom": True}
    raise RuntimeError(f"{side} batch {batch} x {seq_len} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _figures(cfg, result, batch, seq_len) -> dict:
  from maxnucl import flops  # pylint: disable=import-outside-toplevel
  step_flops = flops.training_flops_per_step(cfg, batch, seq_len)
  tflops = step_flops / result["seconds_per_step"] / result["num_devices"] / 1e12
  peak = next((p for k, p in flops.PEAK_FLOPS_BY_DEVICE_KIND
               if k.lower() in result["device"].lower()), None)
  return dict(result, batch=batch, seq_len=seq_len,
              tokens_per_s=batch * seq_len / result["seconds_per_step"],
              tflops_per_device=tflops, mfu=tflops * 1e12 / peak if peak else None)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gemma2_2b")
  parser.add_argument("--overrides", help="JSON ModelConfig overrides (default on CPU: a "
                      f"reduced shape, {json.dumps(CPU_DEFAULTS)}; '{{}}' = the preset as is)")
  parser.add_argument("--seq_lens", type=arguments.positive_int, nargs="+", default=None,
                      help="default 2048 4096 on a GPU, 512 on CPU")
  parser.add_argument("--batches", type=arguments.positive_int, nargs="+", default=None,
                      help="candidates, largest first (default 8 4 2 1 on a GPU, 4 on CPU)")
  parser.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on a GPU, "
                      "float32 on CPU)")
  parser.add_argument("--param_dtype", default="float32")
  parser.add_argument("--remat", default="none", help="none | full | save_dots (the peer: "
                      "gradient checkpointing when not none)")
  parser.add_argument("--attention_impl", default="auto")
  parser.add_argument("--scan_layers", type=arguments.boolean, default=True)
  parser.add_argument("--learning_rate", type=arguments.positive_float, default=1e-5)
  parser.add_argument("--steps", type=arguments.positive_int, default=5)
  parser.add_argument("--warmup", type=arguments.nonnegative_int, default=2)
  parser.add_argument("--no_peer", action="store_true", help="maxnucl only")
  parser.add_argument("--json", type=arguments.output_file, help="also write the figures here")
  parser.add_argument("--_side", help=argparse.SUPPRESS)
  parser.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--_seq_len", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.overrides is not None:
    try:
      overrides = json.loads(args.overrides)
    except json.JSONDecodeError as error:
      parser.error(f"--overrides {args.overrides!r}: not JSON ({error})")
    if not isinstance(overrides, dict):
      parser.error(f"--overrides {args.overrides!r}: expected a JSON object of ModelConfig "
                   f"fields, e.g. '{{\"num_layers\": 2}}'")
  # The parent process only reads the platform and prints: the children measure.  Its XLA client
  # must not reserve most of a GPU's memory for the whole run (XLA preallocates 75 % by default);
  # the children get the environment as it was.
  args.child_env = dict(os.environ)
  if not args._side:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=import-outside-toplevel
  on_cpu = jax.devices()[0].platform == "cpu"
  args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
  if args.overrides is None and on_cpu:
    args.overrides = json.dumps(CPU_DEFAULTS)
  args.seq_lens = args.seq_lens or ([512] if on_cpu else [2048, 4096])
  args.batches = sorted(args.batches or ([4] if on_cpu else [8, 4, 2, 1]), reverse=True)
  if args._side:
    run = run_maxnucl if args._side == "maxnucl" else run_peer
    print(json.dumps(run(args, args._batch, args._seq_len)))
    return 0
  args.forward = [a for a in (argv if argv is not None else sys.argv[1:])]
  args.forward += ["--dtype", args.dtype, "--overrides", args.overrides or "{}"]
  try:
    cfg = _config(args)
  except ValueError as error:  # ConfigError: a preset, dtype, remat, attention or override
    arguments.fail(parser, str(error))
  from maxnucl import models  # pylint: disable=import-outside-toplevel
  print(f"model {cfg.name} {models.param_count(cfg)['total'] / 1e6:.1f}M parameters, "
        f"{cfg.num_layers} layers, d {cfg.d_model}, vocab {cfg.vocab_size}; dtype {args.dtype}, "
        f"remat {args.remat}, attention {args.attention_impl}, scan {args.scan_layers}")
  rows = []
  for seq_len in args.seq_lens:
    for side in ("maxnucl",) + (() if args.no_peer else ("transformers",)):
      for batch in args.batches:
        result = _child(args, side, batch, seq_len)
        if result.get("oom"):
          print(f"{side:12s} seq {seq_len:5d} batch {batch:3d}: out of memory")
          continue
        row = _figures(cfg, result, batch, seq_len)
        rows.append(row)
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"{side:12s} seq {seq_len:5d} batch {batch:3d}: {row['tokens_per_s']:10.0f} "
              f"tokens/s  {row['tflops_per_device']:7.3f} TFLOP/s  MFU {mfu:>6s}  peak "
              f"{row['peak_bytes'] / 2**30:6.2f} GiB  loss {row['final_loss']:.4f}  "
              f"[{row['device']}]")
        break
  for seq_len in args.seq_lens:
    ours = [r for r in rows if r["seq_len"] == seq_len and r["side"] == "maxnucl"]
    theirs = [r for r in rows if r["seq_len"] == seq_len and r["side"] == "transformers"]
    if ours and theirs:
      print(f"seq {seq_len}: maxnucl / transformers tokens/s = "
            f"{ours[0]['tokens_per_s'] / theirs[0]['tokens_per_s']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "host": platform.node(), "cpus": os.cpu_count()}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
