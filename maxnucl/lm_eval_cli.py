"""maxnucl-lm-eval: lm-eval's command line with the "maxnucl" model (maxnucl/lm_eval_adapter.py).

A module of its own so that, without the `eval` extra, the console script refuses in one line
instead of failing to import the adapter (which subclasses lm-eval's model class).
"""

from __future__ import annotations

import sys

from maxnucl import dependencies


def main() -> int:
  try:
    dependencies.require(("lm_eval",), "maxnucl-lm-eval (the lm-evaluation-harness model)")
  except dependencies.MissingDependency as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from maxnucl import lm_eval_adapter  # pylint: disable=import-outside-toplevel
  return lm_eval_adapter.main()


if __name__ == "__main__":
  sys.exit(main())
