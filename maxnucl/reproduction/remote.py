"""A reproduction whose `--output` is a URL (`gs://bucket/dir`, `file:///dir`): the stages run in a
local staging directory, and each finished stage is uploaded to the URL.

    remote = RemoteOutput("gs://b/repro", staging_dir)
    remote.download_finished(stages.STAGES)      # the stages already finished there, into staging
    runner = stages.Reproduction(staging_dir, ...)
    runner.on_stage_done = remote.upload_stage   # each stage, as it finishes
    ...
    remote.upload_changed()                      # the report

A bucket has no rename, so a stage cannot appear there in one step.  What marks a stage finished
is the same file as in a local output, `stages/<stage>.json`, and it is uploaded last:
  1. every file of the staging directory that is new or changed since the last upload (each file
     whole: an object appears only when its upload completes);
  2. `uploads/<stage>.json`, the list of the files of step 1 (the stage's record included);
  3. `stages/<stage>.json`.
An upload interrupted before step 3 leaves the stage unfinished at the URL: the next run does not
download its files and runs the stage again.  A run starts by downloading, for every stage whose
record is at the URL, the files of its upload list (and `settings.json`, which a rerun with other
settings is checked against).  The compilation cache (`.jax_cache/`) stays in staging.

The default staging directory is fixed per URL (`default_staging_dir`), so a rerun on the same
machine also finds the checkpoints of an interrupted training run there and continues it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Sequence

from maxnucl import paths

log = logging.getLogger(__name__)

UPLOADS = "uploads"         # uploads/<stage>.json: the files uploaded with the stage
LOCAL_ONLY = (".jax_cache",)  # top-level entries of staging that are never uploaded


def default_staging_dir(url: str) -> pathlib.Path:
  """<tmp>/maxnucl_reproduce/<hash of the URL>: the same directory for every run on `url`."""
  digest = hashlib.sha256(paths.url_key(url).encode()).hexdigest()[:16]
  return pathlib.Path(tempfile.gettempdir()) / "maxnucl_reproduce" / digest


class RemoteOutput:
  """The URL `url` mirrored from the local directory `staging` (see the module docstring)."""

  def __init__(self, url: str, staging: str | os.PathLike):
    self.url = paths.as_path(url)
    self.staging = pathlib.Path(staging).absolute()
    self.staging.mkdir(parents=True, exist_ok=True)
    self._uploaded: dict[tuple[str, ...], tuple[int, int]] = {}  # file -> its (size, mtime)

  def download_finished(self, stage_names: Sequence[str]) -> list[str]:
    """Copy `settings.json` and the files of every stage finished at the URL into staging; the
    stages found."""
    wanted = [("settings.json",)] if paths.exists(self.url / "settings.json") else []
    finished = [s for s in stage_names if paths.exists(self.url / "stages" / f"{s}.json")]
    for stage in finished:
      listed = json.loads((self.url / UPLOADS / f"{stage}.json").read_text())["files"]
      wanted += [tuple(name.split("/")) for name in listed]
    for parts in dict.fromkeys(wanted):
      local = self.staging.joinpath(*parts)
      local.parent.mkdir(parents=True, exist_ok=True)
      paths.copy_file(self.url.joinpath(*parts), local)
      self._uploaded[parts] = _signature(local)
    if finished:
      log.info("%s: finished stages %s downloaded into %s", self.url, finished, self.staging)
    return finished

  def upload_stage(self, stage: str) -> None:
    """Upload what changed in staging, then the stage's file list, then its record (last)."""
    record = ("stages", f"{stage}.json")
    changed = [p for p in self._changed() if p != record]
    self._upload(changed)
    listed = ["/".join(p) for p in [*changed, record]]
    (self.url / UPLOADS).mkdir(parents=True, exist_ok=True)
    (self.url / UPLOADS / f"{stage}.json").write_text(json.dumps({"files": listed}, indent=1))
    self._upload([record])
    log.info("stage %s: uploaded to %s (%d files)", stage, self.url, len(listed))

  def upload_changed(self) -> None:
    """Upload every file of staging that is new or changed (the report)."""
    self._upload(self._changed())

  def _changed(self) -> list[tuple[str, ...]]:
    return [parts for parts in paths.files_below(self.staging)
            if parts[0] not in LOCAL_ONLY
            and self._uploaded.get(parts) != _signature(self.staging.joinpath(*parts))]

  def _upload(self, files: Sequence[tuple[str, ...]]) -> None:
    for parts in files:
      local, remote = self.staging.joinpath(*parts), self.url.joinpath(*parts)
      remote.parent.mkdir(parents=True, exist_ok=True)
      paths.copy_file(local, remote)
      self._uploaded[parts] = _signature(local)


def _signature(path: pathlib.Path) -> tuple[int, int]:
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns
