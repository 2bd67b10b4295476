"""The custom-code Hugging Face model that `maxnucl-to-hf --ffn_widths_export custom_code` writes.

Gemma-2 with one FFN width per layer: config.json carries `intermediate_sizes` (layer i's width
m_i; 0 = the layer has no FFN) and an `auto_map` naming the two modules of this package, whose
sources are copied beside the safetensors.  transformers imports them from there:

    AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)

The tensors keep Gemma-2's names (`model.layers.{i}.mlp.down_proj.weight`, ...), with layer i's
shapes; a layer of width 0 has no `mlp.*` and no `*_feedforward_layernorm` tensors, as in
maxnucl.  The two modules import torch and transformers, which maxnucl itself does not need:
maxnucl only reads their source (`sources`), it never imports them.
"""

from __future__ import annotations

from importlib import resources

MODEL_TYPE = "gemma2_ffn_widths"
CONFIG_MODULE = "configuration_gemma2_ffn_widths"
MODEL_MODULE = "modeling_gemma2_ffn_widths"
ARCHITECTURE = "Gemma2FfnWidthsForCausalLM"
AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.Gemma2FfnWidthsConfig",
            "AutoModelForCausalLM": f"{MODEL_MODULE}.{ARCHITECTURE}"}


def sources() -> dict[str, str]:
  """File name -> source text, for the files an exported directory carries."""
  package = resources.files(__name__)
  return {f"{module}.py": (package / f"{module}.py").read_text()
          for module in (CONFIG_MODULE, MODEL_MODULE)}
