"""Gemma-2 configuration with one FFN width per layer (written by maxnucl's Hugging Face export,
`maxnucl-to-hf --ffn_widths_export custom_code`, for models whose FFN widths differ by layer)."""

from huggingface_hub.dataclasses import strict
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config


@strict  # as Gemma2Config: fields type-checked and validate_* run on construction
class Gemma2FfnWidthsConfig(Gemma2Config):
  """Gemma2Config plus `intermediate_sizes`: layer i's FFN width (0: the layer has no FFN).

  `intermediate_size` is read only when `intermediate_sizes` is None: then every layer has that
  width, as in a plain Gemma-2.  (maxnucl writes its default width there, ModelConfig.ffn_dim.)
  """

  model_type = "gemma2_ffn_widths"
  intermediate_sizes: list[int] | None = None

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


__all__ = ["Gemma2FfnWidthsConfig"]
