"""Sandbox overhead: `check_program` on a trivial passing program against `python -c` of the same
program, and the throughput of `check_programs` on small MBPP-like programs.

Per-program overhead: the same trivial program (a function and three asserts) is run N times
through `maxnucl.evaluation.execution.check_program` and N times with `subprocess.run([python,
"-c", program])`, interleaved (A, B, A, B, ...) so drift in the machine's speed affects both
alike; the figures are the medians.  Throughput: `check_programs` on `--programs` MBPP-like
programs (every eighth one fails an assert) with `--workers` (default os.cpu_count()), against
the same programs run directly with as many threads.

    python benchmarks/sandbox_overhead.py                      # N = 30, 64 programs, every core
    python benchmarks/sandbox_overhead.py --runs 50 --programs 128 --workers 4
    python benchmarks/sandbox_overhead.py --json out.json      # also write the figures
    python benchmarks/sandbox_overhead.py --disable landlock seccomp   # what those two cost

Results are recorded in docs/evaluation.md (section "Sandboxed execution").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from maxnucl.evaluation import execution

import arguments  # benchmarks/arguments.py

TRIVIAL = """def add(a, b):
  return a + b
assert add(1, 2) == 3
assert add(-1, 1) == 0
assert add(0, 0) == 0
"""

# Shapes of MBPP solutions: string, list, number and dict manipulation with a few asserts each.
TEMPLATES = (
    """def reverse_words(s):
  return ' '.join(reversed(s.split()))
assert reverse_words('a b {i}') == '{i} b a'
assert reverse_words('x') == 'x'
""",
    """import math
def is_prime(n):
  return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))
assert is_prime(97)
assert not is_prime({i} * 4)
""",
    """def fib(n):
  a, b = 0, 1
  for _ in range(n):
    a, b = b, a + b
  return a
assert fib(10) == 55
assert fib({i} % 20 + 1) > 0
""",
    """from collections import Counter
def most_common_char(s):
  return Counter(s).most_common(1)[0][0]
assert most_common_char('aab{i}') == 'a'
""",
    """import re
def count_digits(s):
  return len(re.findall(r'[0-9]', s))
assert count_digits('abc{i}') == len(str({i}))
""",
    """def max_sublist_sum(xs):
  best = cur = xs[0]
  for x in xs[1:]:
    cur = max(x, cur + x)
    best = max(best, cur)
  return best
assert max_sublist_sum([-2, 1, -3, 4, -1, 2, 1, -5, {i}]) >= 6
""",
    """import heapq
def k_smallest(xs, k):
  return heapq.nsmallest(k, xs)
assert k_smallest([5, 1, {i}, 3], 2) == sorted([5, 1, {i}, 3])[:2]
""",
    """def sum_digits(n):
  return sum(int(c) for c in str(n))
assert sum_digits({i}) == sum(map(int, str({i})))
assert sum_digits(0) == 1  # wrong on purpose: every eighth program fails
""",
)


def mbpp_like_programs(count: int) -> list[str]:
  return [TEMPLATES[i % len(TEMPLATES)].replace("{i}", str(i + 10)) for i in range(count)]


def run_directly(program: str) -> bool:
  """The unsandboxed baseline: `python -c program`, output captured."""
  return subprocess.run([sys.executable, "-c", program], stdin=subprocess.DEVNULL,
                        capture_output=True, timeout=60, check=False).returncode == 0


def timed(function, *args, **kwargs):
  t0 = time.perf_counter()
  value = function(*args, **kwargs)
  return time.perf_counter() - t0, value


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=arguments.positive_int, default=30,
                      help="timed runs of each variant")
  parser.add_argument("--warmup", type=arguments.nonnegative_int, default=3)
  parser.add_argument("--programs", type=arguments.positive_int, default=64,
                      help="programs for the throughput")
  parser.add_argument("--workers", type=arguments.positive_int, default=os.cpu_count())
  parser.add_argument("--timeout_s", type=arguments.positive_float, default=3.0)
  parser.add_argument("--disable", nargs="*", default=[], choices=execution.FACILITIES,
                      help="containment facilities to switch off (to measure their cost)")
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)

  sandboxed = functools.partial(execution.check_program, timeout_s=args.timeout_s,
                                disable=args.disable)
  times = {"sandboxed": [], "direct": []}
  containment = None
  for i in range(args.warmup + args.runs):
    elapsed, result = timed(sandboxed, TRIVIAL)
    if not result["passed"]:
      raise RuntimeError(f"the trivial program did not pass in the sandbox: {result}")
    containment = result["containment"]
    direct_elapsed, passed = timed(run_directly, TRIVIAL)
    if not passed:
      raise RuntimeError("the trivial program did not pass when run directly")
    if i >= args.warmup:
      times["sandboxed"].append(elapsed)
      times["direct"].append(direct_elapsed)
  median = {name: statistics.median(t) for name, t in times.items()}

  programs = mbpp_like_programs(args.programs)
  sandboxed_s, results = timed(execution.check_programs, programs, args.timeout_s, args.workers,
                               disable=args.disable)
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
    direct_s, direct_passed = timed(lambda: list(pool.map(run_directly, programs)))
  statuses = {}
  for r in results:
    statuses[r["status"]] = statuses.get(r["status"], 0) + 1
  if [r["passed"] for r in results] != direct_passed:
    raise RuntimeError("the sandbox and the direct runs disagree on which programs pass")

  result = {
      "runs": args.runs, "programs": args.programs, "workers": args.workers,
      "disabled": args.disable,
      "cpus": os.cpu_count(), "platform": platform.processor() or platform.machine(),
      "kernel": platform.release(), "python": platform.python_version(),
      "per_program_s": median,
      "per_program_p90_s": {name: sorted(t)[int(0.9 * (len(t) - 1))] for name, t in times.items()},
      "overhead_s": median["sandboxed"] - median["direct"],
      "overhead_ratio": median["sandboxed"] / median["direct"],
      "throughput_programs_per_s": {"sandboxed": args.programs / sandboxed_s,
                                    "direct": args.programs / direct_s},
      "statuses": statuses,
      "containment": {k: v for k, v in containment.items() if isinstance(v, bool) and v},
  }
  print(f"{args.runs} runs of a trivial program on {result['cpus']} CPUs ({result['platform']}, "
        f"Linux {result['kernel']}, Python {result['python']}):")
  print(f"  {'':<28}{'median':>10}{'p90':>10}")
  for name, label in (("direct", "python -c (no sandbox)"), ("sandboxed", "check_program")):
    p90 = result["per_program_p90_s"][name]
    print(f"  {label:<28}{median[name] * 1e3:>8.1f}ms{p90 * 1e3:>8.1f}ms")
  print(f"  overhead: +{result['overhead_s'] * 1e3:.1f} ms per program "
        f"({result['overhead_ratio']:.2f}x)")
  throughput = result["throughput_programs_per_s"]
  print(f"{args.programs} MBPP-like programs, {args.workers} workers: "
        f"{throughput['sandboxed']:.1f} programs/s sandboxed, "
        f"{throughput['direct']:.1f} programs/s direct; statuses {statuses}")
  print(f"containment active: {', '.join(sorted(result['containment']))}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
