"""The run files gin/gemma2_{2b,9b,27b}_{gsm8k,mbpp,superglue}.gin: each binds the paper's Gemma
recipe (Appendix C) to the right model and data, and one of them fine-tunes a checkpoint end to
end (shrunk to a tiny model, the fixture data files and a byte vocabulary)."""

import itertools
import json

import gin
import jax
import numpy as np
import pytest

from maxnucl import checkpoints
from maxnucl import losses
from maxnucl import models
from maxnucl import sharding
from maxnucl import train
from maxnucl.data import pipeline
from tolerances import EPS32, decoder_terms, rounding_atol

SIZES = ("2b", "9b", "27b")
TASKS = {"gsm8k": ("gsm8k", "test"), "mbpp": ("mbpp", "validation"),
         "superglue": ("super_glue_v102_proportional", "validation")}


def query(name):
  """A bound value, following macros (%NAME) to their values."""
  value = gin.query_parameter(name)
  while isinstance(value, gin.config.ConfigurableReference):
    value = gin.query_parameter(value.scoped_selector + ".value")
  return value


def parse(path, *bindings):
  gin.clear_config()
  train.parse_gin([path], list(bindings))


@pytest.mark.parametrize("size,task", list(itertools.product(SIZES, TASKS)))
def test_run_file_binds_the_paper_recipe(size, task):
  parse(f"gin/gemma2_{size}_{task}.gin")
  cfg = models.configured_model()
  assert cfg == models.get_config(f"gemma2_{size}", dtype="bfloat16", param_dtype="float32",
                                  dropout_rate=0.1, remat_policy="full")
  source, eval_split = TASKS[task]
  assert query("create_data_iterator.source") == source
  assert query("create_data_iterator.batch_size") == 16
  assert query("train_loop.eval_split") == eval_split
  assert query("create_optimizer.name") == "adafactor"
  schedule = train.learning_rate_schedule(num_steps=1000)
  # float32: the peak's own rounding, the warm-up fraction, its product with the peak, the sum
  peak = 1e-6
  np.testing.assert_allclose([schedule(0), schedule(50), schedule(100), schedule(999)],
                             [0.0, 0.5 * peak, peak, peak], rtol=0, atol=rounding_atol(peak, 4))
  terms = query("total_loss.terms")
  assert set(terms) == {"nucl_mstd"} and query("NUCL_ALPHA/gin.macro.value") > 0
  assert query("nucl.target") == "ffn_out"
  assert query("create_mesh.shape") == (1, -1, 1)


@pytest.mark.parametrize("preset, overrides", [
    ("gemma2_tiny", {}),
    # a Llama-family checkpoint (untied lm_head, Qwen2's biases) and a Gemma-3 one (QK-norm)
    ("llama_tiny", {"qkv_bias": True}),
    ("gemma3_tiny", {}),
])
def test_run_file_fine_tunes_a_checkpoint(tmp_path, offline_data, preset, overrides):
  """gin/gemma2_2b_gsm8k.gin (NUCL) with only the model shrunk, the data pointed at the fixture
  files and the checkpoint at a tiny saved one of any family: the run starts from exactly the
  checkpoint's params (the warm-up's first learning rate is 0, so after step 1 they are
  unchanged) and its first loss is the checkpoint's loss on the first batch."""
  tiny = models.get_config(preset, num_layers=2, ffn_widths=(24, 0), **overrides)
  params = models.init(tiny, jax.random.PRNGKey(7))
  checkpoints.save(tmp_path / "init", tiny, params)
  bindings = [f"model_config.preset = '{preset}'", "model_config.num_layers = 2",
              "model_config.dtype = 'float32'", "model_config.dropout_rate = 0.0",
              f"GEMMA2_CHECKPOINT = '{tmp_path / 'init'}'", "DATA_VOCAB = 'byte'",
              "DATA_SEQ_LEN = 64", "DATA_BATCH_SIZE = 4", "train_loop.num_steps = 1",
              "train_loop.eval_every = 0", "train_loop.progress_bar = False"]
  parse("gin/gemma2_2b_gsm8k.gin", *bindings)
  mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  result = train.train_loop(tmp_path / "run", mesh=mesh)

  assert result["cfg"].layer_ffn_widths == (24, 0)  # the checkpoint's architecture
  record = result["history"][0]
  assert record["learning_rate"] == 0.0
  for x, y in zip(jax.tree.leaves(result["state"]["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  batch = next(pipeline.create_data_iterator("train", seed=0))
  logits = models.apply(result["cfg"], params, batch["tokens"], batch["segment_ids"],
                        batch["positions"])
  expected, _ = losses.total_loss(params, logits, batch, result["cfg"])
  # the train step and this program: a loss's roundings (a logit's path, the log-softmax over the
  # vocabulary, the mean over the batch's tokens; NUCL's term adds a row's d_model + 2, fewer)
  tokens = batch["tokens"]
  np.testing.assert_allclose(record["loss"], float(expected), rtol=EPS32 * (
      decoder_terms(result["cfg"], tokens.shape[1]) + result["cfg"].vocab_size + tokens.size))
  assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["step"] == 1
