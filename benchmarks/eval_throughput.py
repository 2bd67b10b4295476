"""Evaluation throughput: examples/s of the GSM8K and MBPP protocols on a small model, end to end
(prompt building, KV-cache generation, answer extraction, sandboxed test execution, writing
predictions.jsonl), and the share of MBPP's time spent in the sandbox.

No dataset can be downloaded here, so the script writes stand-ins in the released file formats
to a temporary data directory: GSM8K train/test jsonl files made from the built-in arithmetic
problems (the same question / worked answer / "#### n" format) and an mbpp.jsonl of simple
functions with their asserts (task ids 1-10 and 11-...).  The protocols are the real ones
(5-shot GSM8K with 256 new tokens, 3-shot MBPP with 512), so the figures are those of a real run
on this model.  Without --checkpoint the model is a random gemma2_tiny (max_positions raised to
4096 to hold the few-shot prompts): it never writes a stop string, so every example generates
the full budget — the worst case.

    python benchmarks/eval_throughput.py                      # random gemma2_tiny, CPU
    python benchmarks/eval_throughput.py --checkpoint CKPT --examples 128 --json out.json

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

import jax

from maxnucl import checkpoints, models
from maxnucl.data import sources, synthetic, vocabularies
from maxnucl.evaluation import core, execution, gsm8k, mbpp

import arguments  # benchmarks/arguments.py


def write_standin_data(root: pathlib.Path, num_examples: int) -> None:
  (root / "gsm8k").mkdir(parents=True)
  for split, n in (("train", 64), ("test", num_examples)):
    with (root / "gsm8k" / f"{split}.jsonl").open("w") as f:
      for problem in synthetic.arithmetic_problems(0, split, n):
        f.write(json.dumps(problem) + "\n")
  (root / "mbpp").mkdir()
  with (root / "mbpp" / "mbpp.jsonl").open("w") as f:
    for task_id in list(range(1, 11)) + list(range(11, 11 + num_examples)):
      k = task_id % 7 + 1
      f.write(json.dumps({
          "task_id": task_id, "text": f"Write a function to add {k} to a number.",
          "code": f"def add_{k}(x):\n  return x + {k}",
          "test_list": [f"assert add_{k}({i}) == {i + k}" for i in range(3)],
          "test_setup_code": "", "challenge_test_list": []}) + "\n")


def timed_run(bench, model, output: pathlib.Path, limit: int) -> tuple[dict, float]:
  start = time.perf_counter()
  results = core.run_benchmark(bench, model, output, limit=limit, progress=False)
  return results, time.perf_counter() - start


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default=None, help="default: a random gemma2_tiny")
  parser.add_argument("--vocab", default="byte")
  parser.add_argument("--examples", type=arguments.positive_int, default=64,
                      help="examples per benchmark")
  parser.add_argument("--batch_size", type=arguments.positive_int, default=16)
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)
  try:
    vocabularies.get_tokenizer(args.vocab)
    if args.checkpoint:
      checkpoints.load_config(checkpoints.resolve(args.checkpoint))
  except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: sentencepiece's
    arguments.fail(parser, str(error))

  if args.checkpoint:
    model = core.LanguageModel.load(args.checkpoint, args.vocab, batch_size=args.batch_size)
  else:
    cfg = models.get_config("gemma2_tiny", max_positions=4096)
    model = core.LanguageModel(cfg, models.init(cfg, jax.random.PRNGKey(0)),
                               vocabularies.get_tokenizer(args.vocab), batch_size=args.batch_size)
  report = {"machine": f"{platform.machine()} {jax.devices()[0].platform}, "
                       f"{os.cpu_count()} CPUs", "model": model.cfg.name,
            "checkpoint": args.checkpoint, "examples": args.examples,
            "batch_size": args.batch_size, "containment": execution.containment_available()}
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    write_standin_data(root / "data", args.examples)
    os.environ[sources.DATA_DIR_ENV] = str(root / "data")
    for name, bench in (("gsm8k", gsm8k.GSM8K()), ("mbpp", mbpp.MBPP())):
      timed_run(bench, model, root / f"warmup_{name}", limit=min(args.batch_size,
                                                                 args.examples))  # compiles
      results, seconds = timed_run(bench, model, root / name, args.examples)
      entry = {"seconds": seconds, "examples_per_s": args.examples / seconds,
               "metrics": results["metrics"]}
      if name == "mbpp":
        records = [json.loads(l) for l in (root / name / core.PREDICTIONS).read_text()
                   .splitlines()]
        programs = [mbpp.test_program({"test_list": r["reference"], "test_setup_code": ""},
                                      r["answer"]) for r in records]
        start = time.perf_counter()
        execution.check_programs(programs, timeout_s=bench.timeout_s)
        entry["sandbox_seconds"] = time.perf_counter() - start
        entry["sandbox_share"] = entry["sandbox_seconds"] / seconds
      report[name] = entry
      line = (f"{name:6s} {args.examples} examples in {seconds:6.1f} s = "
              f"{entry['examples_per_s']:6.2f} examples/s")
      if "sandbox_seconds" in entry:
        line += (f" (running the {args.examples} programs in the sandbox: "
                 f"{entry['sandbox_seconds']:.1f} s, {entry['sandbox_share']:.0%})")
      print(line, flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
