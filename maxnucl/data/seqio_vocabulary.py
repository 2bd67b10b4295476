"""A `seqio.Vocabulary` over a Hugging Face tokenizer.json, with the ids of
`vocabularies.HuggingFaceTokenizer` (imports seqio and TensorFlow).

seqio's `tokenize` preprocessor calls `encode_tf` on a scalar string inside `tf.data` maps, and
its metrics call `decode_tf`; the `tokenizers` library has no TensorFlow ops, so both run the
Python tokenizer through `tf.numpy_function`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

if TYPE_CHECKING:  # vocabularies imports this module (lazily: it imports TensorFlow)
  from maxnucl.data import vocabularies


class HuggingFaceVocabulary(seqio.Vocabulary):
  """seqio's view of a `vocabularies.HuggingFaceTokenizer` (no extra ids; EOS, pad as the
  tokenizer's; no unk: every id below vocab_size is a token)."""

  def __init__(self, tokenizer: vocabularies.HuggingFaceTokenizer):
    super().__init__(extra_ids=0)
    self.tokenizer = tokenizer

  @property
  def bos_id(self) -> int:
    return self.tokenizer.bos_id

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id

  @property
  def unk_id(self) -> Optional[int]:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.encode(s)

  def _decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids])

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """A scalar string -> int32 ids [n]."""
    def encode(text) -> np.ndarray:  # bytes, or a 0-d array of them (eager)
      text = np.asarray(text).item().decode("utf-8")
      return np.asarray(self.tokenizer.encode(text), np.int32).reshape(-1)
    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int ids [..., n] -> strings [...] (ids after the first EOS are already pad)."""
    def decode(batch: np.ndarray) -> np.ndarray:
      rows = batch.reshape(-1, batch.shape[-1]) if batch.ndim else batch.reshape(1, 1)
      texts = [self.tokenizer.decode(row.tolist()).encode("utf-8") for row in rows]
      return np.asarray(texts, dtype=object).reshape(batch.shape[:-1])
    texts = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    texts.set_shape(ids.shape[:-1])
    return texts

  def __eq__(self, other) -> bool:
    return (isinstance(other, HuggingFaceVocabulary)
            and self.tokenizer.model_file == other.tokenizer.model_file)

  def __hash__(self) -> int:
    return hash(self.tokenizer.model_file)
