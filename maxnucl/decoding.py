"""Decoding and scoring: KV-cache generation and log-likelihood scoring, the two primitives every
evaluation stands on.

    from maxnucl import decoding
    new = decoding.generate(cfg, params, [[2, 81, 58], [2, 90]], max_new_tokens=32,
                            stop_token_ids=[cfg.eos_id])          # new tokens of each prompt
    lp = decoding.score(cfg, params, contexts, continuations)     # sum log p(continuation | context)
    per_token = decoding.score_tokens(cfg, params, contexts, continuations)
    doc_lp = decoding.score_rolling(cfg, params, documents, max_length=2048)  # perplexity

Generation (docs/decoding.md):
  1. prefill: the prompts of a batch, right-padded, go through the model in one pass (the same
     attention as training, so its logits are the full forward's); every layer's KV cache is
     filled from it: global layers get a cache of the maximum length, sliding-window layers a
     ring buffer of the window size (`KVCache`: the token at position p in slot p % L);
  2. decode: a jitted step appends one token per row and attends over the cache, inside
     `jax.lax.while_loop`, which ends when every row has produced a stop token or
     `max_new_tokens` are reached.  Each row keeps its own positions, so a row of a ragged batch
     decodes exactly as it would alone.
With a mesh, params, caches and activations are sharded by the same logical rules as training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from maxnucl import compilation, ffn, models, sharding
from maxnucl.layers.attentions import KVCache
from maxnucl.models.config import ModelConfig
from maxnucl.models.decoder import Decoder, output_embedding, output_logits

# Shapes are padded to few distinct values so that repeated calls (an evaluation's batches) reuse
# compiled programs: lengths to powers of two up to _LENGTH_STEP, then multiples of it.
_LENGTH_STEP = 512
# Scoring turns at most this many logits (float32) into log-probabilities at once.
_SCORE_LOGITS_BUDGET = 1 << 26


class DecodingError(ValueError):
  """Bad input to generate/score (the message names the prompt or argument)."""


# ---- caches ---------------------------------------------------------------------------------------

def cache_lengths(cfg: ModelConfig, total_length: int) -> tuple[int, ...]:
  """Slots of each layer's KV cache: the window on sliding-window layers (a ring buffer),
  `total_length` (the longest prompt plus the new tokens) on global ones."""
  return tuple(total_length if window is None else min(window, total_length)
               for window in cfg.layer_windows)


def init_caches(cfg: ModelConfig, batch: int, total_length: int) -> dict[str, KVCache]:
  return {ffn.layer_name(i): KVCache.empty(batch, length, cfg.num_kv_heads, cfg.head_dim,
                                       jnp.dtype(cfg.dtype))
          for i, length in enumerate(cache_lengths(cfg, total_length))}


def cache_bytes(cfg: ModelConfig, batch: int, total_length: int) -> dict[str, int]:
  """Bytes of the KV caches (keys, values and slot positions), by layer kind and in total."""
  per_slot = batch * (2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize + 4)
  out = {"local": 0, "global": 0}
  for kind, length in zip(cfg.layer_attention_kinds, cache_lengths(cfg, total_length)):
    out[kind] += length * per_slot
  out["total"] = out["local"] + out["global"]
  return out


# ---- the model with a cache -----------------------------------------------------------------------

def _hidden(cfg, params, tokens, segment_ids, positions, caches=None, prefill=False):
  return Decoder(cfg).apply({"params": params}, tokens, segment_ids, positions, caches=caches,
                            prefill=prefill, return_hidden=True)


@functools.partial(jax.jit, static_argnames=("cfg", "total_length"))
def prefill(cfg: ModelConfig, params: dict, tokens: jax.Array, lengths: jax.Array, *,
            total_length: int) -> tuple[jax.Array, dict[str, KVCache]]:
  """One pass over a right-padded prompt batch.

  tokens [B, T] (row b's prompt in its first lengths[b] entries), lengths [B] >= 1.  Returns the
  float32 logits after each row's last prompt token [B, V] and the filled caches, sized for
  sequences of up to `total_length` tokens.
  """
  batch, length = tokens.shape
  index = jnp.arange(length, dtype=jnp.int32)[None, :]
  segment_ids = (index < lengths[:, None]).astype(jnp.int32)
  positions = jnp.broadcast_to(index, tokens.shape)
  caches = init_caches(cfg, batch, total_length)
  hidden, caches = _hidden(cfg, params, tokens, segment_ids, positions, caches, prefill=True)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return output_logits(cfg, output_embedding(cfg, params), last), caches


def decode_step(cfg: ModelConfig, params: dict, caches: dict[str, KVCache], tokens: jax.Array,
                positions: jax.Array) -> tuple[jax.Array, dict[str, KVCache]]:
  """Append one token per row (tokens, positions [B]) -> (float32 logits [B, V], caches)."""
  hidden, caches = _hidden(cfg, params, tokens[:, None], jnp.ones_like(tokens)[:, None],
                           positions[:, None], caches)
  return output_logits(cfg, output_embedding(cfg, params), hidden[:, 0]), caches


decode_step_jit = jax.jit(decode_step, static_argnames=("cfg",), donate_argnames=("caches",))


# ---- sampling -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen from logits: greedy (temperature 0) or sampled from
  softmax(logits / temperature) restricted to the top_k tokens and then to the top_p nucleus
  (the order transformers applies them in)."""
  temperature: float = 0.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None

  def __post_init__(self):
    if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0
            and math.isfinite(self.temperature)):
      raise DecodingError(f"temperature = {self.temperature!r}; expected a finite number >= 0 "
                          f"(0 = greedy)")
    if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
      raise DecodingError(f"top_k = {self.top_k!r}; expected a positive integer or None")
    if self.top_p is not None and not (isinstance(self.top_p, (int, float))
                                       and 0.0 < self.top_p <= 1.0):
      raise DecodingError(f"top_p = {self.top_p!r}; expected a number in (0, 1] or None")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits: jax.Array, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> jax.Array:
  """logits [..., V] with every token outside the allowed set at -inf.

  top_k: the k highest logits (ties at the k-th value kept); top_p: the smallest set of highest-
  probability tokens whose total probability reaches top_p (always at least the most likely).
  """
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the tokens ranked above
    kept = before < top_p
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_tokens(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, V] -> token ids [B] int32."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ---- the generation loop --------------------------------------------------------------------------

def _is_stop(tokens, stop_ids):
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


@compilation.announced_jit(
    what=lambda a: f"prefill ({a['cfg'].name}, batch {compilation.shape_text(a['tokens'])})",
    static_argnames=("cfg", "total_length", "max_new_tokens", "sampling"))
def _start(cfg, params, tokens, lengths, active, rng, stop_ids, *, total_length, max_new_tokens,
           sampling):
  """Prefill, and the first new token of every row."""
  logits, caches = prefill(cfg, params, tokens, lengths, total_length=total_length)
  rng, step_rng = jax.random.split(rng)
  first = sample_tokens(logits, step_rng, sampling)
  out = jnp.full((tokens.shape[0], max_new_tokens), cfg.pad_id, jnp.int32).at[:, 0].set(first)
  return {"step": jnp.int32(1), "out": out, "last": first, "lengths": lengths, "rng": rng,
          "done": ~active | _is_stop(first, stop_ids), "caches": caches}


@compilation.announced_jit(
    what=lambda a: (f"decoding ({a['cfg'].name}, batch {a['state']['out'].shape[0]}, up to "
                    f"{a['state']['out'].shape[1]} new tokens)"),
    static_argnames=("cfg", "sampling"), donate_argnames=("state",))
def _extend(cfg, params, state, stop_ids, end, *, sampling):
  """Decode steps `state["step"]`, ... up to `end` (exclusive), or until every row is done."""

  def unfinished(s):
    return (s["step"] < end) & ~jnp.all(s["done"])

  def step(s):
    # The token chosen at step t-1 sits at position length + t - 1.
    logits, caches = decode_step(cfg, params, s["caches"], s["last"],
                                 s["lengths"] + s["step"] - 1)
    rng, step_rng = jax.random.split(s["rng"])
    token = jnp.where(s["done"], cfg.pad_id, sample_tokens(logits, step_rng, sampling))
    out = jax.lax.dynamic_update_slice(s["out"], token[:, None], (0, s["step"]))
    return {"step": s["step"] + 1, "out": out, "last": token, "lengths": s["lengths"],
            "rng": rng, "done": s["done"] | _is_stop(token, stop_ids), "caches": caches}

  return jax.lax.while_loop(unfinished, step, state)


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0,
             stop_token_ids: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
             rules: Optional[sharding.Rules] = None,
             stop_strings: Optional[Sequence[str]] = None, tokenizer: Any = None,
             batch_size: Optional[int] = None, check_every: int = 32,
             progress: Optional[Callable[[int], None]] = None) -> list[list[int]]:
  """The new tokens of each prompt (token-id lists of any lengths, e.g. [BOS] + encode(text)).

  Without stops every row gets exactly `max_new_tokens` tokens; a row ends after its first token
  in `stop_token_ids` (included), or, with `stop_strings` and a `tokenizer` (its `decode`), after
  the token that completes the first occurrence of a stop string in its decoded text (checked
  every `check_every` tokens; the loop stops early when all rows are done).  temperature 0 is
  greedy.  `batch_size` splits many prompts into batches (default: one batch), formed longest
  first; `progress(n)` is called after each batch with its number of prompts.  With a `mesh`,
  params (placed if they are not yet) and caches are sharded by `rules` (default: the gin rules).
  """
  sampling = Sampling(temperature, top_k, top_p)
  prompts = _check_token_lists(cfg, prompts, "prompt", allow_empty=False)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise DecodingError(f"max_new_tokens = {max_new_tokens!r}; expected an integer >= 0")
  stop_ids = _check_token_lists(cfg, [list(stop_token_ids or [])], "stop_token_ids")[0]
  if stop_strings and tokenizer is None:
    raise DecodingError("stop_strings need a tokenizer (its decode turns tokens into text)")
  longest = max((len(p) for p in prompts), default=0)
  if longest + max_new_tokens > cfg.max_positions:
    raise DecodingError(
        f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} that is "
        f"{longest + max_new_tokens} positions, more than the model's max_positions "
        f"{cfg.max_positions} (shorten the prompt or generate fewer tokens)")
  if not prompts or max_new_tokens == 0:
    return [[] for _ in prompts]
  batch_size = batch_size or len(prompts)
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths batched
  results: list[list[int]] = [[] for _ in prompts]
  rng = jax.random.PRNGKey(seed)
  where = _Placement(cfg, mesh, rules)
  with where.active():
    params = where.params(params)
    for number, start in enumerate(range(0, len(prompts), batch_size)):
      rows = order[start:start + batch_size]
      new = _generate_batch(cfg, params, [prompts[i] for i in rows], max_new_tokens, sampling,
                            jax.random.fold_in(rng, number), stop_ids, stop_strings, tokenizer,
                            where, check_every)
      for row, tokens in zip(rows, new):
        results[row] = tokens
      if progress is not None:
        progress(len(rows))
  return results


def _generate_batch(cfg, params, prompts, max_new_tokens, sampling, rng, stop_ids, stop_strings,
                    tokenizer, where, check_every):
  rows = _padded_batch(len(prompts), where.batch_shards)
  length = _bucket(max(len(p) for p in prompts))
  tokens = np.full((rows, length), cfg.pad_id, np.int32)
  lengths = np.ones(rows, np.int32)  # padding rows: one token, done from the start
  for r, prompt in enumerate(prompts):
    tokens[r, :len(prompt)] = prompt
    lengths[r] = len(prompt)
  active = np.arange(rows) < len(prompts)
  stops = jnp.asarray(stop_ids or [-1], jnp.int32)
  tokens, lengths, active = where.batch(tokens, lengths, active)
  state = _start(cfg, params, tokens, lengths, active, rng, stops,
                 total_length=length + max_new_tokens, max_new_tokens=max_new_tokens,
                 sampling=sampling)
  step = 1
  while True:
    end = min(step + check_every, max_new_tokens) if stop_strings else max_new_tokens
    state = _extend(cfg, params, state, stops, jnp.int32(end), sampling=sampling)
    step = int(state["step"])
    done = _host(state["done"]).copy()
    if stop_strings:
      out = _host(state["out"][:, :step])
      newly = [r for r in range(len(prompts))
               if not done[r] and _stop_string_end(out[r], stop_strings, tokenizer) is not None]
      if newly:
        done[newly] = True
        state["done"] = where.place(done, state["done"].sharding)
    if step >= max_new_tokens or done.all():
      break
  out = _host(state["out"][:, :step])
  return [_trim(out[r].tolist(), stop_ids, stop_strings, tokenizer) for r in range(len(prompts))]


def _stop_string_end(tokens, stop_strings, tokenizer) -> Optional[int]:
  """The shortest prefix length of `tokens` whose text contains a stop string, or None."""
  text = tokenizer.decode(list(tokens))
  if not any(s in text for s in stop_strings):
    return None
  for k in range(1, len(tokens) + 1):
    text = tokenizer.decode(list(tokens[:k]))
    if any(s in text for s in stop_strings):
      return k
  return len(tokens)


def cut_at_stop(text: str, stop_strings: Optional[Sequence[str]]) -> str:
  """`text` up to (not including) the earliest occurrence of any stop string."""
  cuts = [text.find(s) for s in stop_strings or () if s and s in text]
  return text[:min(cuts)] if cuts else text


def _trim(tokens, stop_ids, stop_strings, tokenizer):
  end = len(tokens)
  for i, token in enumerate(tokens):
    if token in stop_ids:
      end = i + 1
      break
  if stop_strings:
    end = min(end, _stop_string_end(tokens[:end], stop_strings, tokenizer) or end)
  return tokens[:end]


# ---- scoring --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenScores:
  """Per continuation token: log p(token | everything before it) and whether it is the argmax."""
  logprobs: np.ndarray  # [n] float32
  greedy: np.ndarray  # [n] bool

  @property
  def total(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))


@compilation.announced_jit(
    what=lambda a: f"scoring ({a['cfg'].name}, batch {compilation.shape_text(a['tokens'])})",
    static_argnames=("cfg", "chunk"))
def _score_batch(cfg, params, tokens, lengths, target_positions, targets, *, chunk):
  """log p(targets[b, j] | tokens[b, :target_positions[b, j] + 1]) and whether it is the argmax;
  logits are formed only at the target positions, `chunk` positions at a time."""
  index = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  segment_ids = (index < lengths[:, None]).astype(jnp.int32)
  hidden = _hidden(cfg, params, tokens, segment_ids, jnp.broadcast_to(index, tokens.shape))
  picked = jnp.take_along_axis(hidden, target_positions[:, :, None], axis=1)  # [B, C, d]
  batch, width = targets.shape
  picked = picked.reshape(batch, width // chunk, chunk, -1).swapaxes(0, 1)
  split_targets = targets.reshape(batch, width // chunk, chunk).swapaxes(0, 1)

  def one_chunk(args):
    h, t = args
    logits = output_logits(cfg, output_embedding(cfg, params), h)  # [B, chunk, V]
    target_logit = jnp.take_along_axis(logits, t[:, :, None], axis=-1)[..., 0]
    logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
    return logprob, jnp.argmax(logits, axis=-1) == t

  logprobs, greedy = jax.lax.map(one_chunk, (picked, split_targets))
  return (logprobs.swapaxes(0, 1).reshape(batch, width),
          greedy.swapaxes(0, 1).reshape(batch, width))


def score_tokens(cfg: ModelConfig, params: dict, contexts: Sequence[Sequence[int]],
                 continuations: Sequence[Sequence[int]], *, batch_size: int = 16,
                 mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None,
                 progress: Optional[Callable[[int], None]] = None) -> list[TokenScores]:
  """Per-token log-probabilities of each continuation given its context (one forward pass over
  context + continuation; contexts are non-empty, e.g. start with BOS).  Pairs are batched by
  length, longest first; `progress(n)` is called after each batch with the pairs it scored."""
  contexts = _check_token_lists(cfg, contexts, "context", allow_empty=False)
  continuations = _check_token_lists(cfg, continuations, "continuation")
  if len(contexts) != len(continuations):
    raise DecodingError(f"{len(contexts)} contexts but {len(continuations)} continuations")
  for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
    if len(ctx) + len(cont) - 1 > cfg.max_positions:
      raise DecodingError(f"pair {i}: context ({len(ctx)} tokens) + continuation "
                          f"({len(cont)}) is longer than the model's max_positions "
                          f"{cfg.max_positions} + 1 (truncate the context from the left)")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise DecodingError(f"batch_size = {batch_size!r}; expected a positive integer")
  order = sorted(range(len(contexts)), key=lambda i: -(len(contexts[i]) + len(continuations[i])))
  results: list[Optional[TokenScores]] = [None] * len(contexts)
  where = _Placement(cfg, mesh, rules)
  with where.active():
    params = where.params(params)
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      scored = _score_rows(cfg, params, [contexts[i] for i in rows],
                           [continuations[i] for i in rows], where)
      for row, value in zip(rows, scored):
        results[row] = value
      if progress is not None:
        progress(len(rows))
  return results


def _score_rows(cfg, params, contexts, continuations, where) -> list[TokenScores]:
  rows = _padded_batch(len(contexts), where.batch_shards)
  sequences = [list(c) + list(t) for c, t in zip(contexts, continuations)]
  length = _bucket(max(len(s) - 1 for s in sequences))
  width = _bucket(max(max(len(t) for t in continuations), 1))
  chunk = _score_chunk(rows, width, cfg.vocab_size)
  tokens = np.full((rows, length), cfg.pad_id, np.int32)
  lengths = np.ones(rows, np.int32)
  target_positions = np.zeros((rows, width), np.int32)
  targets = np.zeros((rows, width), np.int32)
  for r, (seq, ctx, cont) in enumerate(zip(sequences, contexts, continuations)):
    tokens[r, :len(seq) - 1] = seq[:-1]
    lengths[r] = max(len(seq) - 1, 1)
    target_positions[r, :len(cont)] = np.arange(len(ctx) - 1, len(seq) - 1)
    targets[r, :len(cont)] = cont
  placed = where.batch(tokens, lengths, target_positions, targets)
  logprobs, greedy = _score_batch(cfg, params, *placed, chunk=chunk)
  logprobs, greedy = _host(logprobs), _host(greedy)
  return [TokenScores(logprobs[r, :len(cont)].copy(), greedy[r, :len(cont)].copy())
          for r, cont in enumerate(continuations)]


def _score_chunk(rows: int, width: int, vocab_size: int) -> int:
  """Largest power of two dividing `width` whose [rows, chunk, vocab] logits fit the budget."""
  chunk = width & -width  # widths are powers of two or multiples of _LENGTH_STEP
  while chunk > 1 and rows * chunk * vocab_size > _SCORE_LOGITS_BUDGET:
    chunk //= 2
  return chunk


def score(cfg: ModelConfig, params: dict, contexts: Sequence[Sequence[int]],
          continuations: Sequence[Sequence[int]], **kwargs) -> list[float]:
  """For each (context, continuation) pair, sum over the continuation's tokens of
  log p(token | context and the continuation before it): the multiple-choice primitive.
  Keyword arguments as `score_tokens`."""
  return [s.total for s in score_tokens(cfg, params, contexts, continuations, **kwargs)]


def rolling_windows(tokens: Sequence[int], max_length: int, prefix_token_id: int
                    ) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) pairs that score every token of a document exactly once.

  Consecutive disjoint blocks of at most `max_length` tokens, each scored in one pass over an
  input of at most `max_length` tokens: the first after `prefix_token_id`, each later one after
  the tokens before it that fill the input (its last token sees `max_length` tokens of context,
  its first only one).  The windows of lm-evaluation-harness's rolling log-likelihood.
  """
  tokens = list(tokens)
  windows = []
  done = 0
  while done < len(tokens):
    block = min(max_length, len(tokens) - done)
    end = done + block
    context = [prefix_token_id] if done == 0 else tokens[max(end - max_length - 1, 0):done]
    windows.append((context, tokens[done:end]))
    done = end
  return windows


def score_rolling(cfg: ModelConfig, params: dict, documents: Sequence[Sequence[int]], *,
                  max_length: Optional[int] = None, prefix_token_id: Optional[int] = None,
                  **kwargs) -> list[float]:
  """Total log-likelihood of each whole document (token lists, without BOS), scored in
  `rolling_windows` of `max_length` tokens (default: the model's max_positions) after
  `prefix_token_id` (default: BOS).  Perplexity = exp(-total / number of tokens)."""
  max_length = max_length or cfg.max_positions
  if not isinstance(max_length, int) or not 1 <= max_length <= cfg.max_positions:
    raise DecodingError(f"max_length = {max_length!r}; expected 1 .. max_positions "
                        f"({cfg.max_positions})")
  prefix = cfg.bos_id if prefix_token_id is None else prefix_token_id
  windows, owner = [], []
  for d, doc in enumerate(documents):
    for pair in rolling_windows(doc, max_length, prefix):
      windows.append(pair)
      owner.append(d)
  scores = score(cfg, params, [c for c, _ in windows], [t for _, t in windows], **kwargs)
  totals = [0.0] * len(documents)
  for d, value in zip(owner, scores):
    totals[d] += value
  return totals


# ---- shared helpers -------------------------------------------------------------------------------

def _check_token_lists(cfg, lists, what, allow_empty=True) -> list[list[int]]:
  if isinstance(lists, (str, bytes)) or not isinstance(lists, Sequence):
    raise DecodingError(f"{what}s must be a list of token-id lists, got {type(lists).__name__}")
  out = []
  for i, tokens in enumerate(lists):
    if isinstance(tokens, (str, bytes)):
      raise DecodingError(f"{what} {i} is text ({tokens[:30]!r}); expected token ids "
                          f"(encode it with the model's tokenizer)")
    try:
      ids = [int(t) for t in tokens]
    except (TypeError, ValueError) as e:
      raise DecodingError(f"{what} {i}: expected a list of integer token ids ({e})") from None
    if not allow_empty and not ids:
      raise DecodingError(f"{what} {i} is empty; it needs at least one token (e.g. BOS = "
                          f"{cfg.bos_id})")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
      raise DecodingError(f"{what} {i}: token id {bad[0]} is outside the vocabulary "
                          f"[0, {cfg.vocab_size})")
    out.append(ids)
  return out


def _bucket(n: int) -> int:
  """Padded size for n: a power of two (at least 8) up to _LENGTH_STEP, then a multiple of it."""
  if n <= _LENGTH_STEP:
    return max(8, 1 << (n - 1).bit_length())
  return -(-n // _LENGTH_STEP) * _LENGTH_STEP


def _padded_batch(rows: int, shards: int) -> int:
  """Rows rounded up to a power of two and to a multiple of the batch shards."""
  rows = 1 << (rows - 1).bit_length()
  return -(-rows // shards) * shards


class _Placement:
  """Where a call's arrays live: one device, or `mesh` with `rules` (params by their logical
  axes, batches split along the batch axis)."""

  def __init__(self, cfg, mesh, rules):
    self.cfg, self.mesh = cfg, mesh
    self.rules = sharding.logical_axis_rules() if mesh is not None and rules is None else rules

  @property
  def batch_shards(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  @contextlib.contextmanager
  def active(self):
    """Activation sharding constraints follow the rules inside this context."""
    if self.mesh is None:
      yield
    else:
      with sharding.activate(self.mesh, self.rules):
        yield

  def params(self, params: dict) -> dict:
    if self.mesh is None:
      return params
    shardings = sharding.tree_shardings(models.logical_axes(self.cfg), params, self.mesh,
                                        self.rules)
    return jax.device_put(params, shardings)

  def batch(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    if self.mesh is None:
      return tuple(jnp.asarray(a) for a in arrays)
    return tuple(self.place(a, NamedSharding(self.mesh, sharding.logical_to_spec(
        ("activation_batch",) + (None,) * (a.ndim - 1), a.shape, self.mesh, self.rules)))
                 for a in arrays)

  @staticmethod
  def place(array: np.ndarray, where: jax.sharding.Sharding) -> jax.Array:
    """The host array `array` (the same on every process) as a global array with sharding
    `where`: each process puts only its own devices' part."""
    return jax.make_array_from_process_local_data(where, np.asarray(array), array.shape)


def _host(x: jax.Array) -> np.ndarray:
  """A result on the host, whole, on every process (several processes hold only their part)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
