"""Chat templates: a conversation as the text an instruct model was tuned on.

A Hugging Face tokenizer_config.json carries the model's template (Jinja2): SmolLM2 and Qwen2
write `<|im_start|>user\\n...<|im_end|>\\n`, Llama-3 `<|start_header_id|>user<|end_header_id|>...`.
`render_chat` renders it as transformers' `apply_chat_template(..., tokenize=False)` does (a
sandboxed Jinja2 environment with trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, and the special tokens by name); the text is then encoded without BOS, since
a template that wants one writes `{{ bos_token }}` itself.
"""

from __future__ import annotations

import datetime
import json
from typing import Sequence

from maxnucl.data import vocabularies

# Tokens that end an assistant turn in the common templates (ChatML, Llama-3, Gemma, Phi-3),
# stopped at besides the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def has_chat_template(tokenizer: vocabularies.Tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: vocabularies.Tokenizer, messages: Sequence[dict], *,
                add_generation_prompt: bool = True) -> str:
  """The text of `messages` ([{"role": "user", "content": "..."}, ...]) under the tokenizer's
  chat template, ending with the assistant's header when `add_generation_prompt`."""
  if not has_chat_template(tokenizer):
    where = getattr(tokenizer, "model_file", "the byte vocabulary")
    raise ValueError(f"vocabulary {where} has no chat template (expected a tokenizer.json whose "
                     f"tokenizer_config.json has chat_template)")
  template = _environment().from_string(tokenizer.chat_template)
  return template.render(messages=[dict(m) for m in messages],
                         add_generation_prompt=add_generation_prompt,
                         **getattr(tokenizer, "special_tokens", {}))


def chat_prompt_ids(tokenizer: vocabularies.Tokenizer, user_message: str) -> list[int]:
  """The ids of a one-message conversation, ready for the assistant's reply."""
  return tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": user_message}]))


def end_of_turn_ids(tokenizer: vocabularies.Tokenizer) -> list[int]:
  """EOS and every `END_OF_TURN_TOKENS` token the vocabulary has (a reply ends at the first)."""
  ids = [tokenizer.eos_id]
  token_id = getattr(tokenizer, "token_id", lambda token: None)
  for token in END_OF_TURN_TOKENS:
    found = token_id(token)
    if found is not None and found not in ids:
      ids.append(found)
  return ids


def _environment():
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  environment = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[ext.loopcontrols])
  environment.filters["tojson"] = tojson
  environment.globals["raise_exception"] = raise_exception
  environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return environment
