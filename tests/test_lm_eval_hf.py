"""lm-eval's own hf backend (HFLM) on what maxnucl-to-hf exports, beside the maxnucl adapter:
the `eval` extra installs what the backend needs, the backend loads the export and its tokenizer
offline on the CPU, and both score rolling log-likelihood (perplexity tasks) alike once the hf
backend is told not to add a second BOS (docs/decoding.md)."""

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

import maxnucl.lm_eval_adapter
from maxnucl import checkpoints, decoding
from maxnucl.conversion import convert
from maxnucl.data import synthetic, vocabularies
import hf_export

MAX_LENGTH = 48  # tokens per rolling window: every document below needs several
DOCUMENTS = [hf_export.PROSE, hf_export.PROSE + "\n\n" + hf_export.PROSE,
             *("Q: {question}\nA: {answer}".format(**synthetic.arithmetic_problem(0, "test", i))
               for i in range(3))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(maxnucl checkpoint, its maxnucl-to-hf export with the tokenizer, the SentencePiece model)."""
  root = tmp_path_factory.mktemp("lm_eval_hf")
  model = hf_export.train_tiny_sentencepiece(root)
  hf_export.save_tiny_checkpoint(root / "ckpt")
  convert.maxnucl_to_hf(root / "ckpt", root / "hf", vocab=str(model))
  return root / "ckpt", root / "hf", model


def _hf_backend(hf_dir, **model_args):
  """lm-eval's HFLM as `--model hf --model_args pretrained=HF_DIR,...` builds it (float32, CPU)."""
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, max_length=MAX_LENGTH,
              dtype="float32", **model_args)


def _rolling(lm, documents):
  requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i)
              for i, text in enumerate(documents)]
  return np.asarray(lm.loglikelihood_rolling(requests, disable_tqdm=True), dtype=np.float64)


def test_hf_backend_loads_the_export_and_its_tokenizer_offline_on_cpu(exported):
  _, hf_dir, model = exported
  lm = _hf_backend(hf_dir)
  ours = vocabularies.get_tokenizer(str(model))
  assert lm.device == torch.device("cpu") and lm.model.dtype == torch.float32
  assert (lm.prefix_token_id, lm.eot_token_id) == (ours.bos_id, ours.eos_id)
  for text in DOCUMENTS:
    assert lm.tok_encode(text) == [ours.bos_id] + ours.encode(text)


def test_rolling_loglikelihood_agrees_with_the_adapter_only_with_add_bos_token_false(exported):
  ckpt, hf_dir, model = exported
  tokenizer = vocabularies.get_tokenizer(str(model))
  ids = [tokenizer.encode(text) for text in DOCUMENTS]
  assert min(map(len, ids)) > MAX_LENGTH  # several windows each
  maxnucl_lm = maxnucl.lm_eval_adapter.MaxnuclLM(checkpoint=str(ckpt), vocab=str(model),
                                                 max_length=MAX_LENGTH, batch_size=4)
  ours = _rolling(maxnucl_lm, DOCUMENTS)
  single_bos = _rolling(_hf_backend(hf_dir, add_bos_token=False), DOCUMENTS)
  default = _rolling(_hf_backend(hf_dir), DOCUMENTS)
  # Both sum one float32 log-probability per token: with n terms of a sum of magnitude |S|, each
  # rounded to float32 (relative error eps) and the errors accumulating at worst linearly, the
  # two implementations may differ by |S| * eps * n.
  terms = np.asarray([len(i) for i in ids])
  tolerance = np.abs(ours) * np.finfo(np.float32).eps * terms
  np.testing.assert_array_less(np.abs(single_bos - ours), tolerance)
  # The default (the tokenizer adds BOS) scores [BOS][BOS, text...]: the document with BOS as its
  # first token, one more token scored and every window shifted by one.
  cfg, params = checkpoints.load(ckpt)
  doubled = np.asarray(decoding.score_rolling(cfg, params, [[tokenizer.bos_id] + i for i in ids],
                                              max_length=MAX_LENGTH))
  np.testing.assert_array_less(np.abs(default - doubled),
                               np.abs(doubled) * np.finfo(np.float32).eps * (terms + 1))
  assert np.all(np.abs(default - ours) > 10 * tolerance)


def test_loglikelihood_of_the_hf_backend_equals_the_adapters_by_default(exported):
  """Context-continuation scoring (multiple choice): BOS once before the context in both."""
  ckpt, hf_dir, model = exported
  tokenizer = vocabularies.get_tokenizer(str(model))
  pairs = [(hf_export.PROSE[:60], hf_export.PROSE[60:90]), ("Ada has 3 apples", " and 4 pears."),
           ("Q: 3 + 4?\nA:", " 7")]
  requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
              for i, pair in enumerate(pairs)]
  maxnucl_lm = maxnucl.lm_eval_adapter.MaxnuclLM(checkpoint=str(ckpt), vocab=str(model),
                                                 max_length=MAX_LENGTH, batch_size=4)
  ours = np.asarray([score for score, _ in maxnucl_lm.loglikelihood(requests, disable_tqdm=True)])
  hf = np.asarray([score for score, _ in _hf_backend(hf_dir).loglikelihood(requests,
                                                                          disable_tqdm=True)])
  # As above: |sum| x float32 eps x the number of summed terms (continuation tokens).
  terms = np.asarray([len(tokenizer.encode(c + x)) - len(tokenizer.encode(c)) for c, x in pairs])
  np.testing.assert_array_less(np.abs(hf - ours),
                               np.abs(ours) * np.finfo(np.float32).eps * np.maximum(terms, 1))
