"""Checkpoint conversion benchmark: wall time against a plain file copy, and peak RSS.

A synthetic Gemma-2 9b-shaped Hugging Face directory of random bf16 weights (full 9b widths: d 3584,
m 14336, 16/8 heads of 256, the full 256000 x 3584 embedding; `--layers` of the 42 layers, to keep
disk and time sane on a small machine; another preset's widths with --preset) is written once,
then in fresh subprocesses:
  copy          `cp` of the same safetensors bytes (the floor for any converter)
  hf-to-maxnucl the streaming conversion (convert.hf_to_maxnucl)
  maxnucl-to-hf the streaming export back to safetensors (convert.maxnucl_to_hf)
Peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` inside each conversion subprocess; the
fixed overhead is that figure right after the imports, before any tensor is read.

    python benchmarks/convert_benchmark.py [--layers 4] [--workdir /tmp/convert_benchmark] [--keep]
        [--preset gemma2_9b]

What it writes in --workdir (about 10 GiB at the defaults) is removed at the end, also after an
error or an interruption, unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import arguments  # noqa: E402  pylint: disable=wrong-import-position
import workdirs  # noqa: E402  pylint: disable=wrong-import-position
from maxnucl import outputs  # noqa: E402  pylint: disable=wrong-import-position

GiB = 1 << 30


def make_hf_dir(path: pathlib.Path, preset: str, layers: int, shard_bytes: int) -> dict:
  """A `preset`-shaped HF directory of random bf16 weights; returns its config."""
  import ml_dtypes
  import numpy as np
  from maxnucl import models
  from maxnucl.conversion import hf_gemma2, hf_io

  cfg = models.get_config(preset, num_layers=layers)
  path.mkdir(parents=True)
  config = hf_gemma2.hf_config(cfg, torch_dtype="bfloat16")
  (path / "config.json").write_text(json.dumps(config, indent=2))
  pool = np.random.default_rng(0).normal(0, 0.02, size=(1 << 25) + 7).astype(ml_dtypes.bfloat16)
  abstract = models.abstract_params(cfg)
  specs = []
  for key, (name, _, to_hf) in hf_gemma2.tensor_map(cfg).items():
    node = abstract
    for k in key:
      node = node[k]
    shape = to_hf(np.empty(node.shape, np.int8), cfg).shape
    specs.append((name, shape, pool.dtype))

  def random_tensor(name, _offset=[0]):  # distinct slices of a random pool, tiled
    shape = dict((n, s) for n, s, _ in specs)[name]
    size = int(np.prod(shape))
    _offset[0] = (_offset[0] + 12345) % (1 << 20)
    reps = -(-(size + _offset[0]) // pool.size)
    return np.tile(pool, reps)[_offset[0]:_offset[0] + size].reshape(shape)

  hf_io.write_sharded(path, specs, random_tensor, shard_bytes)
  return config


def _child(argv: list[str]) -> dict:
  """Run this file's --child mode in a fresh interpreter; its JSON report."""
  out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                       text=True)
  if out.returncode:
    raise RuntimeError(f"{argv[0]} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _child_error(argv: list[str]) -> str:
  """The one-line error of this file's --child mode `argv` (exit 2), or '' when it passed."""
  out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                       text=True)
  if out.returncode == 2:
    return out.stderr.strip().splitlines()[-1]
  if out.returncode:
    raise RuntimeError(f"{argv[0]} failed:\n{out.stderr[-3000:]}")
  return ""


def preset_problem(preset: str, layers: str) -> str:
  """What is wrong with --preset and --layers as a Gemma-2 config ('' if nothing); run in a
  child, so that this process imports nothing large before the measured children (`measure`)."""
  from maxnucl import models
  try:
    cfg = models.get_config(preset, num_layers=int(layers))
  except models.ConfigError as error:
    return str(error)
  if cfg.family != "gemma2":
    return (f"--preset {preset}: a {cfg.family} model; the Hugging Face converter takes "
            f"Gemma-2 presets")
  return ""


def child(mode: str, src: str, dst: str) -> None:
  """One measured step in a fresh process (so ru_maxrss is this step's own peak)."""
  if mode == "check":
    problem = preset_problem(src, dst)
    if problem:
      print(problem, file=sys.stderr)
      sys.exit(2)
    return
  if mode == "make":
    make_hf_dir(pathlib.Path(dst), sys.argv[6], int(src), int(float(sys.argv[5]) * GiB))
    from maxnucl.conversion import hf_io
    reader = hf_io.SafetensorsReader(dst)
    print(json.dumps({"largest": max(reader.get(n).nbytes for n in reader.names())}))
    return
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)
  from maxnucl.conversion import convert  # noqa: F401  (imports counted as fixed overhead)
  overhead = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  os.sync()  # start with no dirty pages; the timing includes flushing the output to disk
  start = time.perf_counter()
  if mode == "hf-to-maxnucl":
    convert.hf_to_maxnucl(src, dst)
  else:
    convert.maxnucl_to_hf(src, dst)
  os.sync()
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"seconds": seconds, "peak_rss": peak, "import_rss": overhead}))


def copy_seconds(src: pathlib.Path, dst: pathlib.Path) -> float:
  dst.mkdir()
  os.sync()
  start = time.perf_counter()
  subprocess.run(["cp", *map(str, src.glob("*.safetensors")), str(dst)], check=True)
  os.sync()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  # The check at the end reads layer 1's FFN: at least two layers.
  parser.add_argument("--layers", type=arguments.at_least(2), default=4)
  parser.add_argument("--workdir", type=arguments.work_directory, default="/tmp/convert_benchmark")
  parser.add_argument("--shard_gib", type=arguments.positive_float, default=2.0)
  parser.add_argument("--preset", default="gemma2_9b", help="a Gemma-2 preset whose widths the "
                      "input has (gemma2_tiny: a smoke test)")
  parser.add_argument("--keep", action="store_true",
                      help="keep what the run wrote in --workdir (default: remove it)")
  args = parser.parse_args()
  problem = _child_error(["check", args.preset, str(args.layers)])
  if problem:
    arguments.fail(parser, problem)
  written = ["hf", "copy1", "copy2", "ckpt", ".ckpt.tmp-*", "hf_out", ".hf_out.tmp-*"]
  outputs.exit_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the cleanup runs
  with workdirs.scratch(args.workdir, written, keep=args.keep) as work:
    workdirs.remove(work, written, remove_dir=False)  # what a kept or killed run left
    measure(args, work)


def measure(args: argparse.Namespace, work: pathlib.Path) -> None:
  start = time.perf_counter()
  largest = _child(["make", str(args.layers), str(work / "hf"), str(args.shard_gib),
                    args.preset])["largest"]
  total = sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))
  print(f"synthetic {args.preset}-shaped input: {args.layers} layers, {total / GiB:.2f} GiB in "
        f"{len(list((work / 'hf').glob('*.safetensors')))} file(s), largest tensor "
        f"{largest / GiB:.2f} GiB (written in {time.perf_counter() - start:.0f} s)")

  copy1 = copy_seconds(work / "hf", work / "copy1")
  shutil.rmtree(work / "copy1")
  to_maxnucl = _child(["hf-to-maxnucl", str(work / "hf"), str(work / "ckpt")])
  copy2 = copy_seconds(work / "hf", work / "copy2")
  shutil.rmtree(work / "copy2")
  to_hf = _child(["maxnucl-to-hf", str(work / "ckpt"), str(work / "hf_out")])

  # Only now does this (parent) process import anything large: children forked earlier would
  # otherwise inherit its resident size in ru_maxrss.
  import numpy as np
  from maxnucl import checkpoints
  from maxnucl.conversion import hf_io
  reader = hf_io.SafetensorsReader(work / "hf")
  stored = checkpoints.stored_arrays(work / "ckpt")
  w = checkpoints.read_array(work / "ckpt", ("layers_1", "mlp", "out"))
  assert np.array_equal(w, reader.get("model.layers.1.mlp.down_proj.weight").T)
  out_reader = hf_io.SafetensorsReader(work / "hf_out")
  assert np.array_equal(out_reader.get("model.embed_tokens.weight")[-1000:],
                        reader.get("model.embed_tokens.weight")[-1000:])
  copy = min(copy1, copy2)
  report = {"preset": args.preset, "layers": args.layers, "bytes": total, "largest_tensor_bytes": largest,
            "tensors": len(stored), "copy_seconds": [copy1, copy2],
            "hf_to_maxnucl": to_maxnucl, "maxnucl_to_hf": to_hf}
  for name, r in (("hf-to-maxnucl", to_maxnucl), ("maxnucl-to-hf", to_hf)):
    print(f"{name}: {r['seconds']:.1f} s = {r['seconds'] / copy:.2f}x copy ({copy:.1f} s); peak "
          f"RSS {r['peak_rss'] / GiB:.2f} GiB = {r['peak_rss'] / largest:.2f}x largest tensor "
          f"(imports alone {r['import_rss'] / GiB:.2f} GiB; peak - imports = "
          f"{(r['peak_rss'] - r['import_rss']) / largest:.2f}x largest tensor)")
  print(json.dumps(report))


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child(*sys.argv[2:5])
  else:
    main()
