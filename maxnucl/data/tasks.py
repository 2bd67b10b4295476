"""seqio Tasks and Mixtures for every entry of `maxnucl.data.catalog` (imports TensorFlow).

Importing this module registers, with the byte vocabulary (`seqio.ByteVocabulary`):
  synthetic_arithmetic, gsm8k, mbpp, mbpp_3shot,
  super_glue_{boolq,cb,copa,multirc,record,rte,wic,wsc,axb,axg}_v102,
  the mixture super_glue_v102_proportional (rates: catalog.SUPER_GLUE_V102_PROPORTIONAL_RATES).
`register_seqio_tasks(vocab, suffix)` registers the same set for another vocabulary, e.g.
`register_seqio_tasks("/ckpt/gemma/tokenizer.model", "_gemma")` -> "gsm8k_gemma", ...

Each task's source is a `seqio.FunctionDataSource` over the catalog's text examples (local
released files or a prepared TFDS builder, see `sources.py`), so the seqio and the TF-free
pipelines read identical text.  Features: "inputs" (no EOS) and "targets" (EOS appended), the
usual seqio decoder-only convention.  TensorFlow is kept off accelerators.
"""

from __future__ import annotations

import zlib
from typing import Optional

from maxnucl.data import sources

sources.hide_accelerators_from_tensorflow()  # before seqio touches TensorFlow

# pylint: disable=wrong-import-position
import seqio
import tensorflow as tf

from maxnucl.data import catalog
from maxnucl.data import formats
from maxnucl.data import vocabularies
# pylint: enable=wrong-import-position


# ---- metrics (on postprocessed strings) ----------------------------------------------------------

def exact_match_accuracy(targets, predictions) -> dict[str, float]:
  matches = [t.strip() == p.strip() for t, p in zip(targets, predictions)]
  return {"accuracy": 100.0 * sum(matches) / max(len(matches), 1)}


def final_answer_accuracy(targets, predictions) -> dict[str, float]:
  """GSM8K-style: the numbers after the last '####' agree."""
  matches = [formats.gsm8k_final_answer(t) is not None
             and formats.gsm8k_final_answer(t) == formats.gsm8k_final_answer(p)
             for t, p in zip(targets, predictions)]
  return {"final_answer_accuracy": 100.0 * sum(matches) / max(len(matches), 1)}


_METRICS = {"synthetic_arithmetic": [final_answer_accuracy], "gsm8k": [final_answer_accuracy],
            "mbpp": [], "mbpp_3shot": []}


def _dataset_fn(task: catalog.TextTask):
  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # the files are small; order is the source's
    examples = task.examples(split)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.constant([e["inputs"] for e in examples], dtype=tf.string),
        "targets": tf.constant([e["targets"] for e in examples], dtype=tf.string)})
  return dataset_fn


def register_seqio_tasks(vocab: str = vocabularies.BYTE_VOCAB_NAME, suffix: str = "") -> list[str]:
  """Registers every catalog task and mixture with seqio under `<name><suffix>`."""
  vocabulary = vocabularies.get_seqio_vocabulary(vocab)
  output_features = {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=False),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }
  names = []
  for name, task in catalog.TASKS.items():
    seqio.TaskRegistry.add(
        name + suffix,
        source=seqio.FunctionDataSource(_dataset_fn(task), splits=task.splits),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=output_features,
        metric_fns=_METRICS.get(name, [exact_match_accuracy]))
    names.append(name + suffix)
  for name, mixture in catalog.MIXTURES.items():
    seqio.MixtureRegistry.add(name + suffix,
                              [(task + suffix, rate) for task, rate in mixture.task_rates])
    names.append(name + suffix)
  return names


def tokenized_examples_via_seqio(source: str, split: str, *, vocab: str, seed: int,
                                 shuffle: bool, mixture_size: Optional[int] = None
                                 ) -> list[tuple[list[int], list[int]]]:
  """(inputs ids, targets ids without EOS) read through the registered seqio task/mixture.

  The registered names use the byte vocabulary; another `vocab` is registered on first use
  under a suffix.  Tasks come in the source's order, shuffled with `seed` exactly as the TF-free
  path does; mixtures are sampled by seqio's own sampler (so they differ from the TF-free path).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  suffix = ("" if vocab == vocabularies.BYTE_VOCAB_NAME
            else f"_vocab{zlib.crc32(vocab.encode()):08x}")
  if suffix and source + suffix not in seqio.TaskRegistry.names() | seqio.MixtureRegistry.names():
    register_seqio_tasks(vocab, suffix)
  provider = seqio.get_mixture_or_task(source + suffix)
  if isinstance(provider, seqio.Mixture):
    if mixture_size is None:
      mixture_size = len(catalog.text_examples(source, split, seed=seed, shuffle=False))
    dataset = provider.get_dataset(None, split=split, shuffle=shuffle, seed=seed,
                                   use_cached=False).take(mixture_size)
  else:
    dataset = provider.get_dataset(None, split=split, shuffle=False, use_cached=False)
  eos = vocabularies.get_tokenizer(vocab).eos_id
  examples = []
  for example in dataset.as_numpy_iterator():
    targets = example["targets"].tolist()
    if targets and targets[-1] == eos:
      targets = targets[:-1]
    examples.append((example["inputs"].tolist(), targets))
  if shuffle and not isinstance(provider, seqio.Mixture):
    order = np.random.default_rng([seed, 0]).permutation(len(examples))
    examples = [examples[i] for i in order]
  return examples


if "gsm8k" not in seqio.TaskRegistry.names():
  register_seqio_tasks()
