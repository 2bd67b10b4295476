"""The Hugging Face architectures maxnucl converts, as one registry of `hf_format.HfArchitecture`
specs: which one a config.json describes (`detect`), which one writes a maxnucl model
(`for_model`).

    Gemma2ForCausalLM   (gemma2)        <-> family 'gemma2'   hf_gemma2.GEMMA2
    Gemma3ForCausalLM   (gemma3_text)   <-> family 'gemma3'   hf_gemma3.GEMMA3
    Qwen2ForCausalLM    (qwen2)         <-> family 'llama'    hf_llama.QWEN2   (q/k/v biases)
    MistralForCausalLM  (mistral)       <-> family 'llama'    hf_llama.MISTRAL (every layer local)
    LlamaForCausalLM    (llama)         <-> family 'llama'    hf_llama.LLAMA   (every layer global)

Each spec's custom-code export (`<Name>FfnWidthsForCausalLM`, model_type `<type>_ffn_widths`)
is read back by the same spec.
"""

from __future__ import annotations

from typing import Any

from maxnucl.conversion import hf_gemma2, hf_gemma3, hf_llama
from maxnucl.conversion.hf_format import HfArchitecture
from maxnucl.models.config import ModelConfig

# In export order: the first spec that can hold a model writes it.
ARCHITECTURES = (hf_gemma2.GEMMA2, hf_gemma3.GEMMA3, hf_llama.QWEN2, hf_llama.MISTRAL,
                 hf_llama.LLAMA)

# config.json's architectures[0] or model_type -> spec (the custom-code models' names too)
BY_NAME: dict[str, HfArchitecture] = {
    name: spec for spec in ARCHITECTURES
    for name in (spec.architecture, spec.model_type, spec.custom_code.architecture,
                 spec.custom_code.model_type)}


def detect(hf: dict[str, Any]) -> HfArchitecture:
  """The spec of a config.json dict: by `architectures[0]` when given, else by `model_type`."""
  architectures = hf.get("architectures") or []
  key = architectures[0] if architectures else hf.get("model_type")
  if key in BY_NAME:
    return BY_NAME[key]
  field = (f"architectures {architectures}" if architectures
           else f"model_type {hf.get('model_type')!r}")
  raise ValueError(f"config.json: {field}; maxnucl converts "
                   f"{', '.join(spec.architecture for spec in ARCHITECTURES)} (model_type "
                   f"{', '.join(repr(spec.model_type) for spec in ARCHITECTURES)})")


def for_model(cfg: ModelConfig) -> HfArchitecture:
  """The spec that writes `cfg`: the first of ARCHITECTURES that can hold it."""
  refusals = []
  for spec in ARCHITECTURES:
    refusal = spec.refusal(cfg)
    if refusal is None:
      return spec
    if spec.family == cfg.family:
      refusals.append(f"{spec.architecture}: {refusal}")
  families = sorted({spec.family for spec in ARCHITECTURES})
  raise ValueError(f"model {cfg.name!r} (family {cfg.family!r}) fits no Hugging Face "
                   f"architecture: " + ("; ".join(refusals) if refusals else
                                         f"maxnucl writes the families {families}"))
