"""The cost of verifying a checkpoint on load (CRC32C per array + finiteness) and of recording
the checksums on save, on a SmolLM2-135M-sized checkpoint of random weights.

  python benchmarks/checkpoint_checksum.py [--preset smollm2_135m] [--dtype float32]
      [--layout streaming|orbax] [--repeats 5] [--workdir /tmp/ckpt_checksum] [--keep]
      [--json out.json]

Measured (warm page cache, each in this process; loads: the fastest of --repeats, verified and
unverified interleaved; the rest: the median):
  * load, verified    `checkpoints.load(path)` as every reader runs it;
  * load, unverified  the same with the verification (`checkpoints._Verifier`) replaced by a
                      no-op: what the reads alone cost;
  * verification      the checks alone (CRC32C + finiteness) over every array in memory: the
                      work `load` adds, also where it does not overlap the next array's read;
  * save              `StreamingWriter` writing every array (the checksum is computed on the
                      cast row blocks as they are written), and the checksums alone;
  * limits            crc32c's own throughput (google-crc32c on one array) and a plain memory
                      copy (numpy copyto of 256 MiB), the physical ceilings beside the figures.
The checkpoint in --workdir is removed at the end unless --keep.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maxnucl import checkpoints, models  # noqa: E402

import arguments  # noqa: E402  pylint: disable=wrong-import-position


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _random_params(cfg, dtype: str) -> dict:
  rng = np.random.default_rng(0)
  flat = checkpoints._leaf_shapes(models.abstract_params(cfg))  # pylint: disable=protected-access
  return {key: (rng.standard_normal(shape, np.float32) * 0.02).astype(checkpoints.NP_DTYPES[dtype])
          for key, shape in flat.items()}


def _throughput(fn, nbytes: int, repeats: int) -> float:
  return nbytes / _median_time(fn, repeats) / 1e9


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="smollm2_135m")
  parser.add_argument("--dtype", choices=sorted(checkpoints.NP_DTYPES), default="float32")
  parser.add_argument("--layout", choices=("streaming", "orbax"), default="streaming")
  parser.add_argument("--repeats", type=arguments.positive_int, default=5)
  parser.add_argument("--workdir", default="/tmp/ckpt_checksum")
  parser.add_argument("--keep", action="store_true")
  parser.add_argument("--json", type=arguments.output_file, default=None)
  args = parser.parse_args()
  cfg = arguments.model_config(parser, args.preset)

  workdir = pathlib.Path(args.workdir)
  path = workdir / f"{args.preset}_{args.dtype}_{args.layout}"
  try:
    params = _random_params(cfg, args.dtype)
    nbytes = sum(a.nbytes for a in params.values())

    def save():
      if args.layout == "orbax":
        checkpoints.save(path, cfg, checkpoints.unflatten(params), overwrite=True)
        return
      with checkpoints.StreamingWriter(path, cfg, dtype=args.dtype, overwrite=True) as writer:
        for key, array in params.items():
          writer.write(key, array)

    save_s = _median_time(save, args.repeats)
    checksums_s = _median_time(lambda: [checkpoints.crc32c(a) for a in params.values()],
                               args.repeats)
    verify_alone_s = _median_time(lambda: [_verify(a) for a in params.values()], args.repeats)
    checkpoints.load(path)  # warm the page cache (and trace the config's tree once)
    verifier = checkpoints._Verifier  # pylint: disable=protected-access
    update, finish = verifier.update, verifier.finish
    verified, unverified = [], []
    for _ in range(args.repeats):  # interleaved, so that other load on the machine hits both
      verified.append(_median_time(lambda: checkpoints.load(path), 1))
      verifier.update = verifier.finish = lambda self, *block: None
      try:
        unverified.append(_median_time(lambda: checkpoints.load(path), 1))
      finally:
        verifier.update, verifier.finish = update, finish
    verified_s, unverified_s = min(verified), min(unverified)
    block = np.ones(64 << 20, np.float32)
    out = np.empty_like(block)
    largest = max(params.values(), key=lambda a: a.nbytes)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}",
        "preset": args.preset, "dtype": args.dtype, "layout": args.layout,
        "checkpoint_bytes": nbytes, "repeats": args.repeats,
        "load_verified_s": verified_s, "load_unverified_s": unverified_s,
        "verification_overhead": verified_s / unverified_s - 1,
        "verification_alone_s": verify_alone_s,
        "verification_alone_share": verify_alone_s / unverified_s,
        "save_s": save_s, "checksums_alone_s": checksums_s,
        "checksum_share_of_save": checksums_s / save_s,
        "crc32c_GBps": _throughput(lambda: checkpoints.crc32c(largest), largest.nbytes,
                                   args.repeats),
        "verify_GBps": _throughput(lambda: _verify(largest), largest.nbytes, args.repeats),
        "memory_copy_GBps": _throughput(lambda: np.copyto(out, block), block.nbytes,
                                        args.repeats),
    }
  finally:
    if not args.keep:
      shutil.rmtree(path, ignore_errors=True)
      if workdir.exists() and not any(workdir.iterdir()):
        workdir.rmdir()
  print(json.dumps(result, indent=2))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


def _verify(array: np.ndarray) -> None:
  verifier = checkpoints._Verifier("", "", array.dtype, 0, False)  # pylint: disable=protected-access
  verifier.update(array)


if __name__ == "__main__":
  main()
