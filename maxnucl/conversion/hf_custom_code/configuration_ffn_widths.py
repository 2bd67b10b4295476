"""Llama, Mistral, Qwen2 and Gemma-3 (text) configurations with one FFN width per layer (written
by maxnucl's Hugging Face export, `maxnucl-to-hf --ffn_widths_export custom_code`, for models
whose FFN widths differ by layer)."""

from huggingface_hub.dataclasses import strict
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class FfnWidths:
  """A config's `intermediate_sizes`: layer i's FFN width (0: the layer has no FFN).

  `intermediate_size` is read only when `intermediate_sizes` is None: then every layer has that
  width, as in the plain model.  (maxnucl writes its default width there, ModelConfig.ffn_dim.)
  """

  def layer_intermediate_size(self, layer_idx: int) -> int:
    if self.intermediate_sizes is None:
      return self.intermediate_size
    return self.intermediate_sizes[layer_idx]

  def validate_architecture(self):
    super().validate_architecture()
    sizes = self.intermediate_sizes
    if sizes is None:
      return
    if len(sizes) != self.num_hidden_layers:
      raise ValueError(f"intermediate_sizes has {len(sizes)} entries for num_hidden_layers="
                       f"{self.num_hidden_layers}; expected one FFN width per layer")
    negative = [i for i, m in enumerate(sizes) if m < 0]
    if negative:
      raise ValueError(f"intermediate_sizes[{negative[0]}] = {sizes[negative[0]]}; expected a "
                       f"width >= 0")


@strict  # as the base configs: fields type-checked and validate_* run on construction
class LlamaFfnWidthsConfig(FfnWidths, LlamaConfig):
  model_type = "llama_ffn_widths"
  intermediate_sizes: list[int] | None = None


@strict
class MistralFfnWidthsConfig(FfnWidths, MistralConfig):
  model_type = "mistral_ffn_widths"
  intermediate_sizes: list[int] | None = None


@strict
class Qwen2FfnWidthsConfig(FfnWidths, Qwen2Config):
  model_type = "qwen2_ffn_widths"
  intermediate_sizes: list[int] | None = None


@strict
class Gemma3FfnWidthsConfig(FfnWidths, Gemma3TextConfig):
  model_type = "gemma3_ffn_widths"
  intermediate_sizes: list[int] | None = None


__all__ = ["LlamaFfnWidthsConfig", "MistralFfnWidthsConfig", "Qwen2FfnWidthsConfig",
           "Gemma3FfnWidthsConfig"]
