"""The README's CPU demo as a user runs it, end to end, several times: the figures a newcomer will
compare with their own run, with the machine, the date and the range over runs.

Each run is the README's commands in fresh processes: `python -m maxnucl.train
--gin_file=gin/demo_cpu.gin` (one seed each: the initialisation and data order vary), then
`python -m maxnucl.evaluate --gin_file=gin/eval/synthetic_arithmetic.gin` on the held-out
problems, then `python -m maxnucl.generate` with the README's prompt.  Wall times include process
start and compilation; the 1-minute load average before each run is recorded beside it (another
job on a 2-core machine doubles the time).

    python benchmarks/demo_figures.py                                  # 3 runs, prints
    python benchmarks/demo_figures.py --docs docs/benchmarks.md --json demo.json

--docs rewrites the section between `<!-- demo_figures:begin -->` and `<!-- demo_figures:end -->`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import arguments  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "Q: Eli has 53 coins, gets 5 more and gives away 16. How many now?\nA: "
BEGIN, END = "<!-- demo_figures:begin -->", "<!-- demo_figures:end -->"


def _run(command: list[str]) -> tuple[float, str]:
  """(wall seconds, stdout) of a command of the README, run from the repository."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                        check=False)
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n"
                       f"{done.stderr[-3000:]}")
  return time.perf_counter() - start, done.stdout


def one_run(workdir: pathlib.Path, seed: int, examples: int) -> dict:
  load = os.getloadavg()[0]
  train_s, _ = _run(["-m", "maxnucl.train", "--gin_file=gin/demo_cpu.gin", f"--workdir={workdir}",
                     f"--gin_param=train_loop.seed = {seed}",
                     "--gin_param=train_loop.progress_bar = False"])
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evaluated = [r for r in records if "eval_loss" in r]
  eval_s, _ = _run(["-m", "maxnucl.evaluate", "--gin_file=gin/eval/synthetic_arithmetic.gin",
                    f"--checkpoint={workdir}", f"--output={workdir / 'eval'}",
                    f"--limit={examples}"])
  results = json.loads((workdir / "eval" / "results.json").read_text())
  _, answer = _run(["-m", "maxnucl.generate", "--checkpoint", str(workdir), "--prompt", PROMPT])
  return {"seed": seed, "load_before": load, "train_s": train_s,
          "first_logged": {"step": records[0]["step"], "nll": records[0]["nll"]},
          "last_logged": {"step": records[-1]["step"], "nll": records[-1]["nll"]},
          "eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
          "accuracy_strict": results["metrics"]["accuracy_strict"],
          "accuracy_flexible": results["metrics"]["accuracy_flexible"],
          "examples": results["num_examples"], "evaluate_s": eval_s,
          "answer": answer.strip()}


def _range(values, digits: int, unit: str = "") -> str:
  low, high = min(values), max(values)
  if round(low, digits) == round(high, digits):
    return f"{low:.{digits}f}{unit}"
  return f"{low:.{digits}f}–{high:.{digits}f}{unit}"


def markdown(report: dict) -> str:
  runs = report["runs"]
  first, last = runs[0]["first_logged"]["step"], runs[0]["last_logged"]["step"]
  lines = [
      BEGIN, "",
      f"Measured {report['date']} on {report['machine']} by `{report['command']}`: "
      f"{len(runs)} runs of the README's demo (seeds {', '.join(str(r['seed']) for r in runs)}),"
      f" each evaluated on {runs[0]['examples']} held-out problems.", "",
      "| figure | range over the runs |", "|---|---|",
      f"| training wall time (300 steps, with start-up and compilation) | "
      f"{_range([r['train_s'] for r in runs], 0, ' s')} (1-minute load before: "
      f"{_range([r['load_before'] for r in runs], 1)}) |",
      f"| token NLL, step {first} → step {last} | "
      f"{_range([r['first_logged']['nll'] for r in runs], 2)} → "
      f"{_range([r['last_logged']['nll'] for r in runs], 2)} |",
      f"| held-out `eval_loss` at step {last} | "
      f"{_range([r['eval_loss'] for r in runs if r['eval_loss'] is not None], 2)} |",
      f"| held-out accuracy, strict / flexible (%) | "
      f"{_range([r['accuracy_strict'] for r in runs], 1)} / "
      f"{_range([r['accuracy_flexible'] for r in runs], 1)} |",
      f"| evaluation wall time ({runs[0]['examples']} problems) | "
      f"{_range([r['evaluate_s'] for r in runs], 0, ' s')} |", "",
      "The README prompt's answer, per run:", ""]
  for r in runs:
    lines += [f"- seed {r['seed']}: `{' / '.join(r['answer'].splitlines())}`"]
  return "\n".join(lines + ["", END])


def update_docs(path: pathlib.Path, section: str) -> None:
  text = path.read_text()
  if BEGIN in text and END in text:
    before, rest = text.split(BEGIN, 1)
    text = before + section + rest.split(END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n## The CPU demo\n\n" + section + "\n"
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=arguments.positive_int, default=3,
                      help="demo runs, seeds 0..N-1 (default 3)")
  parser.add_argument("--examples", type=arguments.positive_int, default=1000,
                      help="held-out problems evaluated per run (default 1000, all of them)")
  parser.add_argument("--json", type=arguments.output_file, help="also write the figures here")
  parser.add_argument("--docs", type=pathlib.Path,
                      help="a markdown file whose demo_figures section to rewrite")
  args = parser.parse_args(argv)
  if args.docs is not None and not args.docs.is_file():
    arguments.fail(parser, f"--docs {args.docs}: no such file")
  from maxnucl.reproduction.report import machine  # pylint: disable=import-outside-toplevel
  runs = []
  with tempfile.TemporaryDirectory(prefix="demo_figures_") as tmp:
    for seed in range(args.runs):
      runs.append(one_run(pathlib.Path(tmp) / f"seed{seed}", seed, args.examples))
      print(json.dumps(runs[-1]), flush=True)
  report = {"machine": machine(), "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/demo_figures.py" + "".join(
                f" {a}" for a in (argv if argv is not None else sys.argv[1:])), "runs": runs}
  section = markdown(report)
  print(section)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
  if args.docs is not None:
    update_docs(args.docs, section)
  return 0


if __name__ == "__main__":
  sys.exit(main())
