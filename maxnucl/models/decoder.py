"""The decoder stack: Gemma-2/3, Llama-family and PaLM-style blocks over shared building blocks.

Parameter tree (plain nested dicts; this *is* the checkpoint format):
  embedder/embedding                     [vocab, d]
  lm_head/embedding                      [vocab, d]   only when cfg.tie_embeddings is False
  layers_{i}/attn/{q [d,N,H], k [d,K,H], v [d,K,H], o [N,H,d]}
  layers_{i}/attn/{q_bias [N,H], k_bias [K,H], v_bias [K,H]}       cfg.qkv_bias (Qwen2)
  layers_{i}/attn/{query_norm, key_norm}/scale [H]                 cfg.qk_norm (Gemma-3)
  layers_{i}/mlp/{gate U [d,m_i], up V [d,m_i], out W [m_i,d]}   absent when m_i = 0
  Gemma-2/3: layers_{i}/{pre_attention_norm, post_attention_norm, pre_ffw_norm,
             post_ffw_norm}/scale    (stored as s, applied as 1 + s)
  Llama:     layers_{i}/{pre_attention_norm, pre_ffw_norm}/scale   (applied as is)
  PaLM:      layers_{i}/pre_norm/scale
  final_norm/scale                       [d]
A layer of FFN width 0 has no mlp and none of the FFN branch's norms.

Scanned layers (`ModelConfig.scan_layers`): the forward pass of a deep stack compiles one layer
group, not every layer.  The params keep the per-layer tree above (what `init` returns, what
checkpoints, the converter and the pruner read); inside the jitted apply each run of equal-shaped
groups is stacked along a new leading axis and `jax.lax.scan` runs the group over it.  A group is
one period of the attention pattern: Gemma-2's (local, global) pair, PaLM's single layer.  Groups
whose shapes differ from their neighbours' (per-layer FFN widths of a pruned model) stay unrolled.
The KV-cache decoding path and the paths that read per-layer intermediates (the pruner's
calibration, `models.apply_with_ffn`) always run unrolled; both paths compute the same function
with the same dropout masks.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxnucl import sharding
from maxnucl import ffn
from maxnucl.layers.attentions import Attention
from maxnucl.layers.embeddings import Embedder
from maxnucl.layers.initializers import param_with_axes
from maxnucl.layers.linears import GatedMLP
from maxnucl.layers.normalizations import RMSNorm
from maxnucl.models.config import ModelConfig

RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _dtype(name: str):
  return jnp.dtype(name)


class _Block(nn.Module):
  """Shared construction of one layer's attention and FFN.

  Dropout is active iff the call is given a `dropout_key` (the layer's own key, derived from the
  model's by `layer_dropout_key`), so the unrolled and the scanned stack draw the same masks.
  """
  cfg: ModelConfig
  layer_index: int

  def norm(self, name: str):
    return RMSNorm(eps=self.cfg.norm_eps, offset_scale=self.cfg.norm_offset,
                   param_dtype=_dtype(self.cfg.param_dtype), name=name)

  def attention(self):
    cfg = self.cfg
    rope_theta, rope_scaling = cfg.layer_rope(self.layer_index)
    return Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, scale=cfg.attn_scale,
                     softcap=cfg.attn_logit_softcap, window=cfg.layer_windows[self.layer_index],
                     rope_theta=rope_theta, rope_scaling=rope_scaling, qkv_bias=cfg.qkv_bias,
                     qk_norm=cfg.qk_norm, norm_offset=cfg.norm_offset, norm_eps=cfg.norm_eps, impl=cfg.attention_impl,
                     dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), name="attn")

  def attend(self, h, positions, segment_ids, cache, prefill):
    """(attention output, the layer's updated KV cache or None when decoding is not cached)."""
    if cache is None:
      return self.attention()(h, positions, segment_ids), None
    return self.attention()(h, positions, segment_ids, cache, prefill)

  @property
  def ffn_width(self) -> int:
    return self.cfg.layer_ffn_widths[self.layer_index]

  def mlp(self):
    cfg = self.cfg
    return GatedMLP(width=self.ffn_width, activation=cfg.activation, dtype=_dtype(cfg.dtype),
                    param_dtype=_dtype(cfg.param_dtype), name="mlp")

  def dropout(self, x, dropout_key, site: int):
    """Residual-branch dropout; `site` numbers the branches of one layer (attention 0, FFN 1)."""
    if dropout_key is None:
      return x
    return nn.Dropout(rate=self.cfg.dropout_rate)(
        x, deterministic=False, rng=jax.random.fold_in(dropout_key, site))


class Gemma2Block(_Block):
  """h = x + post_attn_norm(attn(pre_attn_norm(x))); y = h + post_ffw_norm(ffn(pre_ffw_norm(h)))."""

  @nn.compact
  def __call__(self, x, positions, segment_ids, inner_scale=None, cache=None, prefill=False,
               dropout_key=None):
    h = self.norm("pre_attention_norm")(x)
    h, cache = self.attend(h, positions, segment_ids, cache, prefill)
    x = x + self.dropout(self.norm("post_attention_norm")(h), dropout_key, 0)
    if self.ffn_width:  # a layer of width 0 has no FFN branch (and no FFN norms)
      h = self.norm("pre_ffw_norm")(x)
      h = self.mlp()(h, inner_scale)
      x = x + self.dropout(self.norm("post_ffw_norm")(h), dropout_key, 1)
    return sharding.constrain(x, RESIDUAL_AXES), cache


class LlamaBlock(_Block):
  """h = x + attn(pre_attn_norm(x)); y = h + ffn(pre_ffw_norm(h)) (Llama, Mistral, Qwen2,
  SmolLM2)."""

  @nn.compact
  def __call__(self, x, positions, segment_ids, inner_scale=None, cache=None, prefill=False,
               dropout_key=None):
    h = self.norm("pre_attention_norm")(x)
    h, cache = self.attend(h, positions, segment_ids, cache, prefill)
    x = x + self.dropout(h, dropout_key, 0)
    if self.ffn_width:
      h = self.mlp()(self.norm("pre_ffw_norm")(x), inner_scale)
      x = x + self.dropout(h, dropout_key, 1)
    return sharding.constrain(x, RESIDUAL_AXES), cache


class PalmBlock(_Block):
  """Parallel block: y = x + attn(norm(x)) + ffn(norm(x)), one shared pre-norm."""

  @nn.compact
  def __call__(self, x, positions, segment_ids, inner_scale=None, cache=None, prefill=False,
               dropout_key=None):
    h = self.norm("pre_norm")(x)
    attended, cache = self.attend(h, positions, segment_ids, cache, prefill)
    y = x + self.dropout(attended, dropout_key, 0)
    if self.ffn_width:
      y = y + self.dropout(self.mlp()(h, inner_scale), dropout_key, 1)
    return sharding.constrain(y, RESIDUAL_AXES), cache


# The block wiring of each family; everything else that differs is a ModelConfig field.  Gemma-3's
# block is Gemma-2's (QK-norm and per-layer RoPE live in the attention).
BLOCKS = {"gemma2": Gemma2Block, "gemma3": Gemma2Block, "llama": LlamaBlock, "palm": PalmBlock}


def layer_dropout_key(dropout_key: Optional[jax.Array], index) -> Optional[jax.Array]:
  """Layer `index`'s dropout key (None: no dropout); `index` may be traced (inside a scan)."""
  return None if dropout_key is None else jax.random.fold_in(dropout_key, index)


# ---- scanned layers -------------------------------------------------------------------------------

def layer_groups(cfg: ModelConfig) -> list[tuple[int, ...]]:
  """The layers that one scan step runs: consecutive periods of the attention pattern.

  Gemma-2 (pattern (local, global)): [(0, 1), (2, 3), ...]; PaLM: [(0,), (1,), ...].  A last
  group shorter than the period (an odd number of Gemma-2 layers) is its own group.
  """
  period = len(cfg.attention_pattern)
  return [tuple(range(start, min(start + period, cfg.num_layers)))
          for start in range(0, cfg.num_layers, period)]


def scan_runs(cfg: ModelConfig) -> list[list[tuple[int, ...]]]:
  """Maximal runs of consecutive groups with identical structure (attention window and FFN
  width of each member, hence identical param shapes).  A run of two or more groups is scanned;
  a run of one is unrolled.  A uniform Gemma-2 of 2k layers is a single run of k pairs; per-layer
  FFN widths split it wherever a group differs from its predecessor."""
  def signature(group):
    return tuple((cfg.layer_windows[i], cfg.layer_ffn_widths[i]) for i in group)

  runs: list[list[tuple[int, ...]]] = []
  for group in layer_groups(cfg):
    if runs and signature(runs[-1][-1]) == signature(group):
      runs[-1].append(group)
    else:
      runs.append([group])
  return runs


def stack_run(params: dict, run: Sequence[tuple[int, ...]]) -> tuple[dict, ...]:
  """One stacked tree per member of the run's groups: member j's leaves are the j-th layers of
  every group stacked along a new leading axis [len(run), ...]."""
  stacked = []
  for j in range(len(run[0])):
    names = [ffn.layer_name(group[j]) for group in run]
    shapes = [jax.tree.map(jnp.shape, params[name]) for name in names]
    for name, shape in zip(names[1:], shapes[1:]):
      if shape != shapes[0]:
        raise ValueError(f"params {name} have shapes {shape} but {names[0]} has {shapes[0]}; "
                         "the model config gives both layers the same window and FFN width "
                         "(do the params belong to this config's ffn_widths?)")
    stacked.append(jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                *[params[name] for name in names]))
  return tuple(stacked)


def _layer_fn(cfg: ModelConfig, layer_index: int, positions, segment_ids, dropout_key,
              in_scan: bool):
  """`(layer params, x, index) -> x`: one block as a pure function of its params, wrapped in
  `jax.checkpoint` with the config's remat policy.  `layer_index` fixes the block's static
  structure (window, FFN width); the traced `index` only derives the layer's dropout key."""
  block = BLOCKS[cfg.family](cfg, layer_index)

  def layer(layer_params, x, index):
    y, _ = block.apply({"params": layer_params}, x, positions, segment_ids,
                       dropout_key=layer_dropout_key(dropout_key, index))
    return y

  if cfg.remat_policy == "none":
    return layer
  # Inside a scan the loop already keeps XLA from merging recomputation with the forward pass.
  return jax.checkpoint(layer, prevent_cse=not in_scan, policy=_REMAT_POLICIES[cfg.remat_policy])


def scanned_layers(cfg: ModelConfig, params: dict, x, positions, segment_ids,
                   dropout_key: Optional[jax.Array] = None):
  """The layer stack over the canonical params (`layers_{i}`), scanning each run of equal groups.

  x: [B, T, d] -> [B, T, d]; the same function as the unrolled stack in `Decoder`.
  """
  for run in scan_runs(cfg):
    template = run[0]  # every group of the run has this group's static structure
    fns = [_layer_fn(cfg, i, positions, segment_ids, dropout_key, in_scan=len(run) > 1)
           for i in template]
    if len(run) == 1:
      for fn, i in zip(fns, template):
        x = fn(params[ffn.layer_name(i)], x, i)
      continue

    def body(carry, xs, fns=fns):
      member_params, indices = xs
      for j, fn in enumerate(fns):
        carry = fn(member_params[j], carry, indices[j])
      return carry, None

    indices = jnp.asarray(run, jnp.int32)  # [groups, members]: each layer's own index
    x, _ = jax.lax.scan(body, x, (stack_run(params, run), indices))
  return x


class Decoder(nn.Module):
  """Token ids -> float32 logits [B, T, vocab].

  With `caches` ({"layers_i": KVCache}) it returns (out, new caches): `prefill=True` fills them
  from a right-padded prompt batch, `prefill=False` appends one token per row (maxnucl.decoding).
  `return_hidden=True` returns the final-normed hidden states [B, T, d] instead of logits (turned
  into logits by `output_logits`, e.g. only where they are needed).

  The stack is scanned (`scanned_layers`) when cfg.scan_layers is on, except at init (which
  creates the per-layer params), with caches, with `ffn_inner_scale`, and when the
  "intermediates" collection is mutable (per-layer values are read by layer name).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens, segment_ids, positions,
               ffn_inner_scale: Optional[dict] = None, *, caches: Optional[dict] = None,
               prefill: bool = False, return_hidden: bool = False):
    cfg = self.cfg
    embedder = Embedder(vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                        input_scale=cfg.embedding_scale, dtype=_dtype(cfg.dtype),
                        param_dtype=_dtype(cfg.param_dtype),
                        init_stddev=embedding_init_stddev(cfg), name="embedder")
    x = sharding.constrain(embedder.encode(tokens), RESIDUAL_AXES)
    dropout_key = None
    if not self.deterministic and cfg.dropout_rate > 0.0 and caches is None:
      dropout_key = self.make_rng("dropout")
    scan = (cfg.scan_layers and caches is None and ffn_inner_scale is None
            and not self.is_initializing() and not self.is_mutable_collection("intermediates"))
    new_caches = {}
    if scan:
      x = scanned_layers(cfg, self.variables["params"], x, positions, segment_ids, dropout_key)
    else:
      block_cls = BLOCKS[cfg.family]
      if cfg.remat_policy != "none" and caches is None:  # decoding has no backward pass
        block_cls = nn.remat(block_cls, prevent_cse=True,
                             policy=_REMAT_POLICIES[cfg.remat_policy])
      for i in range(cfg.num_layers):
        name = ffn.layer_name(i)
        block = block_cls(cfg, i, name=name)
        if caches is None:
          scale = None if ffn_inner_scale is None else ffn_inner_scale.get(name)
          x, _ = block(x, positions, segment_ids, scale, None, False,
                       layer_dropout_key(dropout_key, i))
        else:
          x, new_caches[name] = block(x, positions, segment_ids, None, caches[name], prefill)
    x = RMSNorm(eps=cfg.norm_eps, offset_scale=cfg.norm_offset,
                param_dtype=_dtype(cfg.param_dtype), name="final_norm")(x)
    output = embedder.embedding
    if not cfg.tie_embeddings:
      output = LmHead(cfg.vocab_size, cfg.d_model, embedding_init_stddev(cfg),
                      _dtype(cfg.param_dtype), name="lm_head")()
    out = x if return_hidden else output_logits(cfg, output, x)
    return out if caches is None else (out, new_caches)


class LmHead(nn.Module):
  """The untied output projection lm_head/embedding [V, d] (cfg.tie_embeddings False)."""
  vocab_size: int
  d_model: int
  init_stddev: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self):
    return param_with_axes(self, "embedding", nn.initializers.normal(stddev=self.init_stddev),
                           (self.vocab_size, self.d_model), self.param_dtype, ("vocab", "embed"))


def embedding_init_stddev(cfg: ModelConfig) -> float:
  """Initial scale of the [V, d] tables for unit-scale logits from unit-RMS hidden states: 1 when
  the logits are divided by sqrt(d) (PaLM), else d^-1/2 (a sqrt(d)-scaled lookup then has unit
  scale too; an unscaled one is rescaled by the first pre-norm)."""
  return 1.0 if cfg.logit_scale == "inv_sqrt_d" else cfg.d_model ** -0.5


def output_embedding(cfg: ModelConfig, params: dict) -> jax.Array:
  """The [V, d] matrix of the output projection: the input embedding when tied."""
  return params["embedder" if cfg.tie_embeddings else "lm_head"]["embedding"]


def output_logits(cfg: ModelConfig, embedding, x) -> jax.Array:
  """Final-normed hidden states [..., d] -> float32 logits [..., vocab]: the output projection
  (`output_embedding`), PaLM's 1/sqrt(d) and the final soft-cap."""
  logits = jnp.einsum("...D,VD->...V", x, embedding.astype(_dtype(cfg.dtype)),
                      preferred_element_type=jnp.float32)
  if x.ndim == 3:
    logits = sharding.constrain(logits, ("activation_batch", "activation_length",
                                         "activation_vocab"))
  if cfg.logit_scale == "inv_sqrt_d":
    logits = logits / jnp.sqrt(jnp.float32(cfg.d_model))  # PaLM: shared embedding, 1/sqrt(d)
  if cfg.final_logit_softcap is not None:
    cap = cfg.final_logit_softcap
    logits = cap * jnp.tanh(logits / cap)
  return logits
