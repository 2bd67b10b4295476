"""Optional dependencies: which pip extra installs each, and a one-line refusal before any work.

maxnucl's core (requirements.txt) trains, converts, prunes and evaluates.  A few commands need
more, installed by an extra of setup.py:

  hf     torch, transformers  the Hugging Face reference: the reproduction's export stage loads
                              the exported model with transformers and compares its logits
  eval   lm_eval (+ datasets, accelerate)  maxnucl-lm-eval, the lm-evaluation-harness model

A command calls `require(...)` with everything the requested work will import, before it creates
a file, so a missing extra costs a second, not an hour of work that then dies at its last stage.
"""

from __future__ import annotations

import importlib.util
from typing import Iterable

# import name -> the extra of setup.py that installs it
EXTRA_OF = {"torch": "hf", "transformers": "hf", "lm_eval": "eval", "datasets": "eval",
            "accelerate": "eval"}


class MissingDependency(RuntimeError):
  """An optional package that the requested work imports is not installed."""


def available(module: str) -> bool:
  """Whether `module` can be imported, found without importing it (torch takes seconds)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def require(modules: Iterable[str], purpose: str) -> None:
  """Raise MissingDependency, one line naming the modules and the extra, if any is missing."""
  missing = [m for m in modules if not available(m)]
  if missing:
    extras = sorted({EXTRA_OF.get(m, "?") for m in missing})
    install = " ".join(f'"maxnucl[{e}]"' for e in extras)
    raise MissingDependency(
        f"{purpose} needs {', '.join(missing)}, which this environment lacks: install the "
        f"{'/'.join(extras)} extra, pip install {install} (in a checkout: pip install -e "
        f"\".[{','.join(extras)}]\")")
