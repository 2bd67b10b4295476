"""The custom-code Hugging Face models that `maxnucl-to-hf --ffn_widths_export custom_code` writes.

Each is a transformers architecture with one FFN width per layer: config.json carries
`intermediate_sizes` (layer i's width m_i; 0 = the layer has no FFN) and an `auto_map` naming the
two modules of this package that hold it, whose sources are copied beside the safetensors.
transformers imports them from there:

    AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)

The tensors keep the architecture's names (`model.layers.{i}.mlp.down_proj.weight`, ...), with
layer i's shapes; a layer of width 0 has no `mlp.*` tensors and none of its FFN branch's norms,
as in maxnucl.  Gemma-2's model is in `*_gemma2_ffn_widths.py`; Llama's, Mistral's, Qwen2's and
Gemma-3's share `*_ffn_widths.py`.  The modules import torch and transformers, which maxnucl
itself does not need: maxnucl only reads their source (`CustomCode.sources`), it never imports
them.
"""

from __future__ import annotations

import dataclasses
from importlib import resources


@dataclasses.dataclass(frozen=True)
class CustomCode:
  """One custom-code model: its config.json model_type and architecture, the config class, and
  the two modules (config, model) that define them."""
  model_type: str
  architecture: str
  config_class: str
  config_module: str
  model_module: str

  @property
  def auto_map(self) -> dict[str, str]:
    return {"AutoConfig": f"{self.config_module}.{self.config_class}",
            "AutoModelForCausalLM": f"{self.model_module}.{self.architecture}"}

  def sources(self) -> dict[str, str]:
    """File name -> source text, for the files an exported directory carries."""
    package = resources.files(__name__)
    return {f"{module}.py": (package / f"{module}.py").read_text()
            for module in (self.config_module, self.model_module)}


def _shared(name: str) -> CustomCode:
  return CustomCode(f"{name.lower()}_ffn_widths", f"{name}FfnWidthsForCausalLM",
                    f"{name}FfnWidthsConfig", "configuration_ffn_widths", "modeling_ffn_widths")


GEMMA2 = CustomCode("gemma2_ffn_widths", "Gemma2FfnWidthsForCausalLM", "Gemma2FfnWidthsConfig",
                    "configuration_gemma2_ffn_widths", "modeling_gemma2_ffn_widths")
LLAMA, MISTRAL, QWEN2, GEMMA3 = (_shared(name) for name in ("Llama", "Mistral", "Qwen2",
                                                            "Gemma3"))

# Gemma-2's, under the names this package has always exported
MODEL_TYPE, ARCHITECTURE = GEMMA2.model_type, GEMMA2.architecture
CONFIG_MODULE, MODEL_MODULE = GEMMA2.config_module, GEMMA2.model_module
AUTO_MAP = GEMMA2.auto_map
sources = GEMMA2.sources
