"""Decode throughput: maxnucl's KV-cache generation against transformers' `generate` (with its
cache) on the same Gemma-2 config and the same weights, side by side in one process.

For each batch size: prefill tokens/s (one pass over the prompts) and new tokens/s (the decode
steps after the prefill), greedy, exactly `--new_tokens` tokens per row.  Each side is timed
`--repeats` times after a warm-up (compilation) run; the best run is reported.  transformers'
decode time is its `generate` time minus its own prefill time (a forward pass over the prompts
that fills its cache).  Also printed: KV-cache bytes by layer kind (maxnucl: sliding-window
layers hold a ring buffer of the window, so their cache does not grow with the length) and
whether both sides produced the same tokens.

    python benchmarks/decode_throughput.py                              # gemma2_small, CPU, f32
    python benchmarks/decode_throughput.py --dtype bfloat16             # e.g. on a GPU
    python benchmarks/decode_throughput.py --json out.json              # also write the figures

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxnucl import decoding, models
from maxnucl.conversion import hf_gemma2

import arguments  # benchmarks/arguments.py


def hf_model(cfg, params, dtype):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  config = transformers.Gemma2Config(**hf_gemma2.hf_config(cfg))
  config._attn_implementation = "eager"  # the implementation that applies the soft-caps
  model = transformers.Gemma2ForCausalLM(config).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           hf_gemma2.hf_state_from_params(cfg, params).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or [m for m in missing if m != "lm_head.weight"]:
    raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  # Exactly the requested number of tokens on both sides, without suppressing EOS (which
  # min_new_tokens would do, changing the greedy choice): no EOS stopping at all.
  model.generation_config.eos_token_id = None
  return model.to(getattr(torch, dtype)).to("cuda" if torch.cuda.is_available() else "cpu")


def time_maxnucl(cfg, params, prompts, new_tokens, repeats):
  """(best prefill seconds, best decode seconds, tokens [B, new]) of greedy generation."""
  batch, length = prompts.shape
  tokens, lengths = jnp.asarray(prompts), jnp.full((batch,), length, jnp.int32)
  active, stops = jnp.ones((batch,), bool), jnp.asarray([-1], jnp.int32)
  sampling = decoding.Sampling()
  best_prefill = best_decode = float("inf")
  for _ in range(repeats + 1):  # the first run compiles
    start = time.perf_counter()
    state = decoding._start(cfg, params, tokens, lengths, active, jax.random.PRNGKey(0), stops,
                            total_length=length + new_tokens, max_new_tokens=new_tokens,
                            sampling=sampling)
    jax.block_until_ready(state)
    middle = time.perf_counter()
    state = decoding._extend(cfg, params, state, stops, jnp.int32(new_tokens), sampling=sampling)
    out = np.asarray(state["out"])
    end = time.perf_counter()
    best_prefill, best_decode = min(best_prefill, middle - start), min(best_decode, end - middle)
  assert int(state["step"]) == new_tokens
  return best_prefill, best_decode, out


def time_transformers(model, prompts, new_tokens, repeats):
  import torch  # pylint: disable=import-outside-toplevel

  device = next(model.parameters()).device
  ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
  mask = torch.ones_like(ids)

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  best_prefill = best_total = float("inf")
  with torch.no_grad():
    for _ in range(repeats + 1):
      sync()
      start = time.perf_counter()
      model(input_ids=ids, attention_mask=mask, use_cache=True)
      sync()
      best_prefill = min(best_prefill, time.perf_counter() - start)
      start = time.perf_counter()
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           do_sample=False, use_cache=True, return_dict_in_generate=True,
                           pad_token_id=0)
      sync()
      best_total = min(best_total, time.perf_counter() - start)
  cache = out.past_key_values
  cache_bytes = {"cache class": type(cache).__name__}
  layers = getattr(cache, "layers", None)
  if layers is not None:
    cache_bytes["bytes"] = sum(t.numel() * t.element_size() for layer in layers
                               for t in (layer.keys, layer.values) if t is not None)
  new = out.sequences[:, ids.shape[1]:].cpu().numpy()
  assert new.shape[1] == new_tokens, new.shape
  return best_prefill, best_total - best_prefill, new, cache_bytes


def first_difference(a, b):
  diff = np.nonzero(np.any(a != b, axis=0))[0]
  return None if diff.size == 0 else int(diff[0])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gemma2_small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=arguments.positive_int, nargs="+", default=[1, 16])
  parser.add_argument("--prompt_len", type=arguments.positive_int, default=512)
  # new tokens/s counts the steps after the first new token, which the prefill gives
  parser.add_argument("--new_tokens", type=arguments.at_least(2), default=256)
  parser.add_argument("--repeats", type=arguments.positive_int, default=2,
                      help="timed runs per side (best kept)")
  parser.add_argument("--skip_transformers", action="store_true")
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)

  cfg = arguments.model_config(parser, args.preset, dtype=args.dtype, param_dtype=args.dtype)
  if cfg.family != "gemma2" and not args.skip_transformers:
    arguments.fail(parser, f"--preset {args.preset}: a {cfg.family} model, which transformers' "
                   f"Gemma-2 cannot run; pass --skip_transformers or a Gemma-2 preset")
  if cfg.max_positions < args.prompt_len + args.new_tokens:  # e.g. gemma2_tiny (512)
    cfg = cfg.replace(max_positions=args.prompt_len + args.new_tokens)
  params = models.init(cfg, jax.random.PRNGKey(0))
  reference = None if args.skip_transformers else hf_model(
      cfg, jax.tree.map(lambda x: np.asarray(x, np.float32), params), args.dtype)
  device = jax.devices()[0]
  report = {"machine": f"{platform.machine()} {device.platform} {device.device_kind}",
            "cpu_count": os.cpu_count(), "preset": cfg.name,
            "params": models.param_count(cfg)["total"], "dtype": args.dtype,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": []}
  print(f"{cfg.name} ({report['params'] / 1e6:.1f}M params, {args.dtype}) on "
        f"{report['machine']}; prompt {args.prompt_len}, {args.new_tokens} new tokens")
  total_length = args.prompt_len + args.new_tokens
  for length in (total_length, 4 * total_length):
    sizes = decoding.cache_bytes(cfg, 16, length)
    report.setdefault("cache_bytes_batch16", {})[length] = sizes
    print(f"maxnucl KV cache, batch 16, {length} positions: local layers "
          f"{sizes['local'] / 2**20:.1f} MiB (window {cfg.sliding_window}), global layers "
          f"{sizes['global'] / 2**20:.1f} MiB")
  rng = np.random.RandomState(0)
  for batch in args.batch:
    prompts = rng.randint(3, cfg.vocab_size, size=(batch, args.prompt_len)).astype(np.int32)
    prefill, decode, ours = time_maxnucl(cfg, params, prompts, args.new_tokens, args.repeats)
    run = {"batch": batch,
           "maxnucl": {"prefill_tokens_per_s": batch * args.prompt_len / prefill,
                       "new_tokens_per_s": batch * (args.new_tokens - 1) / decode,
                       "prefill_s": prefill, "decode_s": decode}}
    line = (f"batch {batch:3d}  maxnucl: prefill {run['maxnucl']['prefill_tokens_per_s']:9.0f} "
            f"tok/s, new {run['maxnucl']['new_tokens_per_s']:8.1f} tok/s")
    if reference is not None:
      hf_prefill, hf_decode, theirs, hf_cache = time_transformers(
          reference, prompts, args.new_tokens, args.repeats)
      run["transformers"] = {"prefill_tokens_per_s": batch * args.prompt_len / hf_prefill,
                             "new_tokens_per_s": batch * (args.new_tokens - 1) / hf_decode,
                             "prefill_s": hf_prefill, "decode_s": hf_decode, "cache": hf_cache}
      run["speedup_new_tokens"] = (run["maxnucl"]["new_tokens_per_s"]
                                   / run["transformers"]["new_tokens_per_s"])
      run["first_token_difference"] = first_difference(ours, theirs)
      if "bytes" in hf_cache:
        print(f"transformers {hf_cache['cache class']} after generate, batch {batch}: "
              f"{hf_cache['bytes'] / 2**20:.1f} MiB (maxnucl: "
              f"{decoding.cache_bytes(cfg, batch, total_length)['total'] / 2**20:.1f} MiB)")
      line += (f" | transformers: prefill {run['transformers']['prefill_tokens_per_s']:9.0f} "
               f"tok/s, new {run['transformers']['new_tokens_per_s']:8.1f} tok/s | new-token "
               f"speedup {run['speedup_new_tokens']:.2f}x | same tokens: "
               + ("all" if run["first_token_difference"] is None
                  else f"up to step {run['first_token_difference']}"))
    print(line, flush=True)
    report["runs"].append(run)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  main()
