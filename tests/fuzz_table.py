"""The reliability table of docs/untrusted-input.md from the fuzz tests' counts.

    MAXNUCL_FUZZ_RECORD=/tmp/fuzz.jsonl python -m pytest -q tests/test_fuzz_*.py
    python tests/fuzz_table.py /tmp/fuzz.jsonl

Each line of the record is one reader's counts (tests/fuzzing.py, `Tally.record`); a reader
recorded twice (two runs appended) is summed.
"""

import collections
import json
import sys

import fuzzing


def table(lines) -> str:
  totals = collections.defaultdict(collections.Counter)
  for line in lines:
    if line.strip():
      record = json.loads(line)
      totals[record.pop("reader")].update(record)
  kinds = (fuzzing.ACCEPTED, fuzzing.REFUSED) + fuzzing.DEFECTS
  out = ["| reader | mutants | " + " | ".join(kinds) + " |",
         "|---|---:|" + "---:|" * len(kinds)]
  for reader, counts in sorted(totals.items()):
    out.append(f"| {reader} | {sum(counts.values())} | "
               + " | ".join(str(counts[k]) for k in kinds) + " |")
  return "\n".join(out)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python tests/fuzz_table.py RECORD.jsonl")
  with open(sys.argv[1]) as f:
    print(table(f))
