"""Gemma-2 with one FFN width per layer (written by maxnucl's Hugging Face export,
`maxnucl-to-hf --ffn_widths_export custom_code`).

Layer i's FFN has config.intermediate_sizes[i] inner neurons:
    y = h + post_feedforward_layernorm(down(gelu_tanh(gate(x)) * up(x))),
    x = pre_feedforward_layernorm(h),   gate, up: (m_i, d),   down: (d, m_i);
a layer of width 0 has no FFN branch (no mlp, no feed-forward norms): y = h.  Everything else is
transformers' Gemma-2, and the tensor names are Gemma-2's.
"""

from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gemma2 import modeling_gemma2 as gemma2

from .configuration_gemma2_ffn_widths import Gemma2FfnWidthsConfig


class Gemma2FfnWidthsMLP(gemma2.Gemma2MLP):
  """Gemma2MLP with `width` inner neurons instead of config.intermediate_size."""

  def __init__(self, config, width: int):
    nn.Module.__init__(self)
    self.config, self.hidden_size, self.intermediate_size = config, config.hidden_size, width
    self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
    self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
    self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
    self.act_fn = ACT2FN[config.hidden_activation]


class Gemma2FfnWidthsDecoderLayer(gemma2.Gemma2DecoderLayer):
  """A Gemma-2 layer whose FFN width is config.layer_intermediate_size(layer_idx)."""

  def __init__(self, config, layer_idx: int):
    GradientCheckpointingLayer.__init__(self)  # not Gemma2DecoderLayer's: its MLP is uniform
    self.hidden_size, self.config = config.hidden_size, config
    self.ffn_width = config.layer_intermediate_size(layer_idx)
    self.self_attn = gemma2.Gemma2Attention(config=config, layer_idx=layer_idx)
    self.input_layernorm = gemma2.Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    self.post_attention_layernorm = gemma2.Gemma2RMSNorm(config.hidden_size,
                                                         eps=config.rms_norm_eps)
    if self.ffn_width:
      self.mlp = Gemma2FfnWidthsMLP(config, self.ffn_width)
      self.pre_feedforward_layernorm = gemma2.Gemma2RMSNorm(config.hidden_size,
                                                            eps=config.rms_norm_eps)
      self.post_feedforward_layernorm = gemma2.Gemma2RMSNorm(config.hidden_size,
                                                             eps=config.rms_norm_eps)

  def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
              position_ids=None, past_key_values=None, **kwargs):
    attended, _ = self.self_attn(
        hidden_states=self.input_layernorm(hidden_states),
        position_embeddings=position_embeddings, attention_mask=attention_mask,
        position_ids=position_ids, past_key_values=past_key_values, **kwargs)
    hidden_states = hidden_states + self.post_attention_layernorm(attended)
    if not self.ffn_width:  # no FFN branch: the residual stream passes unchanged
      return hidden_states
    ffn_out = self.mlp(self.pre_feedforward_layernorm(hidden_states))
    return hidden_states + self.post_feedforward_layernorm(ffn_out)


class Gemma2FfnWidthsModel(gemma2.Gemma2Model):
  config_class = Gemma2FfnWidthsConfig
  _no_split_modules = ["Gemma2FfnWidthsDecoderLayer"]

  def __init__(self, config):
    # Gemma2Model.__init__ with this file's layers (its own would build uniform-width ones first)
    gemma2.Gemma2PreTrainedModel.__init__(self, config)
    self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
    self.embed_tokens = gemma2.Gemma2TextScaledWordEmbedding(
        config.vocab_size, config.hidden_size, self.padding_idx,
        embed_scale=config.hidden_size**0.5)
    self.layers = nn.ModuleList([Gemma2FfnWidthsDecoderLayer(config, i)
                                 for i in range(config.num_hidden_layers)])
    self.norm = gemma2.Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    self.rotary_emb = gemma2.Gemma2RotaryEmbedding(config)
    self.gradient_checkpointing = False
    self.post_init()


class Gemma2FfnWidthsForCausalLM(gemma2.Gemma2ForCausalLM):
  config_class = Gemma2FfnWidthsConfig
  _no_split_modules = ["Gemma2FfnWidthsDecoderLayer"]

  def __init__(self, config):
    gemma2.Gemma2PreTrainedModel.__init__(self, config)
    self.model = Gemma2FfnWidthsModel(config)
    self.vocab_size = config.vocab_size
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()


__all__ = ["Gemma2FfnWidthsConfig", "Gemma2FfnWidthsModel", "Gemma2FfnWidthsForCausalLM"]
