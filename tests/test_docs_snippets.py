"""The documentation runs: every ```python block of README.md and docs/*.md is executed.

Each block runs as written, in a fresh namespace and a fresh temporary working directory, after
the reviewed rewrites of SUBSTITUTIONS (a 2.6B-parameter preset becomes the 0.3M `gemma2_tiny`, a
documented path becomes a fixture prepared here).  An HTML comment on the line right before a
fence (invisible on GitHub) says more about its block:

    <!-- inputs: cfg, params, logits, batch -->   names the block uses as "your data", described
                                                  in the prose around it; bound from INPUTS
    <!-- not executed: <why> -->                  pseudo-code or a fragment: reported as skipped,
                                                  with the reason

Every other ```python block runs; a failure names the file and line of the block and of the
failing statement.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import textwrap
import traceback
from typing import Optional

import gin
import jax
import jax.numpy as jnp
import pytest

from maxnucl import checkpoints, models, sharding, train
from maxnucl.data import catalog
from maxnucl.losses import registry
from maxnucl.pruning import scores

REPO = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = ("README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
PYTHON_INFO = ("python", "py", "python3")  # info strings GitHub highlights as Python

# The only rewrites of a block before it runs: (text, replacement), applied to every block.  Each
# must still occur in some block (test_every_substitution_is_used), so none outlives its reason.
SUBSTITUTIONS = (
    ('"gemma2_2b"', '"gemma2_tiny"'),  # the same code path, 0.3M instead of 2.6B parameters
    ('"/ckpt/run1"', '"ckpt/run1"'),  # into the block's temporary working directory
    ('"/tmp/maxnucl_demo"', '"{demo_workdir}"'),  # the demo's workdir: see demo_workdir
)

_TOKENS = [[2, 17, 29, 31]]  # BOS and three tokens [batch, length]
_TARGETS = [[17, 29, 31, 53]]  # the next token at each position

# What `<!-- inputs: ... -->` may name: tiny stand-ins for the reader's data, made on demand from
# the tiny model (cfg, params).
INPUTS = {
    "cfg": lambda cfg, params: cfg,
    "params": lambda cfg, params: params,
    "tokens": lambda cfg, params: jnp.array(_TOKENS),
    "logits": lambda cfg, params: models.apply(cfg, params, jnp.array(_TOKENS)),
    "batch": lambda cfg, params: {"targets": jnp.array(_TARGETS),
                                  "loss_mask": jnp.ones((1, 4), jnp.float32)},
    "mesh": lambda cfg, params: sharding.create_mesh((1, -1, 1)),
    "rules": lambda cfg, params: sharding.logical_axis_rules(),
    "prompts": lambda cfg, params: [[2, 17, 29], [2, 31]],
    "contexts": lambda cfg, params: [[2, 17, 29], [2, 31]],
    "continuations": lambda cfg, params: [[53], [17, 29]],
    "documents": lambda cfg, params: [[17, 29, 31, 53] * 3, [31]],
}

# Registries a block may extend (e.g. docs/losses.md registers a loss term): restored after it.
REGISTRIES = (registry.LOSS_TERMS, models.PRESETS, scores.METHODS, catalog.TASKS,
              catalog.MIXTURES)


# ---- the blocks -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
  """One ```python block: where its fence opens, its code and the markers before it."""
  path: str  # relative to the repository, e.g. "docs/decoding.md"
  line: int  # 1-based line of the opening fence; the code starts on the next one
  code: str
  inputs: tuple[str, ...] = ()
  not_executed: Optional[str] = None  # the reason given in the marker

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*(inputs|not executed):(.*?)-->\s*$")


def python_blocks(text: str, path: str) -> list[Block]:
  """The ```python blocks of a markdown text, with the markers on the lines right before them."""
  lines = text.splitlines()
  blocks, i = [], 0
  while i < len(lines):
    fence = _FENCE.match(lines[i])
    if not fence:
      i += 1
      continue
    _, marks, info = fence.groups()
    end = i + 1
    while end < len(lines) and not re.fullmatch(
        rf"\s*{re.escape(marks[0])}{{{len(marks)},}}\s*", lines[end]):
      end += 1
    if end == len(lines):
      raise ValueError(f"{path}:{i + 1}: the ```{info} block opened here is never closed")
    if info.lower() in PYTHON_INFO:
      markers = {}
      above = i - 1
      while above >= 0 and (marker := _MARKER.match(lines[above])):
        markers[marker.group(1)] = marker.group(2).strip()
        above -= 1
      if "not executed" in markers and not markers["not executed"]:
        raise ValueError(f"{path}:{above + 2}: `<!-- not executed: ... -->` needs a reason")
      inputs = tuple(n.strip() for n in markers.get("inputs", "").split(",") if n.strip())
      code = textwrap.dedent("\n".join(lines[i + 1:end]))  # fences may be indented in lists
      blocks.append(Block(path, i + 1, code, inputs, markers.get("not executed")))
    i = end + 1
  return blocks


BLOCKS = [block for path in DOC_FILES
          for block in python_blocks((REPO / path).read_text(encoding="utf-8"), path)]


def _params() -> list:
  return [pytest.param(block, id=block.where, marks=(
      pytest.mark.skip(reason=f"{block.where} not executed: {block.not_executed}")
      if block.not_executed else ())) for block in BLOCKS]


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  """What the README's demo (`python -m maxnucl.train --gin_file=gin/demo_cpu.gin
  --workdir=/tmp/maxnucl_demo`) leaves for the blocks that read it: the demo's model as the last
  step's checkpoint in `checkpoints/<num_steps>/`, untrained (training takes 45 s; the snippets
  need its shapes, not its answers)."""
  gin.clear_config()
  try:
    train.parse_gin(["gin/demo_cpu.gin"], [])
    cfg = models.configured_model()
    num_steps = gin.query_parameter("train_loop.num_steps")
  finally:
    gin.clear_config()
  workdir = tmp_path_factory.mktemp("maxnucl_demo")
  checkpoints.save(workdir / "checkpoints" / str(num_steps), cfg,
                   models.init(cfg, jax.random.PRNGKey(0)))
  return workdir


@pytest.fixture(scope="module")
def tiny_model():
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  return cfg, models.init(cfg, jax.random.PRNGKey(0))


@pytest.fixture
def restored_registries():
  saved = [dict(r) for r in REGISTRIES]
  yield
  for live, before in zip(REGISTRIES, saved):
    live.clear()
    live.update(before)


# ---- the tests ------------------------------------------------------------------------------------

def _names(code: str) -> set[str]:
  return {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)}


# offline_data: datasets from tests/fixtures and a clean gin config.
@pytest.mark.usefixtures("offline_data", "restored_registries")
@pytest.mark.parametrize("block", _params())
def test_documented_python_block_runs(block, request, demo_workdir, tmp_path, monkeypatch):
  source = block.code
  for text, replacement in SUBSTITUTIONS:
    source = source.replace(text, replacement.format(demo_workdir=demo_workdir))
  namespace = {"__name__": "__main__"}
  unknown = [name for name in block.inputs if name not in INPUTS]
  assert not unknown, (f"{block.where}: `<!-- inputs: ... -->` names {unknown}; "
                       f"tests/test_docs_snippets.py knows {sorted(INPUTS)}")
  unused = [name for name in block.inputs if name not in _names(block.code)]
  assert not unused, f"{block.where}: inputs {unused} are declared but the block never uses them"
  if block.inputs:
    cfg, params = request.getfixturevalue("tiny_model")
    namespace.update({name: INPUTS[name](cfg, params) for name in block.inputs})
  monkeypatch.chdir(tmp_path)
  # Padded so that line numbers in tracebacks are the markdown file's.
  code = compile("\n" * block.line + source, str(REPO / block.path), "exec")
  try:
    exec(code, namespace)  # pylint: disable=exec-used
  except Exception as error:  # pylint: disable=broad-except
    lines = [line for frame, line in traceback.walk_tb(error.__traceback__)
             if frame.f_code.co_filename == code.co_filename]
    raise AssertionError(
        f"{block.path}:{lines[-1] if lines else block.line}: the ```python block at "
        f"{block.where} fails: {type(error).__name__}: {error}") from error


def test_every_python_block_runs_or_says_why_not():
  """Counted line by line, independently of `python_blocks`: no ```python block is missed."""
  fence = re.compile(rf"^\s*(```|~~~)\s*({'|'.join(PYTHON_INFO)})(\s|$)", re.IGNORECASE)
  opened = [f"{path}:{n}" for path in DOC_FILES
            for n, line in enumerate((REPO / path).read_text(encoding="utf-8").splitlines(), 1)
            if fence.match(line)]
  assert [block.where for block in BLOCKS] == opened
  run = [block.where for block in BLOCKS if not block.not_executed]
  print(f"{len(run)} of {len(BLOCKS)} ```python blocks run: {', '.join(run)}")
  for block in BLOCKS:
    if block.not_executed:
      print(f"not executed: {block.where}: {block.not_executed}")
  assert run, "no ```python block found in README.md and docs/*.md"


def test_every_substitution_is_used():
  unused = [text for text, _ in SUBSTITUTIONS
            if not any(text in block.code for block in BLOCKS if not block.not_executed)]
  assert not unused, f"SUBSTITUTIONS {unused} match no executed block any more: remove them"


def test_markers_and_line_numbers_are_read():
  text = textwrap.dedent("""\
      # Title

      ```python
      a = 1
      ```
      <!-- not executed: shape notation -->
      ```python
      y = f(x)  # [B, T]
      ```
      ```bash
      echo not python
      ```
      <!-- inputs: cfg, params -->
      ```py
      cfg, params
      ```

      1. A list item:

         ```python
         b = 2
         ```
      """)
  blocks = python_blocks(text, "doc.md")
  assert [(b.where, b.code, b.inputs, b.not_executed) for b in blocks] == [
      ("doc.md:3", "a = 1", (), None),
      ("doc.md:7", "y = f(x)  # [B, T]", (), "shape notation"),
      ("doc.md:14", "cfg, params", ("cfg", "params"), None),
      ("doc.md:20", "b = 2", (), None)]
  with pytest.raises(ValueError, match=r"doc.md:2: the ```python block opened here is never"):
    python_blocks("text\n```python\nx = 1\n", "doc.md")
  with pytest.raises(ValueError, match=r"doc.md:1: .* needs a reason"):
    python_blocks("<!-- not executed: -->\n```python\nx = 1\n```\n", "doc.md")
