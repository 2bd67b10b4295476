"""The seqio registrations mirror the TF-free catalog (the one test module importing TF)."""

import gin
import numpy as np
import pytest
import seqio  # a pinned dependency: a broken install fails here rather than skipping

from maxnucl.data import catalog
from maxnucl.data import pipeline
from maxnucl.data import tasks
from maxnucl.data import vocabularies


@pytest.fixture(autouse=True)
def small_data(offline_data):  # offline_data: tests/conftest.py
  gin.parse_config(["synthetic_arithmetic_settings.num_train_examples = 50",
                    "synthetic_arithmetic_settings.num_test_examples = 10"])


def test_importing_tasks_registers_every_task_and_the_mixture():
  for name in catalog.TASKS:
    task = seqio.get_mixture_or_task(name)
    assert set(task.splits) == set(catalog.get_task(name).splits), name
    assert isinstance(task.output_features["targets"].vocabulary, seqio.ByteVocabulary)
  mixture = seqio.get_mixture_or_task("super_glue_v102_proportional")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == \
      catalog.SUPER_GLUE_V102_PROPORTIONAL_RATES


def test_tensorflow_sees_no_accelerator():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  assert tf.config.get_visible_devices("GPU") == []


def test_seqio_tokenization_equals_tf_free_tokenization_for_every_task_and_split():
  for name, task in catalog.TASKS.items():
    for split in task.splits:
      via_seqio = tasks.tokenized_examples_via_seqio(name, split, vocab="byte", seed=1,
                                                     shuffle=False)
      tf_free = pipeline.tokenized_examples(name, split, vocab="byte", seed=1, shuffle=False)
      assert via_seqio == tf_free, (name, split)


def test_seqio_targets_end_with_eos():
  example = next(seqio.get_mixture_or_task("gsm8k").get_dataset(
      None, split="test", shuffle=False, use_cached=False).as_numpy_iterator())
  assert example["targets"][-1] == vocabularies.EOS_ID
  assert vocabularies.BOS_ID not in example["inputs"].tolist()


def test_byte_tokenizer_ids_equal_seqio_byte_vocabulary():
  text = "Zoë paid €3 — #### 3\n"
  assert vocabularies.ByteTokenizer().encode(text) == seqio.ByteVocabulary().encode(text)
  assert seqio.ByteVocabulary().vocab_size == vocabularies.BYTE_VOCAB_SIZE


def test_sentencepiece_tokenizer_equals_seqio_sentencepiece_vocabulary(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(e["inputs"] + e["targets"]
                              for e in catalog.get_task("synthetic_arithmetic").examples("train")))
  model = str(vocabularies.train_sentencepiece([corpus], tmp_path / "sp", vocab_size=384))
  text = "Ada has 12 coins, gets 3 more. How many now?"
  vocabulary = vocabularies.get_seqio_vocabulary(model)
  tokenizer = vocabularies.get_tokenizer(model)
  assert list(vocabulary.encode(text)) == tokenizer.encode(text)
  assert (vocabulary.eos_id, vocabulary.pad_id) == (tokenizer.eos_id, tokenizer.pad_id) == (1, 0)


def test_live_seqio_iterator_equals_tf_free_iterator():
  settings = dict(source="super_glue_boolq_v102", batch_size=2, seq_len=256, seed=5,
                  process_index=0, process_count=1)
  via_seqio = pipeline.create_data_iterator(use_seqio=True, **settings)
  tf_free = pipeline.create_data_iterator(**settings)
  for _ in range(3):
    a, b = next(via_seqio), next(tf_free)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_seqio_mixture_reads_through_the_pipeline():
  iterator = pipeline.create_data_iterator(
      source="super_glue_v102_proportional", use_seqio=True, batch_size=2, seq_len=512,
      mixture_size=20, process_index=0, process_count=1)
  assert next(iterator)["segment_ids"].max() >= 1
