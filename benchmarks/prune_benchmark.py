"""Pruning throughput on a synthetic Gemma-2-9B-shaped checkpoint vs a plain copy of its files.

  python benchmarks/prune_benchmark.py [--layers 4] [--vocab_size 256000] [--method entropy]
      [--ratio 0.25] [--input_layout streaming|orbax] [--workdir /tmp/prune_bench] [--keep]
      [--json out.json] [--preset gemma2_9b]

The checkpoint has gemma2_9b's widths (d = 3584, m = 14336, 16/8 heads of 256; another preset's
with --preset) in bfloat16 with `--layers` decoder layers (default 4 of 42) and random
N(0, 1/fan_in) weights: 3.2 GiB at the defaults, about 6 GiB in --workdir with the pruned
output.  All of it is removed at the end, also after an error or an interruption, unless --keep
(a kept input is reused by the next run with the same --workdir).  Measured:
  * copy      wall time of `cp -r` of the input checkpoint (same bytes; warm page cache), with
              os.sync() before and after, as for the pruner (whose writer fsyncs its output);
  * prune     wall time and peak RSS (VmHWM) of `tools/prune_checkpoint.py` in a fresh
              subprocess (includes interpreter + JAX start-up, reading, scoring, writing);
  * baseline  peak RSS of a subprocess that only imports what the tool imports (so
              prune - baseline is the memory the pruning itself needs).
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxnucl import checkpoints, models, outputs  # noqa: E402
from maxnucl.pruning import METHODS  # noqa: E402

import arguments  # noqa: E402  pylint: disable=wrong-import-position
import workdirs  # noqa: E402  pylint: disable=wrong-import-position

# The benchmark passes no calibration data: the data-free methods.
DATA_FREE_METHODS = sorted(name for name, method in METHODS.items()
                           if not method.needs_calibration)


def _dir_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


_PEAK = ("import runpy, sys\n"
         "sys.argv = sys.argv[1:]\n"
         "try:\n"
         "  runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0] != '-c' else "
         "exec(sys.argv[1])\n"
         "except SystemExit as e:\n"
         "  assert not e.code, e.code\n"
         "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
         "print('PEAK_RSS_KIB', hwm.split()[1], file=sys.stderr)\n")


def _measured(argv: list[str], env: dict) -> tuple[float, int]:
  """(seconds, peak RSS bytes) of `python argv...` in a fresh process.  Peak RSS is VmHWM read
  by that process itself: a forked child's ru_maxrss would include the parent's memory."""
  t = time.time()
  done = subprocess.run([sys.executable, "-c", _PEAK, *argv], check=True, env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                        cwd=REPO)
  kib = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")]
  return time.time() - t, int(kib[-1]) * 1024


def make_checkpoint(path: pathlib.Path, preset: str, layers: int, vocab_size: int,
                    layout: str) -> None:
  cfg = models.get_config(preset, num_layers=layers, vocab_size=vocab_size,
                          param_dtype="bfloat16", dtype="bfloat16")
  rng = np.random.default_rng(0)
  import ml_dtypes  # pylint: disable=import-outside-toplevel

  def leaf(x):
    a = rng.standard_normal(x.shape, dtype=np.float32)
    a *= 1.0 / np.sqrt(x.shape[0])
    return a.astype(ml_dtypes.bfloat16)

  import jax  # pylint: disable=import-outside-toplevel
  if layout == "orbax":  # checkpoints.save: Orbax OCDBT, zstd, chunks of at most 64 MiB
    checkpoints.save(path, cfg, jax.tree.map(leaf, models.abstract_params(cfg)), overwrite=True)
    return
  # "streaming": the converter's layout (StreamingWriter, ~64 MiB row-block chunks)
  flat = jax.tree_util.tree_flatten_with_path(models.abstract_params(cfg))[0]
  with checkpoints.StreamingWriter(path, cfg, dtype="bfloat16", overwrite=True) as writer:
    for keys, x in flat:
      writer.write(tuple(k.key for k in keys), leaf(x))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="gemma2_9b",
                      help="model whose widths the input has (gemma2_tiny: a smoke test)")
  parser.add_argument("--layers", type=arguments.positive_int, default=4)
  parser.add_argument("--vocab_size", type=arguments.positive_int, default=256_000)
  parser.add_argument("--method", default="entropy", choices=DATA_FREE_METHODS)
  parser.add_argument("--ratio", type=float, default=0.25,
                      help="fraction of each layer's FFN neurons to remove, in [0, 1)")
  parser.add_argument("--workdir", type=arguments.work_directory, default="/tmp/prune_bench")
  parser.add_argument("--keep", action="store_true",
                      help="keep the input, the pruned output and report.json in --workdir "
                           "(default: remove what this run wrote there)")
  parser.add_argument("--json", type=arguments.output_file, default=None)
  parser.add_argument("--input_layout", choices=("streaming", "orbax"), default="streaming",
                      help="input written like the converter and the pruner write "
                           "(StreamingWriter: uncompressed zarr, ~64 MiB row-block chunks) or "
                           "by checkpoints.save like the trainer's checkpoints (Orbax OCDBT, "
                           "zstd, chunks of at most 64 MiB)")
  args = parser.parse_args()
  arguments.model_config(parser, args.preset, num_layers=args.layers, vocab_size=args.vocab_size)
  if not 0 <= args.ratio < 1:
    arguments.fail(parser, f"--ratio {args.ratio}: expected a fraction in [0, 1)")
  name = f"ckpt_{args.preset}_{args.input_layout}"
  kept = pathlib.Path(args.workdir) / name
  if kept.exists():  # a kept input is reused: it must be the one asked for
    try:
      cfg = checkpoints.load_config(kept)
    except (OSError, ValueError) as error:
      arguments.fail(parser, f"--workdir {args.workdir}: kept input {kept} cannot be read "
                     f"({error}); delete it or pass a different --workdir")
    if cfg.num_layers != args.layers or cfg.vocab_size != args.vocab_size:
      arguments.fail(parser, f"--workdir {args.workdir}: kept input {kept} has "
                     f"{cfg.num_layers} layers / vocab {cfg.vocab_size}, not --layers "
                     f"{args.layers} / --vocab_size {args.vocab_size}; delete it or pass a "
                     f"different --workdir")
  written = [name, f".{name}.tmp-*", f"{name}.orbax-checkpoint-tmp*", "copy", "pruned",
             ".pruned.tmp-*", "report.json"]
  outputs.exit_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the cleanup runs
  with workdirs.scratch(args.workdir, written, keep=args.keep) as work:
    result = measure(args, work, work / name)
  print(json.dumps(result, indent=1))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


def measure(args: argparse.Namespace, work: pathlib.Path, src: pathlib.Path) -> dict:
  """Writes the input `src` (unless a kept one is there), times the copy and the pruner."""
  copy, out = work / "copy", work / "pruned"
  if not src.exists():
    t = time.time()
    make_checkpoint(src, args.preset, args.layers, args.vocab_size, args.input_layout)
    print(f"created {src} in {time.time() - t:.1f}s", file=sys.stderr)
  cfg = checkpoints.load_config(src)
  for p in (copy, out):
    shutil.rmtree(p, ignore_errors=True)

  os.sync()
  t = time.time()
  subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
  os.sync()  # timed like the pruner, whose writer fsyncs its output
  copy_s = time.time() - t
  shutil.rmtree(copy)

  cmd = [sys.executable, str(REPO / "tools" / "prune_checkpoint.py"), "--input", str(src),
         "--output", str(out), "--method", args.method, "--ratio", str(args.ratio),
         "--report", str(work / "report.json")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=str(REPO))
  baseline_rss = _measured(["-c", "import jax.numpy as jnp; from maxnucl.pruning import prune; "
                             "jnp.zeros(1)"], env)[1]
  os.sync()
  t = time.time()
  peak_rss = _measured([*cmd[1:]], env)[1]
  os.sync()
  prune_s = time.time() - t
  report = json.loads((work / "report.json").read_text())

  d, m = cfg.d_model, cfg.ffn_dim
  return {
      "preset": args.preset,
      "shape": {"num_layers": cfg.num_layers, "d_model": d, "ffn_dim": m,
                "vocab_size": cfg.vocab_size, "dtype": "bfloat16"},
      "method": args.method, "ratio": args.ratio, "input_layout": args.input_layout,
      "input_bytes": _dir_bytes(src), "output_bytes": _dir_bytes(out),
      "one_layer_ffn_bytes": 3 * d * m * 2,
      "largest_other_tensor_bytes": max(
          int(np.prod(shape)) * 2 for key, (shape, _) in checkpoints.stored_arrays(src).items()
          if key[1:2] != ("mlp",)),
      "baseline_peak_rss_bytes": baseline_rss,
      "copy_seconds": round(copy_s, 2), "prune_seconds": round(prune_s, 2),
      "prune_over_copy": round(prune_s / copy_s, 2), "prune_peak_rss_bytes": peak_rss,
      "prune_minus_baseline_rss_bytes": peak_rss - baseline_rss,
      "ffn_widths_after": report["ffn_widths_after"],
      "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, "
                 f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM",
  }


if __name__ == "__main__":
  main()
