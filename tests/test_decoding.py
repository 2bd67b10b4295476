"""Decoding and scoring: KV-cache generation is exact against the full forward pass and against
transformers' Gemma2ForCausalLM; sampling obeys its settings; bad input is named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_reference import maxnucl_from_hf, tiny_hf_gemma2
from maxnucl import decoding, models, sharding
from tolerances import (EPS_BF16, bf16_rounding_sites, decoder_terms, magnitude,
                        rounding_atol)


@pytest.fixture(scope="module")
def hf_model():
  """The transformers reference (window 6, both soft-caps active) with a small embedding: with
  large random tied embeddings greedy decoding just repeats one token; this one writes varied
  sequences, logits up to ~2.3 under the final cap of 3."""
  model = tiny_hf_gemma2(seed=0, norm_std=1.0)
  with torch.no_grad():
    model.model.embed_tokens.weight.mul_(0.05 / 0.3)
  return model


@pytest.fixture(scope="module")
def hf_params(hf_model):
  return maxnucl_from_hf(hf_model)


@pytest.fixture(scope="module")
def hf_saturated_params():
  """The parity tests' reference model: large activations, both soft-caps saturating."""
  return maxnucl_from_hf(tiny_hf_gemma2(seed=0))


def _random_tokens(cfg, seed, *lengths):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(3, cfg.vocab_size, size=n)) for n in lengths]


def _full_forward(cfg, params, tokens):
  """Logits [L, V] of one full (uncached) forward over `tokens`.  The model is causal, so row p
  is the full forward's last row for the prefix tokens[:p + 1]: one forward gives the reference
  for every decode step."""
  return np.asarray(models.apply(cfg, params, np.asarray(tokens)[None]))[0]


def _model(name, **overrides):
  cfg = models.get_config(name, **overrides)
  return cfg, models.init(cfg, jax.random.PRNGKey(3))


MODELS = {
    "gemma2_hf": "hf_params",
    "gemma2_hf_saturated": "hf_saturated_params",
    "palm_multi_query": dict(name="palm_tiny"),
    # QK-norm, 5 local : 1 global with their own RoPE bases, linear scaling on the global layer
    "gemma3_local_global": dict(name="gemma3_tiny", sliding_window=5,
                                rope_scaling=("linear", 8.0)),
    # GQA, untied lm_head, Llama-3.1's RoPE scaling active within the 56 positions
    "llama_untied_rope_scaled": dict(name="llama_tiny", rope_scaling=("llama3", 8.0, 1.0, 4.0, 16)),
    "qwen2_biases_pruned_widths": dict(name="llama_tiny", qkv_bias=True, ffn_widths=(256, 0, 40, 0)),
    "gemma2_pruned_widths": dict(name="gemma2_tiny", sliding_window=5,
                                 ffn_widths=(256, 0, 40, 0)),
}


@pytest.mark.parametrize("which", list(MODELS))
def test_cached_logits_equal_full_forward_at_every_step(which, request):
  """Prefill and every decode step (teacher-forced, ragged rows) give the full forward's logits,
  with prompts longer than the window and 40 steps that wrap a 5- or 6-slot ring many times."""
  if isinstance(MODELS[which], str):
    cfg, params = request.getfixturevalue(MODELS[which])
  else:
    cfg, params = _model(**MODELS[which])
  sequences = _random_tokens(cfg, 1, 60, 60, 60)
  lengths = np.array([13, 4, 1])  # 13 > window; 1: a prompt of BOS alone
  steps = 40
  tokens = np.zeros((3, 16), np.int32)
  for r, n in enumerate(lengths):
    tokens[r, :n] = sequences[r][:n]
  total = 16 + steps
  logits, caches = decoding.prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                    total_length=total)
  for i, window in enumerate(cfg.layer_windows):
    expected = total if window is None else window
    assert caches[f"layers_{i}"].k.shape[2] == expected  # ring buffer on sliding-window layers
  positions = lengths.copy()
  full = [_full_forward(cfg, params, sequences[r][:lengths[r] + steps]) for r in range(3)]
  # the cache holds the same keys and values; the two paths sum in other orders
  atol = rounding_atol(magnitude(*full), decoder_terms(cfg, total))
  for step in range(steps + 1):
    for r in range(3):
      reference = full[r][positions[r] - 1]
      np.testing.assert_allclose(np.asarray(logits[r]), reference, atol=atol, rtol=0,
                                 err_msg=f"row {r}, step {step}")
    next_tokens = jnp.asarray([sequences[r][positions[r]] for r in range(3)])
    logits, caches = decoding.decode_step_jit(cfg, params, caches, next_tokens,
                                              jnp.asarray(positions))
    positions = positions + 1


def test_greedy_tokens_equal_transformers_greedy_loop(hf_model, hf_params):
  cfg, params = hf_params
  prompts = [[cfg.bos_id] + p for p in _random_tokens(cfg, 2, 11, 3, 7)]  # ragged, 12 > window
  new_tokens = 20
  ours = decoding.generate(cfg, params, prompts, new_tokens)
  for prompt, generated in zip(prompts, ours):
    sequence = list(prompt)
    with torch.no_grad():
      for _ in range(new_tokens):
        logits = hf_model(input_ids=torch.tensor([sequence])).logits[0, -1]
        sequence.append(int(torch.argmax(logits)))
    assert generated == sequence[len(prompt):]
  assert len({tuple(g) for g in ours}) == 3 and all(len(set(g)) > 2 for g in ours)  # not trivial


def test_score_equals_transformers_log_softmax(hf_model, hf_params):
  cfg, params = hf_params
  contexts = [[cfg.bos_id] + p for p in _random_tokens(cfg, 4, 9, 1, 0, 20)]
  continuations = _random_tokens(cfg, 5, 3, 12, 1, 5)
  scores = decoding.score_tokens(cfg, params, contexts, continuations, batch_size=3)
  totals = decoding.score(cfg, params, contexts, continuations)
  for ctx, cont, ours, total in zip(contexts, continuations, scores, totals):
    with torch.no_grad():
      logits = hf_model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1).numpy()
    rows = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    expected = logprobs[rows, cont]
    # a log-probability: a logit's roundings plus the log-softmax's sum over the vocabulary
    atol = rounding_atol(magnitude(logprobs[rows]),
                         decoder_terms(cfg, len(ctx) + len(cont)) + cfg.vocab_size)
    np.testing.assert_allclose(ours.logprobs, expected, atol=atol, rtol=0)
    np.testing.assert_array_equal(ours.greedy, np.argmax(logprobs[rows], axis=-1) == cont)
    assert total == pytest.approx(expected.sum(), abs=atol * len(cont))


@pytest.mark.parametrize("name", ["gemma2_tiny", "gemma3_tiny", "llama_tiny", "palm_tiny"])
def test_ragged_batch_rows_equal_each_row_decoded_alone(name):
  cfg, params = _model(name, sliding_window=4 if name.startswith("gemma") else None)
  params = jax.tree.map(lambda x: x * 3.0, params)  # sharper, more varied greedy choices
  prompts = _random_tokens(cfg, 6, 9, 2, 17, 5, 1)
  together = decoding.generate(cfg, params, prompts, 14)
  alone = [decoding.generate(cfg, params, [p], 14)[0] for p in prompts]
  assert together == alone
  assert all(len(g) == 14 for g in together)


def test_rows_end_after_their_first_stop_token(hf_params):
  cfg, params = hf_params
  prompts = [[cfg.bos_id] + p for p in _random_tokens(cfg, 7, 5, 8, 2)]
  free = decoding.generate(cfg, params, prompts, 16)
  assert all(len(g) == 16 for g in free)
  stop = free[0][5]  # a token row 0 emits at step 5 (and maybe earlier)
  stopped = decoding.generate(cfg, params, prompts, 16, stop_token_ids=[stop])
  for full, cut in zip(free, stopped):
    ends = [i for i, t in enumerate(full) if t == stop]
    expected = full[:ends[0] + 1] if ends else full
    assert cut == expected
  assert len(stopped[0]) <= 6 and stopped[0][-1] == stop


def test_decode_loop_ends_when_every_row_is_done(hf_params):
  cfg, params = hf_params
  prompts = [[cfg.bos_id] + p for p in _random_tokens(cfg, 8, 4, 6)]
  free = decoding.generate(cfg, params, prompts, 12)
  stops = jnp.asarray([free[0][2], free[1][3]], jnp.int32)
  last_stop = max(min(i for i, t in enumerate(g) if t in stops.tolist()) for g in free) + 1
  tokens = np.zeros((2, 8), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts])
  sampling = decoding.Sampling()
  state = decoding._start(cfg, params, jnp.asarray(tokens), lengths, jnp.ones(2, bool),
                          jax.random.PRNGKey(0), stops, total_length=8 + 500,
                          max_new_tokens=500, sampling=sampling)
  state = decoding._extend(cfg, params, state, stops, jnp.int32(500), sampling=sampling)
  assert int(state["step"]) == last_stop  # not 500: the while_loop stopped early
  assert bool(jnp.all(state["done"]))


def test_stop_strings_end_rows_at_the_completing_token(hf_params):
  cfg, params = hf_params

  class Letters:  # token t decodes to one character
    def decode(self, ids):
      return "".join(chr(ord("A") + t % 26) for t in ids)

  prompts = [[cfg.bos_id] + p for p in _random_tokens(cfg, 9, 6, 3)]
  free = decoding.generate(cfg, params, prompts, 30)
  text = Letters().decode(free[0])
  stop = text[4:6]  # a two-character stop string that row 0 produces
  cut = decoding.generate(cfg, params, prompts, 30, stop_strings=[stop], tokenizer=Letters(),
                          check_every=4)
  assert cut[0] == free[0][:text.index(stop) + 2]
  row1 = Letters().decode(free[1])
  assert cut[1] == (free[1][:row1.index(stop) + 2] if stop in row1 else free[1])


# ---- sampling -------------------------------------------------------------------------------------

def _allowed(logits, top_k=None, top_p=None):
  """Independent numpy definition of the allowed set."""
  order = np.argsort(-logits, kind="stable")
  allowed = set(order[:top_k].tolist()) if top_k else set(order.tolist())
  if top_p is not None:
    kept = logits.copy()
    kept[[i for i in range(len(logits)) if i not in allowed]] = -np.inf
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    ranked = np.argsort(-probs, kind="stable")
    mass, nucleus = 0.0, set()
    for i in ranked:
      nucleus.add(int(i))
      mass += probs[i]
      if mass >= top_p:
        break
    allowed &= nucleus
  return allowed


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.5), (8, 0.9), (1, None)])
def test_top_k_top_p_never_emit_a_token_outside_the_allowed_set(top_k, top_p):
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 64)) * 2.0
  sampling = decoding.Sampling(temperature=1.0, top_k=top_k, top_p=top_p)
  draws = jax.vmap(lambda k: decoding.sample_tokens(logits, k, sampling))(
      jax.random.split(jax.random.PRNGKey(1), 3000))  # [3000, 4]
  for row in range(4):
    allowed = _allowed(np.asarray(logits[row], np.float64), top_k, top_p)
    seen = set(np.asarray(draws[:, row]).tolist())
    assert seen <= allowed
    assert len(seen) == len(allowed)  # and every allowed token does occur


def test_sampling_frequencies_follow_softmax_of_tempered_logits():
  logits = jnp.array([[1.0, 0.0, -1.0, 2.0]])
  sampling = decoding.Sampling(temperature=2.0)
  draws = jax.vmap(lambda k: decoding.sample_tokens(logits, k, sampling))(
      jax.random.split(jax.random.PRNGKey(2), 20_000))[:, 0]
  frequencies = np.bincount(np.asarray(draws), minlength=4) / 20_000
  expected = np.exp(np.array([1.0, 0.0, -1.0, 2.0]) / 2.0)
  expected /= expected.sum()
  # 8 binomial standard errors sqrt(p (1 - p) / n): a chance failure has probability < 1e-14
  np.testing.assert_allclose(frequencies, expected,
                             atol=8 * np.sqrt(expected.max() * (1 - expected.max()) / 20_000))


def test_fixed_seed_gives_the_same_tokens_and_low_temperature_equals_greedy(hf_params):
  cfg, params = hf_params
  prompts = [[cfg.bos_id] + p for p in _random_tokens(cfg, 10, 5, 9)]
  first = decoding.generate(cfg, params, prompts, 12, temperature=1.0, top_p=0.95, seed=4)
  again = decoding.generate(cfg, params, prompts, 12, temperature=1.0, top_p=0.95, seed=4)
  other = decoding.generate(cfg, params, prompts, 12, temperature=1.0, top_p=0.95, seed=5)
  assert first == again and first != other
  greedy = decoding.generate(cfg, params, prompts, 12)
  assert decoding.generate(cfg, params, prompts, 12, temperature=1e-6, seed=9) == greedy
  assert decoding.generate(cfg, params, prompts, 12, temperature=1.0, top_k=1, seed=9) == greedy


# ---- sharding, dtypes, rolling scores ---------------------------------------------------------

@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_decoding_and_scoring_equal_single_device(mesh_shape, hf_params):
  cfg, params = hf_params
  mesh = sharding.create_mesh(mesh_shape)
  prompts = [[cfg.bos_id] + p for p in _random_tokens(cfg, 11, 10, 3, 6)]
  single = decoding.generate(cfg, params, prompts, 10)
  assert decoding.generate(cfg, params, prompts, 10, mesh=mesh) == single
  conts = _random_tokens(cfg, 12, 4, 2, 7)
  single_scores = decoding.score(cfg, params, prompts, conts)
  # summed log-probabilities: each a logit's roundings and the vocabulary's, then the sum
  atol = rounding_atol(magnitude(single_scores),
                       decoder_terms(cfg, 24) + cfg.vocab_size + max(map(len, conts)))
  np.testing.assert_allclose(decoding.score(cfg, params, prompts, conts, mesh=mesh),
                             single_scores, atol=atol)
  # The caches are sharded too: batch over data x fsdp, KV heads over tensor.
  rules = sharding.logical_axis_rules()
  with sharding.activate(mesh, rules):
    placed = jax.device_put(params, sharding.tree_shardings(models.logical_axes(cfg), params,
                                                             mesh, rules))
    tokens = jnp.zeros((8, 8), jnp.int32)
    _, caches = decoding.prefill(cfg, placed, tokens, jnp.full((8,), 8), total_length=24)
  spec = caches["layers_1"].k.sharding.spec
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  assert spec[0] == (batch_axes if len(batch_axes) > 1 else batch_axes[0])
  assert spec[1] == "tensor"


def test_bfloat16_cached_logits_close_to_bfloat16_full_forward(hf_params):
  cfg, params = hf_params
  cfg = cfg.replace(dtype="bfloat16")
  sequence = _random_tokens(cfg, 13, 30)[0]
  logits, caches = decoding.prefill(cfg, params, jnp.asarray([sequence[:10]]), jnp.asarray([10]),
                                    total_length=40)
  full = _full_forward(cfg, params, sequence[:29])
  # both paths round the same values to bfloat16 at each operation, in other orders
  atol = rounding_atol(magnitude(full), bf16_rounding_sites(cfg), EPS_BF16)
  for position in range(10, 30):
    reference = full[position - 1]
    np.testing.assert_allclose(np.asarray(logits[0]), reference, atol=atol, rtol=0)
    logits, caches = decoding.decode_step_jit(cfg, params, caches,
                                              jnp.asarray([sequence[position]]),
                                              jnp.asarray([position]))


def test_rolling_score_covers_every_token_once(hf_params):
  cfg, params = hf_params
  document = _random_tokens(cfg, 14, 23)[0]
  windows = decoding.rolling_windows(document, 8, cfg.bos_id)
  assert [t for _, ctx_cont in enumerate(windows) for t in ctx_cont[1]] == document
  assert all(len(c) + len(t) - 1 <= 8 for c, t in windows)
  end = 8
  for context, block in windows[1:]:  # later windows: one input of 8 tokens ending before `end`
    end += len(block)
    assert context + block[:-1] == document[end - 9:end - 1]
  # A window as long as the document scores it in one piece after BOS.
  whole = decoding.score(cfg, params, [[cfg.bos_id]], [document])[0]
  atol = rounding_atol(abs(whole), decoder_terms(cfg, 64) + cfg.vocab_size + len(document))
  assert decoding.score_rolling(cfg, params, [document], max_length=64)[0] == pytest.approx(
      whole, abs=atol)
  # Shorter windows see less context: a different (here: the expected) total.
  expected = sum(decoding.score(cfg, params, [c for c, _ in windows], [t for _, t in windows]))
  assert decoding.score_rolling(cfg, params, [document], max_length=8)[0] == pytest.approx(
      expected, abs=atol)


def test_cache_bytes_of_local_layers_follow_the_window_not_the_length():
  cfg = models.get_config("gemma2_small")
  short = decoding.cache_bytes(cfg, batch=16, total_length=1024)
  long = decoding.cache_bytes(cfg, batch=16, total_length=4096)
  assert long["local"] == short["local"]  # window 256 < both lengths
  assert long["global"] == 4 * short["global"]
  per_token = 16 * (2 * cfg.num_kv_heads * cfg.head_dim * 4 + 4)
  assert short["local"] == 4 * cfg.sliding_window * per_token  # 4 local layers of 8


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=["hello"]), "prompt 0 is text"),
    (dict(prompts=[[2, 5], []]), "prompt 1 is empty"),
    (dict(prompts=[[2, 999]]), "token id 999 is outside the vocabulary"),
    (dict(prompts=[[2] * 60], max_new_tokens=10), "more than the model's max_positions 64"),
    (dict(max_new_tokens=-1), "max_new_tokens = -1"),
    (dict(temperature=-0.5), "temperature = -0.5"),
    (dict(top_p=1.5, temperature=1.0), "top_p = 1.5"),
    (dict(top_k=0, temperature=1.0), "top_k = 0"),
    (dict(stop_strings=["\n"]), "stop_strings need a tokenizer"),
])
def test_bad_generate_input_is_named(kwargs, message, hf_params):
  cfg, params = hf_params
  call = dict(prompts=[[2, 5, 6]], max_new_tokens=4)
  call.update(kwargs)
  with pytest.raises(decoding.DecodingError, match=message):
    decoding.generate(cfg, params, call.pop("prompts"), call.pop("max_new_tokens"), **call)


def test_bad_score_input_is_named(hf_params):
  cfg, params = hf_params
  with pytest.raises(decoding.DecodingError, match="context 1 is empty"):
    decoding.score(cfg, params, [[2], []], [[5], [6]])
  with pytest.raises(decoding.DecodingError, match="2 contexts but 1 continuations"):
    decoding.score(cfg, params, [[2], [2]], [[5]])
  with pytest.raises(decoding.DecodingError, match="pair 0: context"):
    decoding.score(cfg, params, [[2] * 50], [[5] * 20])
