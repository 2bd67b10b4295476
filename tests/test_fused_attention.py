"""The fused-kernel attention paths equal the XLA reference in outputs and gradients:
- 'splash' (the TPU kernel), run here through Pallas's interpreter on CPU: shapes off the 128
  tile, windows smaller than a block, packed segments with padding, GQA/MQA/MHA, whole models,
  a batch-sharded mesh (shard_map), and its lowering to Mosaic for TPU (cross-lowered here);
- 'pallas_gpu' (our Triton-backend flash kernel with soft-cap, window and segments), through
  Pallas's interpreter on CPU, including which blocks its loops visit, bfloat16 matmuls, and its
  lowering to Triton for CUDA (cross-lowered here);
- 'cudnn' (jax.nn.dot_product_attention, for models without a soft-cap), whose CPU fallback
  checks our mapping of heads, window and segments."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import attention_cases
from maxnucl import models, sharding
from maxnucl.layers import attentions
from maxnucl.layers import gpu_attention
from maxnucl.layers.splash_attention import splash_attention
from tolerances import (EPS_BF16, decoder_terms, gradient_terms, magnitude,
                        rounding_atol)

CASES = {
    # B, T, K, G, H, window, softcap, packed segments
    "GQA, T off the tile, packed with padding": (2, 37, 2, 2, 8, None, 50.0, True),
    "MQA, window smaller than a block, two blocks": (1, 200, 1, 4, 16, 5, 30.0, True),
    "MHA, window longer than the sequence": (2, 50, 4, 1, 8, 100, None, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_outputs_and_gradients_equal_xla(case):
  b, t, k, g, h, window, softcap, packed = case
  q, key, v, seg = attention_cases.inputs(b, t, k, g, h, packed)

  def splash(q, key, v):
    return splash_attention(q, key, v, seg, scale=0.3, softcap=softcap, window=window,
                            block=128)

  attention_cases.assert_equals_xla(splash, q, key, v, seg, window=window, softcap=softcap)



def test_splash_lowers_to_mosaic_kernels_for_tpu_on_a_machine_without_one():
  """Cross-lowering for the 'tpu' platform runs the Pallas-to-Mosaic lowering of the forward and
  both backward kernels (bfloat16, grouped heads, soft-cap, window, segments) here; Mosaic's own
  compilation still needs a TPU."""
  q, key, v, seg = attention_cases.inputs(2, 256, 2, 2, 128, packed=True)

  def loss(q, key, v):
    out = splash_attention(q, key, v, seg, scale=0.125, softcap=50.0, window=96, block=128,
                           interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  args = [x.astype(jnp.bfloat16) for x in (q, key, v)]
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("custom_call @tpu_custom_call") == 3
  for kernel in ("splash_mha_fwd", "splash_mha_dkv", "splash_mha_dq"):
    assert f'kernel_name = "{kernel}' in text, kernel


def _model(preset, **overrides):
  cfg = models.get_config(preset, num_layers=2, max_positions=64, **overrides)
  params = models.init(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 40)), jnp.int32)
  seg = np.ones((2, 40), np.int32)
  seg[0, 25:] = 2
  seg = jnp.asarray(seg)
  positions = jnp.asarray(np.where(np.arange(40) >= 25, np.arange(40) - 25, np.arange(40))
                          * np.array([[1], [0]]) + np.arange(40) * np.array([[0], [1]]))
  return cfg, params, tokens, seg, positions


def _logit_atol(cfg, tokens, *logits):
  """Two float32 computations of a model's logits (attention implementations, shardings) differ
  by the roundings along a logit's path (tests/tolerances.py), plus a blocked kernel's rescaling
  of its running sums: at most one rounding per key in every layer."""
  length = tokens.shape[1]
  return rounding_atol(magnitude(*logits), decoder_terms(cfg, length) + cfg.num_layers * length)


@pytest.mark.parametrize("preset", ["gemma2_tiny", "palm_tiny"])
def test_whole_models_equal_xla_in_logits_and_gradients(preset):
  cfg, params, tokens, seg, positions = _model(preset)

  def loss(p, impl):
    c = cfg.replace(attention_impl=impl)
    return jnp.sum(models.apply(c, p, tokens, seg, positions) ** 2) * 1e-4

  logits = {impl: models.apply(cfg.replace(attention_impl=impl), params, tokens, seg, positions)
            for impl in ("xla", "splash")}
  np.testing.assert_allclose(logits["splash"], logits["xla"], rtol=0,
                             atol=_logit_atol(cfg, tokens, logits["xla"]))
  grads = {impl: jax.grad(loss)(params, impl) for impl in ("xla", "splash")}
  # the loss sums every squared logit: a gradient's path, relative to its largest entry
  terms = gradient_terms(cfg, tokens.shape[1], tokens.size * cfg.vocab_size)
  for expected, actual in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["splash"])):
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=rounding_atol(magnitude(expected), terms))


def test_on_a_batch_sharded_mesh_it_runs_per_shard_and_equals_one_device():
  cfg, params, tokens, seg, positions = _model("gemma2_tiny")
  tokens, seg, positions = (jnp.concatenate([x] * 2) for x in (tokens, seg, positions))
  splash_cfg = cfg.replace(attention_impl="splash")
  expected = models.apply(cfg.replace(attention_impl="xla"), params, tokens, seg, positions)
  mesh = sharding.create_mesh((4, 1, 1), devices=jax.devices()[:4])
  with sharding.activate(mesh, sharding.logical_axis_rules()):
    apply = jax.jit(lambda p, t, s, pos: models.apply(splash_cfg, p, t, s, pos))
    jaxpr = str(jax.make_jaxpr(apply)(params, tokens, seg, positions))
    actual = apply(params, tokens, seg, positions)
  assert "shard_map" in jaxpr
  np.testing.assert_allclose(actual, expected, rtol=0, atol=_logit_atol(cfg, tokens, expected))


def test_auto_picks_splash_on_tpu_and_chunked_or_xla_elsewhere():
  assert attentions.choose_impl("auto", 128, backend="tpu") == "splash"
  assert attentions.choose_impl("auto", 4096, backend="tpu") == "splash"
  assert attentions.choose_impl("auto", attentions.AUTO_CHUNKED_LENGTH, backend="gpu",
                                softcap=50.0) == "chunked"
  assert attentions.choose_impl("auto", 512, backend="cpu") == "xla"
  assert attentions.choose_impl("splash", 16, backend="cpu") == "splash"


# ---- the Pallas GPU kernel -------------------------------------------------------------------------

GPU_CASES = {
    # B, T, K, G, H, window, softcap, packed, block_q, block_k
    "GQA, T off the blocks, packed with padding": (2, 37, 2, 2, 8, None, 50.0, True, 16, 32),
    "MQA, window smaller than a block": (1, 100, 1, 4, 16, 5, 30.0, True, 32, 16),
    "MHA, window longer than the sequence": (2, 50, 4, 1, 8, 100, None, False, 16, 16),
}


@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_pallas_gpu_outputs_and_gradients_equal_xla(case):
  b, t, k, g, h, window, softcap, packed, block_q, block_k = case
  q, key, v, seg = attention_cases.inputs(b, t, k, g, h, packed)

  def fused(q, key, v):
    return gpu_attention.flash_attention(q, key, v, seg, scale=0.3, softcap=softcap,
                                         window=window, block_q=block_q, block_k=block_k)

  attention_cases.assert_equals_xla(fused, q, key, v, seg, window=window, softcap=softcap)


@pytest.mark.parametrize("window", [None, 1, 5, 16, 23, 60])
@pytest.mark.parametrize("block_q, block_k", [(16, 16), (16, 8), (8, 32)])
def test_pallas_gpu_loops_visit_exactly_the_blocks_with_a_visible_pair(window, block_q, block_k):
  length = 64
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  visible = (j <= i) & ((j > i - window) if window else True)
  for qb in range(length // block_q):
    first, last = gpu_attention._key_range(qb, block_q, block_k, window)
    seen = {kb for kb in range(length // block_k)
            if visible[qb * block_q:(qb + 1) * block_q, kb * block_k:(kb + 1) * block_k].any()}
    assert set(range(int(first), int(last))) == seen, (qb, window)
  for kb in range(length // block_k):
    first, last = gpu_attention._query_range(kb, block_q, block_k, window, length // block_q)
    seen = {qb for qb in range(length // block_q)
            if visible[qb * block_q:(qb + 1) * block_q, kb * block_k:(kb + 1) * block_k].any()}
    assert set(range(int(first), int(last))) == seen, (kb, window)


def test_pallas_gpu_in_a_whole_gemma2_model_and_its_limits():
  cfg, params, tokens, seg, positions = _model("gemma2_tiny")
  expected = models.apply(cfg.replace(attention_impl="xla"), params, tokens, seg, positions)
  actual = models.apply(cfg.replace(attention_impl="pallas_gpu"), params, tokens, seg, positions)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=_logit_atol(cfg, tokens, expected))
  q = jnp.zeros((1, 8, 1, 1, 24))
  with pytest.raises(ValueError, match="power-of-2 head dimension, got 24"):
    gpu_attention.flash_attention(q, q[:, :, :, 0], q[:, :, :, 0], jnp.ones((1, 8), jnp.int32),
                                  scale=1.0)
  assert attentions.choose_impl("auto", 4096, backend="gpu", softcap=50.0) == "chunked"



def _bf16_flash_grad(interpret):
  """The gradient of a bfloat16 Gemma-2-like attention (GQA, soft-cap, window, packed) through
  the fused kernels."""
  q, key, v, seg = attention_cases.inputs(2, 96, 2, 2, 64, packed=True)
  q, key, v = (x.astype(jnp.bfloat16) for x in (q, key, v))

  def loss(q, key, v):
    out = gpu_attention.flash_attention(q, key, v, seg, scale=0.125, softcap=50.0, window=40,
                                        block_q=32, block_k=32, interpret=interpret)
    return jnp.sum(out.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, key, v)


def test_pallas_gpu_kernels_multiply_in_the_inputs_dtype_and_accumulate_in_float32():
  """bfloat16 inputs: every matmul in the three kernels takes bfloat16 operands (the tensor
  cores' type; float32 operands would run at a fraction of the speed) into float32."""
  def eqns(jaxpr, primitive):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == primitive:
        yield eqn
      else:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          yield from eqns(sub, primitive)

  grad, args = _bf16_flash_grad(interpret=True)
  kernels = list(eqns(jax.make_jaxpr(grad)(*args).jaxpr, "pallas_call"))
  assert len(kernels) == 3  # forward, dK/dV, dQ
  for kernel in kernels:
    found = list(eqns(kernel.params["jaxpr"], "dot_general"))
    assert found, kernel.params["name_and_src_info"]
    for eqn in found:
      assert [x.aval.dtype for x in eqn.invars] == [jnp.bfloat16] * 2, eqn
      assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def _gradient_scales(q, key, v, seg, *, scale, softcap, window):
  """Higham's scale of the gradients of sum(out) (tests/tolerances.py): the largest sum of the
  |terms| of an entry of dq, dk and dv.  With p the attention probabilities and dO = 1:
  dv_j = sum_i p_ij (positive terms); dq_i = scale sum_j ds_ij k_j, dk_j = scale sum_i ds_ij q_i
  with |ds_ij| <= p_ij (|dp_ij| + |delta_i|), dp_ij = sum_h v_jh, delta_i = sum_j p_ij dp_ij
  (the soft-cap's derivative is at most 1)."""
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, key) * scale
  p = np.asarray(attentions._attention_probs(scores, attentions.attention_mask(seg, window),
                                             softcap, jnp.float32), np.float64)
  q, key, v = (np.asarray(x, np.float64) for x in (q, key, v))
  dp = v.sum(-1).transpose(0, 2, 1)[:, :, None, None, :]  # [B, K, 1, 1, S]
  ds = p * (np.abs(dp) + np.abs((p * dp).sum(-1, keepdims=True)))
  return (scale * np.einsum("bkgts,bskh->btkgh", ds, np.abs(key)).max(),
          scale * np.einsum("bkgts,btkgh->bskh", ds, np.abs(q)).max(),
          np.einsum("bkgts->bsk", p).max())


def test_pallas_gpu_bfloat16_gradients_agree_with_xla_in_float32():
  grad, args = _bf16_flash_grad(interpret=True)
  seg = attention_cases.inputs(2, 96, 2, 2, 64, packed=True)[3]

  def xla(q, key, v):
    out = attentions.dot_product_attention(q, key, v, attentions.attention_mask(seg, 40),
                                           scale=0.125, softcap=50.0)
    return jnp.sum(out.astype(jnp.float32))

  inputs = [x.astype(jnp.float32) for x in args]  # the same (bfloat16) values
  expected = jax.grad(xla, argnums=(0, 1, 2))(*inputs)
  scales = _gradient_scales(*inputs, seg, scale=0.125, softcap=50.0, window=40)
  # bfloat16 roundings on each gradient's path (float32 accumulation): dq, dk: P and O in the
  # forward (through delta), dS before its matmul and the gradient itself; dv: P before its
  # matmul and the gradient
  for name, e, a, size, sites in zip("qkv", expected, grad(*args), scales, (4, 4, 2)):
    np.testing.assert_allclose(a.astype(jnp.float32), e, rtol=0, err_msg=name,
                               atol=rounding_atol(size, sites, EPS_BF16))


def test_pallas_gpu_lowers_to_triton_kernels_for_cuda_on_a_machine_without_one():
  """Cross-lowering for the 'cuda' platform runs JAX's Pallas-to-Triton lowering of all three
  kernels here: every operation in them has a Triton lowering rule.  (Triton's own compilation
  to PTX still needs a GPU.)"""
  grad, args = _bf16_flash_grad(interpret=False)
  text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  for kernel in ("maxnucl_flash_forward", "maxnucl_flash_dkv", "maxnucl_flash_dq"):
    assert f'name = "{kernel}"' in text, kernel
  assert text.count("__gpu$xla.gpu.triton") == 3


# ---- cuDNN (jax.nn.dot_product_attention) for models without a soft-cap ---------------------------

@pytest.mark.parametrize("case", [(2, 37, 2, 2, 8, None, True), (1, 64, 1, 4, 16, 5, True),
                                  (2, 50, 4, 1, 8, 100, False)],
                         ids=["GQA packed", "MQA window 5 packed", "MHA window > T"])
def test_cudnn_path_equals_xla_in_outputs_and_gradients(case):
  """On CPU jax.nn.dot_product_attention runs its XLA implementation: this checks our mapping
  (heads, causal + local window, segments as a mask, scale); cuDNN itself needs a GPU."""
  b, t, k, g, h, window, packed = case
  q, key, v, seg = attention_cases.inputs(b, t, k, g, h, packed)

  def xla(q, key, v):
    return attentions.dot_product_attention(q, key, v, attentions.attention_mask(seg, window),
                                            scale=0.3, softcap=None)

  def cudnn(q, key, v):
    return attentions.cudnn_attention(q, key, v, seg, scale=0.3, window=window)

  terms = attention_cases.attention_terms(t, h)
  np.testing.assert_allclose(cudnn(q, key, v), xla(q, key, v), rtol=0,
                             atol=rounding_atol(magnitude(v), terms))
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, key, v)
           for f in (xla, cudnn)]
  for expected, actual in zip(*grads):
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=rounding_atol(magnitude(expected), 2 * terms))


def test_cudnn_is_refused_for_soft_capped_models_and_chosen_for_palm_on_gpu():
  with pytest.raises(models.ConfigError, match="not 'cudnn' with attn_logit_softcap"):
    models.get_config("gemma2_tiny", attention_impl="cudnn")
  cfg, params, tokens, seg, positions = _model("palm_tiny")
  expected = models.apply(cfg.replace(attention_impl="xla"), params, tokens, seg, positions)
  actual = models.apply(cfg.replace(attention_impl="cudnn"), params, tokens, seg, positions)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=_logit_atol(cfg, tokens, expected))
  assert attentions.choose_impl("auto", 512, backend="gpu", softcap=None) == "cudnn"
  assert attentions.choose_impl("auto", 512, backend="gpu", softcap=50.0) == "xla"
