"""Real runs of the command-line tools interrupted mid-write (SIGKILL, SIGTERM) for the tests."""

import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from maxnucl import checkpoints, models

REPO = pathlib.Path(__file__).absolute().parents[1]

# Large enough (about 93 MB in float32) that writing it takes most of a second, so a run can be
# caught while its temporary directory is half written.
MEDIUM = models.get_config("gemma2_tiny").replace(
    name="gemma2_medium_test", vocab_size=16384, d_model=512, ffn_dim=2048, num_heads=8,
    num_kv_heads=4, head_dim=64)


def write_medium_checkpoint(path: pathlib.Path) -> pathlib.Path:
  """A random MEDIUM checkpoint (StreamingWriter, float32), without compiling anything."""
  rng = np.random.default_rng(0)
  with checkpoints.StreamingWriter(path, MEDIUM) as writer:
    for keys, leaf in jax.tree_util.tree_flatten_with_path(models.abstract_params(MEDIUM))[0]:
      writer.write(tuple(k.key for k in keys),
                   rng.standard_normal(leaf.shape, dtype=np.float32) / 16)
  return path


def temporaries(output: pathlib.Path) -> list[pathlib.Path]:
  """The hidden temporary siblings `.NAME.tmp-*` of `output`."""
  return sorted(output.parent.glob(f".{output.name}.tmp-*"))


def start_and_wait_until_writing(tool: str, args, output: pathlib.Path,
                                 timeout_s: float = 120.0) -> subprocess.Popen:
  """Start `python tools/TOOL ARGS` and return it as soon as data (a non-empty file other than
  the owner record) appears in a temporary sibling of `output`: the run is mid-write."""
  process = subprocess.Popen([sys.executable, str(REPO / "tools" / tool), *map(str, args)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    for tmp in temporaries(output):
      try:
        if any(p.is_file() and p.name != "owner.json" and p.stat().st_size > 0
               for p in tmp.rglob("*")):
          return process
      except FileNotFoundError:  # files renamed or removed while listed
        pass
    if process.poll() is not None:
      stdout, stderr = process.communicate()
      raise AssertionError(f"{tool} finished (status {process.returncode}) before it could be "
                           f"interrupted mid-write:\n{stdout}\n{stderr}")
    time.sleep(0.002)
  process.kill()
  raise AssertionError(f"{tool} wrote nothing into a temporary of {output} in {timeout_s} s")
