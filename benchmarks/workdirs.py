"""A benchmark's work directory: what a run writes there (gigabytes of synthetic checkpoints) is
removed when it ends, also after an error or Ctrl-C (and SIGTERM, with
`outputs.exit_on_sigterm()`), unless --keep; nothing else in the directory is ever touched.

    outputs.exit_on_sigterm()
    with workdirs.scratch(args.workdir, ["ckpt", ".ckpt.tmp-*", "report.json"],
                          keep=args.keep) as work:
      ...
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from typing import Iterator, Sequence


def _matches(work: pathlib.Path, patterns: Sequence[str]) -> set[pathlib.Path]:
  return {path for pattern in patterns for path in work.glob(pattern)}


def remove(work: pathlib.Path, patterns: Sequence[str], remove_dir: bool) -> None:
  """Delete the entries of `work` matching `patterns` (glob, one level), then `work` itself if
  `remove_dir` and nothing else is left in it."""
  for path in _matches(work, patterns):
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    else:
      path.unlink(missing_ok=True)
  if remove_dir and work.is_dir() and not any(work.iterdir()):
    work.rmdir()


@contextlib.contextmanager
def scratch(workdir: str | os.PathLike, patterns: Sequence[str], keep: bool
            ) -> Iterator[pathlib.Path]:
  """`workdir` (created if absent) for a run that writes the entries `patterns` match; they are
  removed afterwards unless `keep`, and so is `workdir` if it then is empty and held nothing
  else before the run (absent, or only what a kept run wrote)."""
  work = pathlib.Path(workdir)
  ours = not work.exists() or set(work.iterdir()) <= _matches(work, patterns)
  work.mkdir(parents=True, exist_ok=True)
  try:
    yield work
  finally:
    if not keep:
      remove(work, patterns, remove_dir=ours)
