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

from typing import Any, Optional

from maxnucl.conversion import hf_format, hf_gemma2, hf_gemma3, hf_llama
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
  """The spec of a config.json dict, by its `model_type` (as transformers' AutoConfig chooses the
  model); `architectures[0]`, when given, must name the same model (a custom-code export's
  model_type, which transformers reads through its auto_map, needs it)."""
  model_type, architectures = hf.get("model_type"), hf.get("architectures")
  known = (f"maxnucl converts {', '.join(spec.architecture for spec in ARCHITECTURES)} "
           f"(model_type {', '.join(repr(spec.model_type) for spec in ARCHITECTURES)})")
  if architectures is not None and not (isinstance(architectures, list) and all(
      isinstance(a, str) for a in architectures)):
    raise ValueError(f"config.json: architectures is {hf_format.short(architectures)}; expected "
                     f"a list of class names")
  if not isinstance(model_type, str) or model_type not in BY_NAME or (
      model_type != BY_NAME[model_type].model_type
      and model_type != BY_NAME[model_type].custom_code.model_type):
    field = ("no model_type" if model_type is None
             else f"model_type {hf_format.short(model_type)}")
    raise ValueError(f"config.json: {field}; {known}")
  spec = BY_NAME[model_type]
  custom = model_type == spec.custom_code.model_type
  expected = spec.custom_code.architecture if custom else spec.architecture
  if custom and not architectures:
    raise ValueError(f"config.json: model_type {model_type!r} (a maxnucl custom-code export) "
                     f"needs architectures ['{expected}'], which names its model code")
  if architectures:
    if architectures[0] != expected:
      raise ValueError(f"config.json: architectures {architectures} and model_type "
                       f"{model_type!r} declare different models (model_type {model_type!r} is "
                       f"{expected})")
  return spec


# The per-layer tensors that tell the architectures apart (HF module names inside a layer)
_MARKERS = {"pre_feedforward_layernorm": "pre/post-feedforward norms (Gemma-2, Gemma-3)",
            "post_feedforward_layernorm": "pre/post-feedforward norms (Gemma-2, Gemma-3)",
            "self_attn.q_norm": "q_norm/k_norm (Gemma-3)",
            "self_attn.k_norm": "q_norm/k_norm (Gemma-3)",
            "self_attn.q_proj.bias": "q/k/v biases (Qwen2)"}


def tensor_family(names) -> str:
  """Which architecture's layers a set of tensor names has, from _MARKERS."""
  present = _markers(names)
  if "pre_feedforward_layernorm" in present or "post_feedforward_layernorm" in present:
    return "Gemma-3" if "self_attn.q_norm" in present else "Gemma-2"
  return "Qwen2" if "self_attn.q_proj.bias" in present else "Llama/Mistral"


def _markers(names) -> set[str]:
  found = set()
  for name in names:
    if name.startswith("model.layers."):
      module = name.split(".", 3)[-1].rsplit(".", 1)[0]  # model.layers.{i}.<module>.weight
      if name.endswith(".bias"):
        module += ".bias"
      found.update(m for m in _MARKERS if module == m)
  return found


def declared_mismatch(spec: HfArchitecture, cfg: ModelConfig, names) -> Optional[str]:
  """Why the tensors `names` are not the layers of `spec` for `cfg` (None when they are): the
  architecture-specific modules (_MARKERS) the tensors have against those it declares."""
  expected = _markers(hf_name for hf_name, _, _ in spec.tensor_map(cfg).values())
  present = _markers(names)
  if expected == present:
    return None
  extra, missing = sorted({_MARKERS[m] for m in present - expected}), sorted(
      {_MARKERS[m] for m in expected - present})
  return (f"declares {spec.architecture} (model_type {spec.model_type!r}), but the tensors are "
          f"{tensor_family(names)}'s"
          + (f": they have {', '.join(extra)}" if extra else "")
          + (f"{';' if extra else ':'} they lack {', '.join(missing)}" if missing else ""))


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
