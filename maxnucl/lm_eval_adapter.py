"""maxnucl as an lm-evaluation-harness model named "maxnucl": the harness's own tasks (HellaSwag,
ARC, PIQA, MMLU, TriviaQA, ...) on a maxnucl checkpoint, scored by `maxnucl.decoding`.

    maxnucl-lm-eval --model maxnucl --model_args checkpoint=DIR,vocab=tokenizer.model \\
        --tasks hellaswag,arc_easy,piqa --batch_size 16

    import lm_eval, maxnucl.lm_eval_adapter   # the import registers "maxnucl"
    lm_eval.simple_evaluate(model="maxnucl", model_args="checkpoint=DIR,vocab=tokenizer.model",
                            tasks=["arc_easy"])

`maxnucl-lm-eval` (or `python -m maxnucl.lm_eval_adapter`) is lm-eval's own command line, every
flag unchanged, with this model registered: lm-eval finds only its built-in models and those that
an import has registered, so its plain `lm_eval` command cannot know "maxnucl".  Its --help ends
with this model's arguments.  A run's results (--output_path) are named after the checkpoint, as
lm-eval names an hf model's after `pretrained`: OUTPUT_PATH/<checkpoint path, '/' -> '__'>/, and
"model_name" in results_*.json is the checkpoint as given.

model_args (comma-separated key=value):
  checkpoint     checkpoint directory or training workdir (its latest step)       (required)
  vocab          'byte', a SentencePiece model file (Gemma's tokenizer.model) or   default: the
                 a tokenizer.json                                                  training run's
                 (as maxnucl.generate: its record, else the checkpoint's           record, else
                 tokenizer/, else byte)                                            byte
  dtype          float32 | bfloat16: cast params and compute                        default stored
  max_length     longest scored sequence; longer contexts lose their start         default
                 (left truncation, as the harness's HF model does)                 max_positions
  max_gen_toks   default new-token budget of generate_until requests               default 256
  add_bos_token  put BOS before every context (as the trainer formats examples)    default: as
                                                                                   the vocabulary
                                                                                   (SmolLM2: no)
  mesh_shape     e.g. 1x-1x1 (data x fsdp x tensor) to shard a model that needs it default none
Requires the `eval` extra: pip install -e ".[eval]".
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import pathlib
import re
import sys
from typing import Optional

import jax
from tqdm import tqdm

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.loggers import evaluation_tracker
  from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
except ImportError as e:  # an optional dependency
  raise ImportError(f"maxnucl's lm-evaluation-harness model needs lm-eval ({e}): "
                    f"pip install -e \".[eval]\"") from e

from maxnucl import checkpoints, decoding, outputs, paths, sharding
from maxnucl.generate import load_model, load_tokenizer, model_vocab

# Arguments the harness passes to every model; JAX chooses its own devices.
_HARNESS_ARGS = ("device", "max_batch_size")


@register_model("maxnucl")
class MaxnuclLM(TemplateLM):
  """loglikelihood / loglikelihood_rolling / generate_until over `maxnucl.decoding`."""

  def __init__(self, checkpoint: str, vocab: Optional[str] = None, batch_size: int | str = 16,
               dtype: Optional[str] = None, max_length: Optional[int] = None,
               max_gen_toks: int = 256, add_bos_token: Optional[bool] = None,
               mesh_shape: Optional[str] = None, **harness_args):
    super().__init__()
    unknown = sorted(set(harness_args) - set(_HARNESS_ARGS))
    if unknown:
      raise ValueError(f"maxnucl model_args: unknown argument(s) {unknown}; known: checkpoint, "
                       f"vocab, batch_size, dtype, max_length, max_gen_toks, add_bos_token, "
                       f"mesh_shape")
    self.mesh = None
    if mesh_shape:
      shape = tuple(int(s) for s in str(mesh_shape).split("x"))
      self.mesh = sharding.create_mesh(shape)
    self.cfg, self.params = load_model(checkpoint, dtype=dtype, mesh=self.mesh)
    vocab, source = model_vocab(checkpoint, vocab)
    print(f"vocabulary: {vocab} ({source})", file=sys.stderr)
    self.tokenizer = load_tokenizer(self.cfg, vocab)
    self.checkpoint = checkpoint
    if str(batch_size).startswith("auto"):
      raise ValueError("maxnucl model: batch_size 'auto' is not supported; give a number")
    self.batch_size = int(batch_size)
    self._max_length = int(max_length or self.cfg.max_positions)
    if not 1 < self._max_length <= self.cfg.max_positions:
      raise ValueError(f"maxnucl model: max_length {self._max_length} must be in "
                       f"(1, {self.cfg.max_positions}] (the model's max_positions)")
    self.max_gen_toks = int(max_gen_toks)
    self.add_bos_token = (self.tokenizer.add_bos if add_bos_token in (None, "None", "")
                          else add_bos_token not in (False, "False", "false", "0"))

  # ---- tokens ---------------------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer.bos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs) -> list[int]:
    ids = self.tokenizer.encode(string)
    bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
    return [self.tokenizer.bos_id] + ids if bos and ids[:1] != [self.tokenizer.bos_id] else ids

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def get_model_info(self) -> dict:
    return {"model_name": self.cfg.name, "checkpoint": str(self.checkpoint),
            "model_num_parameters": sum(int(x.size) for x in jax.tree.leaves(self.params)),
            "model_dtype": self.cfg.dtype}

  # ---- scoring --------------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **unused) -> list[tuple[float, bool]]:
    """requests: ((context, continuation), context ids, continuation ids) -> (sum of log p,
    every continuation token greedy)."""
    contexts, continuations = [], []
    for _, context, continuation in requests:
      # Keep the whole continuation and as much of the context as fits (left truncation).
      keep = max(self.max_length + 1 - len(continuation), 1)
      contexts.append(list(context)[-keep:])
      continuations.append(list(continuation))
    bar = tqdm(total=len(requests), desc="maxnucl loglikelihood", disable=disable_tqdm)
    scores = decoding.score_tokens(self.cfg, self.params, contexts, continuations,
                                   batch_size=self.batch_size, mesh=self.mesh,
                                   progress=bar.update)
    bar.close()
    results = [(s.total, bool(s.greedy.all())) for s in scores]
    for (key, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Every token of each document scored once, in the harness's own disjoint windows."""
    windows, owners = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      pairs = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string, add_special_tokens=False),
          prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
      for context, continuation in pairs:
        windows.append((None, context, continuation))
        owners.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, scores):
      totals[owner] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ---- generation -----------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with do_sample) continuations cut before the first `until` string;
    requests with the same settings are batched, longest context first."""
    results: list[Optional[str]] = [None] * len(requests)
    order = Collator([(i, req.args) for i, req in enumerate(requests)],
                     sort_fn=lambda x: -len(self.tok_encode(x[1][0])),
                     group_fn=lambda x: x[1][1], group_by="gen_kwargs")
    bar = tqdm(total=len(requests), desc="maxnucl generate_until", disable=disable_tqdm)
    for batch in order.get_batched(n=self.batch_size):
      kwargs = normalize_gen_kwargs(batch[0][1][1], self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
      max_new = kwargs.pop("max_gen_toks")
      budget = self.max_length - max_new
      if budget < 1:
        raise ValueError(f"max_gen_toks {max_new} leaves no room for a context within "
                         f"max_length {self.max_length}")
      prompts = [self.tok_encode(context)[-budget:] for _, (context, _) in batch]
      generated = decoding.generate(
          self.cfg, self.params, prompts, max_new,
          temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
          top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), seed=int(kwargs.get("seed", 0)),
          stop_token_ids=[self.eot_token_id], stop_strings=until or None,
          tokenizer=self.tokenizer, mesh=self.mesh)
      for (index, (context, gen_kwargs)), tokens in zip(batch, generated):
        text = decoding.cut_at_stop(self.tok_decode(tokens), until)
        results[index] = text
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
      bar.update(len(batch))
    bar.close()
    return results


# ---- lm-eval's run records and command line ----------------------------------------------------

def _name_runs_after_the_checkpoint() -> None:
  """lm-eval names a run (its results folder under --output_path, "model_name") after the
  model_args pretrained/path/model/...; one of the "maxnucl" model, which has none of them, got
  a random name.  From here on it is named after its `checkpoint`."""
  tracker = evaluation_tracker.GeneralConfigTracker
  log_experiment_args = tracker.log_experiment_args
  if getattr(log_experiment_args, "names_maxnucl_runs", False):
    return

  @functools.wraps(log_experiment_args)
  def log_with_checkpoint_name(self, *args, **kwargs):
    log_experiment_args(self, *args, **kwargs)
    call = inspect.signature(log_experiment_args).bind(self, *args, **kwargs).arguments
    model_args = call.get("model_args") or {}
    if isinstance(model_args, str):
      model_args = lm_utils.simple_parse_args_string(model_args)
    if call.get("model_source") == "maxnucl" and model_args.get("checkpoint"):
      self.model_name = str(model_args["checkpoint"])
      self.model_name_sanitized = lm_utils.sanitize_model_name(self.model_name)

  log_with_checkpoint_name.names_maxnucl_runs = True
  tracker.log_experiment_args = log_with_checkpoint_name


_name_runs_after_the_checkpoint()


def model_help() -> str:
  """What `maxnucl-lm-eval --help` adds to lm-eval's help: the "maxnucl" model and its
  model_args (this module's docstring from its command-line paragraph on)."""
  example = __doc__[__doc__.index("    maxnucl-lm-eval"):__doc__.index("\n\n    import lm_eval")]
  details = __doc__[__doc__.index("`maxnucl-lm-eval`"):].rstrip()
  return f'the model "maxnucl" (a maxnucl checkpoint):\n{example}\n\n{details}'



def main() -> int:
  """lm-eval's command line with the "maxnucl" model registered and described in --help."""
  # pylint: disable=import-outside-toplevel,protected-access
  from lm_eval._cli import HarnessCLI
  from lm_eval.utils import setup_logging

  setup_logging()
  cli = HarnessCLI()
  for parser in (cli._parser, cli._subparsers.choices["run"]):  # lm-eval-harness 0.4.13's
    parser.epilog = f"{parser.epilog or ''}\n{model_help()}\n"
  args = cli.parse_args()
  outputs.hide_failed_write_noise()
  output_path = getattr(args, "output_path", None)
  try:
    _check_model_args(args)
    with outputs.failed_writes_raised(output_path), _SaveFailures(output_path) as failures:
      cli.execute(args)
    failures.raise_any()
  except outputs.WriteFailed as e:  # a full disk: a failure while working, not bad input
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (OSError, ValueError) as e:  # checkpoints.CheckpointError is a ValueError
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


class _SaveFailures(logging.Filter):
  """lm-eval's EvaluationTracker catches an error while saving the results or samples, logs
  "Could not save ..." and the error's repr, and the run exits 0 with a torn or missing file.
  Within this block those two records are taken off its logger; `raise_any()` then removes
  the files the run created under the output path and raises WriteFailed, one line naming the
  output path and the error."""

  LOGGER = "lm_eval.loggers.evaluation_tracker"
  _ERRNO = re.compile(r"^\w*Error\((\d+), ")

  def __init__(self, output_path):
    super().__init__()
    self.output_path = output_path
    self.messages: list[str] = []
    self.failed = False
    self._before: set = set()

  def __enter__(self) -> "_SaveFailures":
    self._before = set(self._files())
    logging.getLogger(self.LOGGER).addFilter(self)
    return self

  def __exit__(self, *exc) -> None:
    logging.getLogger(self.LOGGER).removeFilter(self)

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if message.startswith("Could not save"):
      self.failed = True
      return False
    if self.failed and record.levelno == logging.INFO and not self.messages:
      self.messages.append(message)  # the repr of the error, logged just after
      return False
    return True

  def _files(self) -> list[pathlib.Path]:
    if not self.output_path or paths.is_url(self.output_path):
      return []
    root = pathlib.Path(self.output_path)
    folder = root.parent if root.suffix == ".json" else root  # lm-eval's file or folder form
    return [p for p in folder.rglob("*") if p.is_file()]  # none while it does not exist

  def raise_any(self) -> None:
    if not self.failed:
      return
    for created in set(self._files()) - self._before:  # this run's: torn, or without the rest
      created.unlink(missing_ok=True)
    error = self.messages[0] if self.messages else "an error lm-eval did not name"
    code = self._ERRNO.match(error)
    if code and int(code[1]) in outputs.OUT_OF_SPACE:  # the one line every command prints
      raise outputs.WriteFailed(outputs.write_failure(
          OSError(int(code[1]), os.strerror(int(code[1]))), self.output_path))
    raise outputs.WriteFailed(f"lm-eval could not save its results under {self.output_path}: "
                              f"{error}")


def _check_model_args(args) -> None:
  """The maxnucl model's checkpoint and vocabulary exist (refused before the harness loads its
  tasks and datasets)."""
  model_args = getattr(args, "model_args", None)
  if getattr(args, "model", None) != "maxnucl" or not isinstance(model_args, dict):
    return
  if "checkpoint" not in model_args:
    raise ValueError("--model_args: the maxnucl model needs checkpoint=DIR (a checkpoint or a "
                     "training workdir)")
  checkpoints.resolve(model_args["checkpoint"])
  vocab = model_args.get("vocab")
  if vocab is None:
    checkpoints.own_vocab(model_args["checkpoint"], hint="give vocab=PATH in --model_args")
  elif str(vocab) != "byte" and not os.path.isfile(str(vocab)):
    raise FileNotFoundError(f"--model_args vocab={vocab}: no such SentencePiece model file or "
                            f"tokenizer.json (or 'byte')")


if __name__ == "__main__":
  sys.exit(main())
