"""Llama, Mistral, Qwen2 and Gemma-3 (text) with one FFN width per layer (written by maxnucl's
Hugging Face export, `maxnucl-to-hf --ffn_widths_export custom_code`).

Each class is transformers' own ForCausalLM whose layer i's MLP has
config.intermediate_sizes[i] inner neurons (gate, up: (m_i, d), down: (d, m_i)).  A layer of
width 0 has no MLP and none of its FFN branch's norms (Llama, Mistral, Qwen2:
post_attention_layernorm; Gemma-3: pre_ and post_feedforward_layernorm): its FFN branch adds
exact zeros, so y = h.  Everything else, tensor names included, is the transformers model's.
"""

import copy

import torch
from torch import nn
from transformers.models.gemma3 import modeling_gemma3 as gemma3
from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.qwen2 import modeling_qwen2 as qwen2

from .configuration_ffn_widths import (Gemma3FfnWidthsConfig, LlamaFfnWidthsConfig,
                                       MistralFfnWidthsConfig, Qwen2FfnWidthsConfig)


class NoFFN(nn.Module):
  """The FFN branch of a layer of width 0: no parameters, output zero."""

  def forward(self, x):
    return torch.zeros_like(x)


class FfnWidths:
  """Mixin over a transformers ForCausalLM: after its __init__ (which builds every layer at
  intermediate_size; on the meta device under from_pretrained, so nothing is allocated), each
  layer's MLP is rebuilt at its own width, or removed with its FFN norms."""

  mlp_class = None  # the architecture's MLP, built from a config's intermediate_size
  ffn_norms = ()  # names of the norms only the FFN branch uses

  def __init__(self, config):
    super().__init__(config)
    for i, layer in enumerate(self.model.layers):
      width = config.layer_intermediate_size(i)
      if not width:
        layer.mlp = NoFFN()
        for name in self.ffn_norms:
          setattr(layer, name, nn.Identity())
      elif width != config.intermediate_size:
        narrow = copy.copy(config)
        narrow.intermediate_size = width
        layer.mlp = self.mlp_class(narrow)
    self.post_init()


class LlamaFfnWidthsForCausalLM(FfnWidths, llama.LlamaForCausalLM):
  config_class = LlamaFfnWidthsConfig
  mlp_class, ffn_norms = llama.LlamaMLP, ("post_attention_layernorm",)


class MistralFfnWidthsForCausalLM(FfnWidths, mistral.MistralForCausalLM):
  config_class = MistralFfnWidthsConfig
  mlp_class, ffn_norms = mistral.MistralMLP, ("post_attention_layernorm",)


class Qwen2FfnWidthsForCausalLM(FfnWidths, qwen2.Qwen2ForCausalLM):
  config_class = Qwen2FfnWidthsConfig
  mlp_class, ffn_norms = qwen2.Qwen2MLP, ("post_attention_layernorm",)


class Gemma3FfnWidthsForCausalLM(FfnWidths, gemma3.Gemma3ForCausalLM):
  config_class = Gemma3FfnWidthsConfig
  mlp_class = gemma3.Gemma3MLP
  ffn_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


__all__ = ["LlamaFfnWidthsForCausalLM", "MistralFfnWidthsForCausalLM",
           "Qwen2FfnWidthsForCausalLM", "Gemma3FfnWidthsForCausalLM"]
