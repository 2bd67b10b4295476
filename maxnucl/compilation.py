"""Compilation that says so: XLA can work for minutes before a program's first result, so every
program the command lines wait for is compiled ahead of time (`jitted.lower(...).compile()`)
between two lines on stderr, printed by process 0 only:

    compiling the train step (gemma2_tiny, batch 16×64)…
    compiled in 6.1 s

    step = compile_announced(jax.jit(train_step, ...), state, batch, rng,
                             what="the train step (gemma2_tiny, batch 16×64)")

    @announced_jit(what=lambda a: f"scoring ({a['cfg'].name}, ...)", static_argnames=("cfg",))
    def score(cfg, params, tokens): ...     # like jax.jit; each new signature (static arguments,
                                            # shapes, dtypes, shardings) is compiled and announced
                                            # once, then its compiled program runs

The lines go through `tqdm.write`, so a progress bar on the same terminal is redrawn below them.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def announce(line: str) -> None:
  """One line on stderr from process 0 (a progress bar, if any, is redrawn after it)."""
  if jax.process_index() != 0:
    return
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  tqdm.write(line, file=sys.stderr)


def shape_text(array: Any) -> str:
  """An array's shape as the announcements write it: "16×64"."""
  return "×".join(str(n) for n in np.shape(array))


def compile_announced(jitted: Any, *args, what: str, **kwargs) -> jax.stages.Compiled:
  """`jitted.lower(*args, **kwargs).compile()` between "compiling {what}…" and "compiled in
  X s" (tracing, lowering and XLA's compilation: all the time the first call would take beyond
  running the program).  The result takes the non-static arguments only."""
  announce(f"compiling {what}…")
  start = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  announce(f"compiled in {time.perf_counter() - start:.1f} s")
  return compiled


def announced_jit(*, what: Callable[[dict], str], static_argnames: Sequence[str] = (),
                  **jit_kwargs) -> Callable[[Callable], "AnnouncedJit"]:
  """Decorator: `AnnouncedJit(fun, what, static_argnames, **jit_kwargs)`."""
  return lambda fun: AnnouncedJit(fun, what, static_argnames=static_argnames, **jit_kwargs)


class AnnouncedJit:
  """`jax.jit(fun, static_argnames=..., **jit_kwargs)` whose compilations are announced.

  A call whose static arguments, or whose other arguments' shapes, dtypes or shardings, are new
  compiles with `compile_announced`, naming the program by `what(arguments)` (the call's
  arguments by parameter name, defaults included); later calls with the same signature run that
  compiled program.  Inside another traced function (tracers among the arguments) it is plain
  `jax.jit`.
  """

  def __init__(self, fun: Callable, what: Callable[[dict], str], *,
               static_argnames: Sequence[str] = (), **jit_kwargs):
    self.jitted = jax.jit(fun, static_argnames=tuple(static_argnames), **jit_kwargs)
    self._signature = inspect.signature(fun)
    self._positional = list(self._signature.parameters)
    self._static = frozenset(static_argnames)
    self._what = what
    self._compiled: dict[Any, jax.stages.Compiled] = {}
    functools.update_wrapper(self, fun)

  def __call__(self, *args, **kwargs):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
      return self.jitted(*args, **kwargs)
    static_positions = [name in self._static for name in self._positional[:len(args)]]
    dynamic_args = tuple(a for a, static in zip(args, static_positions) if not static)
    dynamic_kwargs = {k: v for k, v in kwargs.items() if k not in self._static}
    static = (tuple(a for a, static in zip(args, static_positions) if static),
              tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static)))
    leaves, tree = jax.tree.flatten((dynamic_args, dynamic_kwargs))
    key = (static, tree, tuple(_abstract(x) for x in leaves))
    compiled = self._compiled.get(key)
    if compiled is None:
      bound = self._signature.bind(*args, **kwargs)
      bound.apply_defaults()
      compiled = compile_announced(self.jitted, *args, what=self._what(bound.arguments), **kwargs)
      self._compiled[key] = compiled
    return compiled(*dynamic_args, **dynamic_kwargs)


def _abstract(x: Any) -> Any:
  """What a compiled program is specialised to: shape, dtype, weak type and sharding."""
  if isinstance(x, jax.Array):
    return ("array", x.shape, x.dtype, x.weak_type, x.sharding)
  if isinstance(x, (np.ndarray, np.generic)):
    return ("numpy", x.shape, x.dtype)
  return ("python", type(x))  # a Python scalar: a weakly typed scalar of its type
