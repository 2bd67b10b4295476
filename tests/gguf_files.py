"""Tiny GGUF files written with `gguf.GGUFWriter` as llama.cpp's converter writes them, and the
Hugging Face -> maxnucl params mapping that reads transformers' own loading of them back.

A file holds random weights of a small shape (every quantised row a multiple of 256, so K-quants
fit), each matrix in one of the types it is given (cycled over the matrices), norms and biases in
F32 as llama.cpp stores them.  Q/K rows of "llama" are permuted to ggml's interleaved RoPE order
and Gemma's norms stored as 1 + s, as convert_hf_to_gguf.py does.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Optional

import gguf
import numpy as np
import torch
import transformers

from maxnucl import ffn

Q = gguf.GGMLQuantizationType
QUANTISABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf.quants.quantize
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # dequantise only: written as random blocks
ALL_TYPES = QUANTISABLE + K_QUANTS


@dataclasses.dataclass(frozen=True)
class Shape:
  arch: str  # general.architecture
  vocab: int = 389
  d: int = 256
  layers: int = 3
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 64
  ffn: int = 512
  untied: bool = True
  bias: bool = False  # qwen2's q/k/v biases
  qk_norm: bool = False  # gemma3
  window: Optional[int] = None


SHAPES = {
    "llama": Shape("llama"),
    "llama_tied": Shape("llama", layers=2, untied=False),
    "qwen2": Shape("qwen2", layers=2, bias=True),
    # Gemma: tied, as llama.cpp writes it (its converter drops lm_head; transformers' GGUF
    # loading of Gemma reads no output.weight); head_dim 256: transformers keeps Gemma's default
    # query_pre_attn_scalar 256, llama.cpp scales by head_dim (by d / N only for the 27B models)
    "gemma2": Shape("gemma2", layers=3, heads=2, kv_heads=1, head_dim=256, untied=False,
                    window=4),
    "gemma3": Shape("gemma3", layers=7, heads=2, kv_heads=1, head_dim=256, untied=False,
                    qk_norm=True, window=4),
}


def k_quant_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
  """Random blocks of a K-quant type (uint8 [rows, bytes]) with small positive f16 scales in
  the fields that hold them (ggml's block_q4_K / q5_K: d, dmin first; q6_K: d last), chosen so
  the dequantised weights stay within about +-0.2, the scale of the other types' N(0, 0.1)
  values: a weight is d x (6-bit sub-scale <= 63) x (quant <= 31) - dmin x (sub-min <= 63)
  (Q6_K: d x (int8 sub-scale <= 127) x (quant in -32..31)).  Larger weights make the model's
  intermediate values ~1e5 and its logits ill-conditioned (float32 rounding of those values,
  amplified by the next norm, moves a logit by 0.1), which no rounding bound relative to the
  logits covers."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
  if qtype == Q.Q6_K:
    raw[..., size - 2:] = np.float16(2.5e-5 * (1 + rng.random(raw.shape[:2]))).view(
        np.uint8).reshape(*raw.shape[:2], 2)
  else:
    scales = np.stack([np.float16(1e-4 * (1 + rng.random(raw.shape[:2]))),
                       np.float16(1e-3 * rng.random(raw.shape[:2]))], axis=-1)
    raw[..., :4] = scales.view(np.uint8).reshape(*raw.shape[:2], 4)
  return raw.reshape(rows, -1)


def encode(values: np.ndarray, qtype, rng) -> tuple[np.ndarray, Optional[object]]:
  """(array, raw_dtype) for GGUFWriter.add_tensor: `values` [rows, cols] in `qtype`."""
  if qtype == Q.F32:
    return values.astype(np.float32), None
  if qtype == Q.F16:
    return values.astype(np.float16), None
  if qtype in K_QUANTS:
    return k_quant_blocks(*values.shape, qtype, rng), qtype
  return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's LlamaModel.permute: rows (h, half, j) -> (h, j, half)."""
  return w.reshape(heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(shape: Shape, rng) -> dict[str, np.ndarray]:
  """GGUF name -> random float32 values in Hugging Face layout (before llama.cpp's changes)."""
  s, n = shape, np.float32
  one = 0 if s.arch.startswith("gemma") else 1  # Gemma's norms are applied as 1 + weight
  out = {"token_embd.weight": rng.normal(0, 0.5, (s.vocab, s.d)).astype(n),
         "output_norm.weight": (one + rng.normal(0, 0.3, s.d)).astype(n)}
  if s.untied:
    out["output.weight"] = rng.normal(0, 0.1, (s.vocab, s.d)).astype(n)
  norms = ["attn_norm", "ffn_norm"] + (["post_attention_norm", "post_ffw_norm"]
                                       if s.arch.startswith("gemma") else [])
  for i in range(s.layers):
    b = f"blk.{i}"
    for kind, heads in (("q", s.heads), ("k", s.kv_heads), ("v", s.kv_heads)):
      out[f"{b}.attn_{kind}.weight"] = rng.normal(0, 0.1, (heads * s.head_dim, s.d)).astype(n)
      if s.bias:
        out[f"{b}.attn_{kind}.bias"] = rng.normal(0, 0.5, heads * s.head_dim).astype(n)
    out[f"{b}.attn_output.weight"] = rng.normal(0, 0.1, (s.d, s.heads * s.head_dim)).astype(n)
    if s.qk_norm:
      for kind in "qk":
        out[f"{b}.attn_{kind}_norm.weight"] = (one + rng.normal(0, 0.3, s.head_dim)).astype(n)
    for name in norms:
      out[f"{b}.{name}.weight"] = (one + rng.normal(0, 0.3, s.d)).astype(n)
    out[f"{b}.ffn_gate.weight"] = rng.normal(0, 0.1, (s.ffn, s.d)).astype(n)
    out[f"{b}.ffn_up.weight"] = rng.normal(0, 0.1, (s.ffn, s.d)).astype(n)
    out[f"{b}.ffn_down.weight"] = rng.normal(0, 0.1, (s.d, s.ffn)).astype(n)
  return out


def as_llama_cpp_stores(shape: Shape, name: str, values: np.ndarray) -> np.ndarray:
  """What convert_hf_to_gguf.py writes for an HF tensor: permuted llama Q/K, Gemma's 1 + s."""
  if shape.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
    return permute_rotary(values, shape.heads if ".attn_q." in name else shape.kv_heads)
  if shape.arch.startswith("gemma") and name.endswith("norm.weight"):
    return values + np.float32(1)
  return values


def write_gguf(path: pathlib.Path, shape: Shape, types=ALL_TYPES, seed: int = 0,
               metadata: Optional[dict] = None, extra_tensors: Optional[dict] = None,
               drop_metadata: tuple[str, ...] = ()) -> dict[str, object]:
  """Write a GGUF file of `shape`; matrices take `types` in turn.  metadata: key -> (value,
  GGUFValueType), added or replacing the key; drop_metadata: keys left out.  Returns name ->
  type."""
  rng = np.random.default_rng(seed)
  writer = gguf.GGUFWriter(str(path), shape.arch)
  _write_metadata(writer, shape)
  for key, value in (metadata or {}).items():
    writer.add_key_value(key, value[0], value[1])
  for key in drop_metadata:
    writer.kv_data[0].pop(key, None)
  cycle, written = itertools.cycle(types), {}
  for name, values in hf_tensors(shape, rng).items():
    values = as_llama_cpp_stores(shape, name, values)
    qtype = next(cycle) if values.ndim == 2 else Q.F32
    array, raw = encode(values, qtype, rng)
    writer.add_tensor(name, array, raw_dtype=raw)
    written[name] = qtype
  for name, (array, raw) in (extra_tensors or {}).items():
    writer.add_tensor(name, array, raw_dtype=raw)
    written[name] = raw
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return written


def _write_metadata(writer: gguf.GGUFWriter, s: Shape) -> None:
  writer.add_name(f"tiny-{s.arch}")
  writer.add_vocab_size(s.vocab)
  writer.add_context_length(128)
  writer.add_embedding_length(s.d)
  writer.add_block_count(s.layers)
  writer.add_feed_forward_length(s.ffn)
  writer.add_head_count(s.heads)
  writer.add_head_count_kv(s.kv_heads)
  writer.add_rope_freq_base(1_000_000.0 if s.arch == "gemma3" else 10_000.0)
  writer.add_layer_norm_rms_eps(1e-6 if s.arch != "llama" else 1e-5)
  if s.arch == "llama":
    writer.add_rope_dimension_count(s.head_dim)
  else:
    writer.add_key_length(s.head_dim)
    writer.add_value_length(s.head_dim)
  if s.window:
    writer.add_sliding_window(s.window)
  if s.arch == "gemma2":  # transformers' Gemma2Config defaults, which its GGUF loading keeps
    writer.add_attn_logit_softcapping(50.0)
    writer.add_final_logit_softcapping(30.0)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)


# ---- the reference: transformers' own GGUF loading -----------------------------------------------

def hf_from_gguf(path: pathlib.Path):
  """transformers' model of a GGUF file (float32, eager attention: Gemma-2's soft-cap)."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32,
      attn_implementation="eager").eval()


def params_from_hf(cfg, model) -> dict:
  """maxnucl params of a transformers Llama/Qwen2/Gemma2/Gemma3 model (independent of the
  converter: written from transformers' module names)."""
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  d, big_n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  gemma = cfg.family != "llama"
  params = {"embedder": {"embedding": sd["model.embed_tokens.weight"]},
            "final_norm": {"scale": sd["model.norm.weight"]}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"embedding": sd["lm_head.weight"]}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    attn = {"q": sd[p + "self_attn.q_proj.weight"].reshape(big_n, h, d).transpose(2, 0, 1),
            "k": sd[p + "self_attn.k_proj.weight"].reshape(k, h, d).transpose(2, 0, 1),
            "v": sd[p + "self_attn.v_proj.weight"].reshape(k, h, d).transpose(2, 0, 1),
            "o": sd[p + "self_attn.o_proj.weight"].T.reshape(big_n, h, d)}
    if cfg.qkv_bias:
      for kind, heads in (("q", big_n), ("k", k), ("v", k)):
        attn[f"{kind}_bias"] = sd[p + f"self_attn.{kind}_proj.bias"].reshape(heads, h)
    if cfg.qk_norm:
      attn["query_norm"] = {"scale": sd[p + "self_attn.q_norm.weight"]}
      attn["key_norm"] = {"scale": sd[p + "self_attn.k_norm.weight"]}
    layer = {"attn": attn, "pre_attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
             "mlp": {ffn.GATE: sd[p + "mlp.gate_proj.weight"].T,
                     ffn.UP: sd[p + "mlp.up_proj.weight"].T,
                     ffn.OUT: sd[p + "mlp.down_proj.weight"].T}}
    after_attention = sd[p + "post_attention_layernorm.weight"]
    if gemma:
      layer["post_attention_norm"] = {"scale": after_attention}
      layer["pre_ffw_norm"] = {"scale": sd[p + "pre_feedforward_layernorm.weight"]}
      layer["post_ffw_norm"] = {"scale": sd[p + "post_feedforward_layernorm.weight"]}
    else:
      layer["pre_ffw_norm"] = {"scale": after_attention}
    params[ffn.layer_name(i)] = layer
  return params


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
