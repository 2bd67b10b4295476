"""Specification of the TF-free pipeline: contract, caching, resume, multi-host, mixtures."""

import json
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest

from maxnucl.data import caching
from maxnucl.data import catalog
from maxnucl.data import cli
from maxnucl.data import pipeline
from maxnucl.data import vocabularies

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
SMALL_SYNTHETIC = ["synthetic_arithmetic_settings.num_train_examples = 200",
                   "synthetic_arithmetic_settings.num_test_examples = 30"]


@pytest.fixture(autouse=True)
def small_data(offline_data):  # offline_data: tests/conftest.py
  gin.parse_config(SMALL_SYNTHETIC)


def make_iterator(**kwargs):
  settings = dict(batch_size=4, seq_len=128, process_index=0, process_count=1)
  settings.update(kwargs)
  return pipeline.create_data_iterator(**settings)


def take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_default_iterator_meets_the_trainer_contract():
  iterator = pipeline.create_data_iterator(batch_size=8, seq_len=128)  # process from jax
  batch = next(iterator)
  assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
  expected_dtypes = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
                     "segment_ids": np.int32, "positions": np.int32}
  for key, dtype in expected_dtypes.items():
    assert batch[key].shape == (8, 128) and batch[key].dtype == dtype, key
  assert (iterator.vocab_size, iterator.eos_id, iterator.pad_id, iterator.bos_id) == (259, 1, 0, 2)
  tokens, targets, segments = batch["tokens"], batch["targets"], batch["segment_ids"]
  same_segment_next = segments[:, 1:] == segments[:, :-1]
  np.testing.assert_array_equal(targets[:, :-1][same_segment_next & (segments[:, 1:] > 0)],
                                tokens[:, 1:][same_segment_next & (segments[:, 1:] > 0)])
  starts = (batch["positions"] == 0) & (segments > 0)
  assert (tokens[starts] == vocabularies.BOS_ID).all()
  last_of_segment = (segments > 0) & ~np.concatenate([same_segment_next, np.zeros((8, 1), bool)],
                                                     axis=1)
  assert (targets[last_of_segment] == vocabularies.EOS_ID).all()
  assert (batch["loss_mask"][segments == 0] == 0).all()
  assert (tokens[segments == 0] == 0).all()
  text = vocabularies.ByteTokenizer().decode(tokens[0][segments[0] == 1])
  assert text.startswith("Q: ") and "\nA: " in text and "#### " in text
  assert next(make_iterator(seq_len=512))["segment_ids"].max() > 2  # several problems per row


def test_loss_mask_covers_targets_only_unless_loss_on_inputs():
  answer_only = next(make_iterator(shuffle=False))
  everything = next(make_iterator(shuffle=False, loss_on_inputs=True))
  np.testing.assert_array_equal(answer_only["tokens"], everything["tokens"])
  assert 0 < answer_only["loss_mask"].sum() < everything["loss_mask"].sum()
  np.testing.assert_array_equal(everything["loss_mask"], everything["segment_ids"] > 0)


def test_synthetic_arithmetic_is_deterministic_and_seeded():
  assert_batches_equal(take(make_iterator(seed=3), 3), take(make_iterator(seed=3), 3))
  assert not np.array_equal(next(make_iterator(seed=3))["tokens"],
                            next(make_iterator(seed=4))["tokens"])


def test_resume_from_state_continues_exactly_across_epochs():
  iterator = make_iterator(source="gsm8k", seq_len=256, batch_size=2, pack=False)
  assert iterator.num_rows == 3  # batches cross epoch boundaries
  take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 5)
  resumed = make_iterator(source="gsm8k", seq_len=256, batch_size=2, pack=False)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), expected)


def test_set_state_refuses_a_state_from_other_data():
  state = make_iterator(seed=1).get_state()
  with pytest.raises(ValueError, match="field 'seed'"):
    make_iterator(seed=2).set_state(state)


def test_each_epoch_sees_every_row_once_in_a_new_order():
  iterator = make_iterator(batch_size=1)
  epochs = [np.stack([next(iterator)["tokens"][0] for _ in range(iterator.num_rows)])
            for _ in range(2)]
  as_set = [sorted(map(bytes, e)) for e in epochs]
  assert as_set[0] == as_set[1]
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("source", ["synthetic_arithmetic", "super_glue_v102_proportional"])
def test_two_processes_read_disjoint_halves_of_the_global_batch(source):
  kwargs = dict(source=source, batch_size=8, seq_len=256, mixture_size=40)
  whole = make_iterator(**kwargs)
  hosts = [make_iterator(process_index=p, process_count=2, **kwargs) for p in range(2)]
  for _ in range(3):
    global_batch = next(whole)
    local = [next(h) for h in hosts]
    for key in global_batch:
      assert local[0][key].shape == (4, 256)
      np.testing.assert_array_equal(np.concatenate([local[0][key], local[1][key]]),
                                    global_batch[key])
  row_ids = [set(hosts[p]._row_ids(np.arange(p * 4, p * 4 + 4)).tolist())
             for p in range(2)]  # pylint: disable=protected-access
  assert not row_ids[0] & row_ids[1]


def test_batch_size_must_divide_among_processes():
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    make_iterator(batch_size=4, process_index=0, process_count=3)


def test_evaluation_pass_is_finite_and_pads_the_last_batch():
  iterator = make_iterator(split="test", batch_size=8, shuffle=False, pack=False)
  assert iterator.num_rows == 30
  batches = list(iterator)
  assert len(batches) == 4
  assert (batches[-1]["segment_ids"][6:] == 0).all() and batches[-1]["loss_mask"][6:].sum() == 0
  assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in batches) == 30


@pytest.mark.parametrize("source, split", [
    ("synthetic_arithmetic", "train"), ("gsm8k", "train"), ("mbpp", "train"),
    ("mbpp_3shot", "test"), ("super_glue_record_v102", "validation"),
    ("super_glue_v102_proportional", "train")])
def test_cached_output_equals_live_output(tmp_path, source, split):
  settings = dict(seq_len=512, seed=7, mixture_size=40 if "proportional" in source else None)
  caching_settings = {k: v for k, v in settings.items()}
  pipeline.cache_task(source, split, tmp_path, rows_per_shard=2, **caching_settings)
  live = make_iterator(source=source, split=split, repeat=True, **settings)
  cached = make_iterator(source=source, split=split, repeat=True, cache_dir=str(tmp_path),
                         **settings)
  assert cached.num_rows == live.num_rows
  assert_batches_equal(take(cached, 4), take(live, 4))
  assert cached.vocab_size == live.vocab_size and cached.eos_id == live.eos_id


def test_every_task_split_caches_and_reads_back(tmp_path):
  for name in catalog.TASKS:
    for split in catalog.get_task(name).splits:
      pipeline.cache_task(name, split, tmp_path, seq_len=1024)
      batch = next(make_iterator(source=name, split=split, seq_len=1024, cache_dir=str(tmp_path),
                                 repeat=False))
      assert batch["segment_ids"].max() >= 1, (name, split)


def test_cache_tool_writes_index_and_shards(tmp_path, capsys):
  assert cli.cache_main(["--source", "gsm8k", "--cache_dir", str(tmp_path), "--seq_len", "256",
                         "--data_dir", str(FIXTURES)]) == 0
  assert "gsm8k/train: 3 examples" in capsys.readouterr().out
  index = json.loads((tmp_path / "gsm8k" / "train" / "index.json").read_text())
  assert index["format"] == caching.CACHE_FORMAT and index["seq_len"] == 256
  assert (tmp_path / "gsm8k" / "test" / "shard-00000.tokens.npy").is_file()


def test_cache_with_other_settings_is_refused(tmp_path):
  pipeline.cache_task("gsm8k", "train", tmp_path, seq_len=256)
  with pytest.raises(ValueError, match=r"built with seq_len=256.*asks for seq_len=128"):
    make_iterator(source="gsm8k", cache_dir=str(tmp_path), seq_len=128)
  with pytest.raises(FileNotFoundError, match=r"No cache index at .*gsm8k/test/index.json"):
    make_iterator(source="gsm8k", split="test", cache_dir=str(tmp_path), seq_len=256)


def test_mixture_rates_are_t5_training_example_counts():
  mixture = catalog.get_task_or_mixture("super_glue_v102_proportional")
  assert dict(mixture.task_rates) == {
      "super_glue_boolq_v102": 9427, "super_glue_cb_v102": 250, "super_glue_copa_v102": 400,
      "super_glue_multirc_v102": 27243, "super_glue_record_v102": 138854,
      "super_glue_rte_v102": 2490, "super_glue_wic_v102": 5428, "super_glue_wsc_v102": 259}


def test_mixture_samples_tasks_in_proportion_to_rates():
  mixture = catalog.get_task_or_mixture("super_glue_v102_proportional")
  num = 200_000
  sampled = catalog.mixture_examples(mixture, "train", seed=0, shuffle=True, num_examples=num)
  names, counts = np.unique([name for name, _ in sampled], return_counts=True)
  rates = dict(mixture.task_rates)
  total = sum(rates.values())
  for name, count in zip(names, counts):
    expected = rates[name] / total
    # 8 binomial standard errors: a chance failure has probability < 1e-14
    np.testing.assert_allclose(count / num, expected, rtol=0, err_msg=name,
                               atol=8 * np.sqrt(expected * (1 - expected) / num))
  assert set(names) == set(rates)


def test_tensorflow_free_import_and_iteration():
  code = ("import sys; import maxnucl.data.pipeline as p; import maxnucl.data.cli; "
          "it = p.create_data_iterator(batch_size=2, seq_len=64, process_index=0, "
          "process_count=1); next(it); "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
          "assert 'seqio' not in sys.modules, 'seqio imported'; print('ok')")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_train_sentencepiece_tool_writes_a_gemma_compatible_model(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(e["inputs"] + e["targets"]
                              for e in catalog.get_task("synthetic_arithmetic").examples("test")))
  assert cli.train_sentencepiece_main([str(corpus), "--output", str(tmp_path / "sp"),
                                       "--vocab_size", "384"]) == 0
  tokenizer = vocabularies.get_tokenizer(str(tmp_path / "sp.model"))
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
  assert tokenizer.decode(tokenizer.encode("Ada has 3 coins.")) == "Ada has 3 coins."
  batch = next(make_iterator(vocab=str(tmp_path / "sp.model")))
  assert batch["tokens"].max() < tokenizer.vocab_size


def test_train_sentencepiece_tool_replaces_a_model_only_with_overwrite(tmp_path, capsys):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("Ada has 3 coins and gets 4 more.\n" * 20)
  args = [str(corpus), "--output", str(tmp_path / "sp"), "--vocab_size", "300"]
  assert cli.main(["train_sentencepiece", *args]) == 0
  model = (tmp_path / "sp.model").read_bytes()
  (tmp_path / "sp.model").write_bytes(b"the user's")
  capsys.readouterr()
  assert cli.main(["train_sentencepiece", *args]) == 2
  assert capsys.readouterr().err.strip() == (f"error: --output {tmp_path / 'sp'}: "
                                             f"{tmp_path / 'sp'}.model exists; pass --overwrite "
                                             f"to replace it")
  assert (tmp_path / "sp.model").read_bytes() == b"the user's"
  assert cli.main(["train_sentencepiece", *args, "--overwrite"]) == 0
  assert (tmp_path / "sp.model").read_bytes() == model  # the same text, the same model


@pytest.mark.parametrize("gin_file, source", [
    ("synthetic.gin", "synthetic_arithmetic"), ("gsm8k.gin", "gsm8k"), ("mbpp.gin", "mbpp"),
    ("superglue.gin", "super_glue_v102_proportional")])
def test_gin_snippets_select_the_source(gin_file, source):
  gin.parse_config_files_and_bindings([str(REPO / "gin" / "data" / gin_file)],
                                      ["DATA_SEQ_LEN = 512", "DATA_BATCH_SIZE = 2",
                                       "create_data_iterator.mixture_size = 20"])
  iterator = pipeline.create_data_iterator(process_index=0, process_count=1)
  assert iterator.metadata["source"] == source
  assert next(iterator)["tokens"].shape == (2, 512)
  assert gin.query_parameter("EVAL_MIXTURE_OR_TASK_NAME/macro.value") in catalog.TASKS
