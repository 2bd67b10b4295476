"""Specification of decoder-only features: concatenation, loss mask, truncation and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The project's own model, imported (not importorskip'd): if it breaks, the packed-loss test on
# the real model must fail, not be skipped.
from maxnucl import models
from maxnucl.data import packing
from maxnucl.data import synthetic
from maxnucl.data import vocabularies
from tolerances import decoder_terms, magnitude, rounding_atol

BOS, EOS = vocabularies.BOS_ID, vocabularies.EOS_ID


def segment(inputs, targets, seq_len=32, **kwargs):
  return packing.example_segment(inputs, targets, seq_len=seq_len, bos_id=BOS, eos_id=EOS,
                                 **kwargs)


def test_segment_is_bos_inputs_targets_with_next_token_targets_and_eos_last():
  tokens, targets, loss_mask = segment([10, 11], [20, 21, 22])
  np.testing.assert_array_equal(tokens, [BOS, 10, 11, 20, 21, 22])
  np.testing.assert_array_equal(targets, [10, 11, 20, 21, 22, EOS])
  np.testing.assert_array_equal(loss_mask, [0, 0, 1, 1, 1, 1])  # targets and EOS only


def test_loss_on_inputs_counts_every_position():
  _, _, loss_mask = segment([10, 11], [20], loss_on_inputs=True)
  np.testing.assert_array_equal(loss_mask, [1, 1, 1, 1])


def test_truncation_keeps_answer_and_the_end_of_the_prompt():
  tokens, targets, loss_mask = segment(list(range(10, 20)), [30, 31], seq_len=6)
  np.testing.assert_array_equal(tokens, [BOS, 17, 18, 19, 30, 31])
  np.testing.assert_array_equal(targets, [17, 18, 19, 30, 31, EOS])
  np.testing.assert_array_equal(loss_mask, [0, 0, 0, 1, 1, 1])
  tokens, targets, loss_mask = segment([10, 11, 12], [30, 31, 32, 33], seq_len=4)
  np.testing.assert_array_equal(tokens, [BOS, 30, 31, 32])  # targets alone fill the row
  np.testing.assert_array_equal(targets, [30, 31, 32, 33])  # EOS lost only in this case
  np.testing.assert_array_equal(loss_mask, [1, 1, 1, 1])


def test_truncation_with_room_keeps_eos():
  tokens, targets, _ = segment(list(range(10, 20)), [30, 31], seq_len=5)
  assert len(tokens) == 5 and targets[-1] == EOS and tokens[0] == BOS


def test_feature_lengths_truncate_inputs_from_the_left_and_targets_from_the_right():
  tokens, targets, _ = segment([10, 11, 12, 13], [20, 21, 22],
                               feature_lengths={"inputs": 2, "targets": 1})
  np.testing.assert_array_equal(tokens, [BOS, 12, 13, 20])
  np.testing.assert_array_equal(targets, [12, 13, 20, EOS])


def test_packing_assigns_segment_ids_and_restarting_positions():
  segments = [segment([10], [20]), segment([11, 12], [21]), segment([13], [22, 23])]
  rows = packing.pack_segments(segments, seq_len=8)
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 0],
                                                      [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 1, 2, 3, 0],
                                                    [0, 1, 2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["tokens"][0], [BOS, 10, 20, BOS, 11, 12, 21, 0])
  np.testing.assert_array_equal(rows["targets"][0], [10, 20, EOS, 11, 12, 21, EOS, 0])
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 1, 1, 0, 0, 1, 1, 0])
  assert {k: v.dtype for k, v in rows.items()} == packing.FEATURE_DTYPES


def test_unpacked_rows_hold_one_example_each():
  segments = [segment([10], [20]), segment([11, 12], [21])]
  rows = packing.pack_segments(segments, seq_len=8, pack=False)
  assert rows["tokens"].shape == (2, 8)
  assert rows["segment_ids"].max(axis=1).tolist() == [1, 1]


# ---- packed loss == unpacked loss ----------------------------------------------------------------

def _examples(num):
  tokenizer = vocabularies.ByteTokenizer()
  problems = [synthetic.format_arithmetic_problem(synthetic.arithmetic_problem(0, "train", i))
              for i in range(num)]
  return [segment(tokenizer.encode(p["inputs"]), tokenizer.encode(p["targets"]), seq_len=128)
          for p in problems]


def _summed_nll(logits, rows):
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, jnp.asarray(rows["targets"])[..., None], axis=-1)[..., 0]
  return float(jnp.sum(nll * rows["loss_mask"])), float(rows["loss_mask"].sum())


def _stand_in_terms(length=256, width=16):
  """Roundings along a stand-in logit: the masked mean over up to `length` positions (a sum and
  a division), the position's addition and tanh, the output projection over `width`."""
  return length + 1 + 2 + width


def _stand_in_causal_model(vocab_size=384, width=16):
  """Prediction at t depends only on tokens <= t of its own segment, and on its position."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  embed = jax.random.normal(keys[0], (vocab_size, width))
  position = jax.random.normal(keys[1], (512, width))
  out = jax.random.normal(keys[2], (width, vocab_size))

  def apply(tokens, segment_ids, positions):
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
    mask = (same_segment & causal).astype(jnp.float32)
    hidden = jnp.einsum("bts,bsd->btd", mask, embed[tokens]) / mask.sum(-1, keepdims=True)
    return jnp.tanh(hidden + position[positions]) @ out
  return jax.jit(apply)


def _real_model():
  cfg = models.get_config("gemma2_tiny")
  params = models.init(cfg, jax.random.PRNGKey(0))
  return jax.jit(lambda tokens, segment_ids, positions: models.apply(
      cfg, params, tokens, segment_ids=segment_ids, positions=positions))


@pytest.mark.parametrize("model_factory,logit_terms", [
    (_stand_in_causal_model, _stand_in_terms()),
    (_real_model, decoder_terms(models.get_config("gemma2_tiny"), 256)),
], ids=["stand_in", "gemma2_tiny"])
def test_packed_loss_equals_unpacked(model_factory, logit_terms):
  model = model_factory()
  examples = _examples(9)
  packed = packing.pack_segments(examples, seq_len=256, pack=True)
  unpacked = packing.pack_segments(examples, seq_len=256, pack=False)
  assert len(packed["tokens"]) < len(unpacked["tokens"])  # several examples per row
  padding = packing.empty_rows(len(unpacked["tokens"]) - len(packed["tokens"]), 256)
  packed = {k: np.concatenate([packed[k], padding[k]]) for k in packed}  # one shape, one compile
  losses, largest_logit = [], 0.0
  for rows in (packed, unpacked):
    logits = model(jnp.asarray(rows["tokens"]), jnp.asarray(rows["segment_ids"]),
                   jnp.asarray(rows["positions"]))
    losses.append(_summed_nll(logits, rows))
    largest_logit = max(largest_logit, magnitude(logits))
  (packed_sum, packed_count), (unpacked_sum, unpacked_count) = losses
  assert packed_count == unpacked_count
  # A token's NLL: a logit's path and the log-softmax over the vocabulary, relative to log Z <=
  # the largest logit + log V; the mean: a float32 sum of non-negative NLLs over every position.
  mean, (num_rows, length, vocab) = unpacked_sum / unpacked_count, logits.shape
  atol = (rounding_atol(largest_logit + np.log(vocab), logit_terms + vocab)
          + rounding_atol(mean, num_rows * length))
  np.testing.assert_allclose(packed_sum / packed_count, mean, rtol=0, atol=atol)


def test_short_examples_are_not_truncated():
  tokens, targets, _ = segment([10, 11, 12], [20], seq_len=100, feature_lengths={"inputs": 50})
  np.testing.assert_array_equal(tokens, [BOS, 10, 11, 12, 20])
  np.testing.assert_array_equal(targets, [10, 11, 12, 20, EOS])


def test_synthetic_problems_fit_a_128_token_byte_row_untruncated():
  tokenizer = vocabularies.ByteTokenizer()
  for i in range(3000):
    problem = synthetic.format_arithmetic_problem(synthetic.arithmetic_problem(0, "train", i))
    length = 1 + len(tokenizer.encode(problem["inputs"] + problem["targets"]))
    assert length <= 128, problem


def test_synthetic_solutions_are_correct_arithmetic_ending_in_the_answer():
  for i in range(500):
    answer = synthetic.arithmetic_problem(1, "test", i)["answer"]
    *steps, final = answer.split("\n")
    for step in steps:
      expression, result = step.split(" = ")
      assert eval(expression) == int(result), answer  # pylint: disable=eval-used
    assert final == f"#### {steps[-1].split(' = ')[1]}"
  assert synthetic.arithmetic_problem(0, "train", 7) == synthetic.arithmetic_problem(0, "train", 7)
  assert synthetic.arithmetic_problem(0, "train", 7) != synthetic.arithmetic_problem(1, "train", 7)
