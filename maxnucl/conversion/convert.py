"""Checkpoint conversions between Hugging Face, DeepMind `gemma` and maxnucl, streaming.

    hf_to_maxnucl(hf_dir, ckpt, dtype=None, overwrite=False)      safetensors -> maxnucl
    maxnucl_to_hf(ckpt, hf_dir, max_shard_bytes=..., overwrite=False,
                  ffn_widths_export="refuse", vocab=None)           maxnucl -> safetensors
                                                                    (+ tokenizer files)
    gemma_to_maxnucl(dm_dir, ckpt, cfg, dtype=None, overwrite=False)    DeepMind Orbax -> maxnucl

Each one holds about one tensor in memory at a time (inputs are memory-mapped or read leaf by
leaf; outputs are written as tensors are produced; maxnucl_to_hf also reads up to
READ_AHEAD_BYTES of tensors ahead of the one it writes), checks every expected tensor's presence, shape and
dtype before writing anything, reports unexpected tensors, never modifies its input, and writes
into a temporary sibling of the output that is renamed into place only when complete.  Errors
are `ConversionError`s whose message names the tensor and the file.  Before any work, the output
path is checked (`outputs.check_output_path`): an output that is the input, lies inside it or
contains it (symlinks resolved) is refused with `outputs.OutputPathError`, an existing one
without overwrite=True with FileExistsError.  Inputs and outputs may be URLs (`gs://...`,
`file://...`): a URL output is published by copying, its commit marker last
(`maxnucl.outputs`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from concurrent import futures
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from maxnucl import checkpoints, models, outputs, paths
from maxnucl.conversion import deepmind_gemma, hf_architectures, hf_format, hf_io, hf_tokenizer
from maxnucl.data import vocabularies
from maxnucl.models.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # transformers' default shard size
LM_HEAD = "lm_head.weight"
READ_AHEAD_BYTES = 512 << 20  # maxnucl -> HF: tensors read ahead of the one being written

# Hugging Face configs of Gemma-2 9b written by older converters carry query_pre_attn_scalar =
# 224; the released model (and transformers' own reference) uses 256 = head_dim.
_GEMMA2_9B_SHAPE = {"hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8,
                    "head_dim": 256}
_OLD_9B_SCALAR, _GEMMA2_9B_SCALAR = 224, 256


class ConversionError(ValueError):
  """An input cannot be converted: the message names the tensor/field and the file."""


# ---- Hugging Face -> maxnucl ----------------------------------------------------------------------

def read_hf_config(hf_dir: str | os.PathLike, *, keep_query_pre_attn_scalar: bool = False
                   ) -> tuple[ModelConfig, dict[str, Any]]:
  """(ModelConfig, the config.json dict) of a Hugging Face directory of one of the architectures
  in `hf_architectures` (detected from config.json's architectures / model_type).

  A 9b-shaped config (hidden 3584, 16 query / 8 kv heads, head_dim 256; any depth) with
  query_pre_attn_scalar 224 was written by an older converter: it is corrected to 256 with a
  warning unless `keep_query_pre_attn_scalar`.
  """
  path = paths.as_path(hf_dir) / "config.json"
  if not path.exists():
    raise ConversionError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
  try:
    hf = json.loads(path.read_bytes().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ConversionError(f"{path}: a JSON {type(hf).__name__}; expected an object of fields")
  if (not keep_query_pre_attn_scalar and hf.get("query_pre_attn_scalar") == _OLD_9B_SCALAR
      and all(hf.get(k) == v for k, v in _GEMMA2_9B_SHAPE.items())):
    log.warning("%s: query_pre_attn_scalar is %d for a Gemma-2 9b-shaped model; using %d "
                "(older converters wrote 224; pass --keep_query_pre_attn_scalar to keep it)",
                path, _OLD_9B_SCALAR, _GEMMA2_9B_SCALAR)
    hf = {**hf, "query_pre_attn_scalar": _GEMMA2_9B_SCALAR}
  try:
    spec = hf_architectures.detect(hf)
    return spec.config_from_hf(hf, paths.as_path(hf_dir).name), hf
  except (KeyError, ValueError) as e:
    message = str(e.args[0] if e.args else e)
    raise ConversionError(f"{path}: {message.removeprefix('config.json: ')}") from None


def hf_to_maxnucl(hf_dir: str | os.PathLike, output: str | os.PathLike, *,
                  dtype: Optional[str] = None, overwrite: bool = False,
                  keep_query_pre_attn_scalar: bool = False) -> ModelConfig:
  """Convert a Hugging Face directory (config.json + safetensors) of Gemma-2, Gemma-3 (text),
  Llama, Mistral or Qwen2 (`hf_architectures`) to a maxnucl checkpoint.

  dtype: stored dtype of the output ("float32" / "bfloat16"); default: the embedding's dtype.
  The output config's param_dtype is the stored dtype.
  """
  outputs.check_output_path(output, {"Hugging Face input directory": hf_dir},
                            overwrite=overwrite)
  cfg, hf = read_hf_config(hf_dir, keep_query_pre_attn_scalar=keep_query_pre_attn_scalar)
  reader = _guard(lambda: hf_io.SafetensorsReader(hf_dir))
  spec = check_declared_model(hf_dir, cfg, hf, reader)
  mapping = spec.tensor_map(cfg)
  expected = {hf_name: _shape_after(to_hf, shape, cfg)
              for (path, (hf_name, _, to_hf)), shape in zip(
                  mapping.items(), _maxnucl_shapes(cfg, mapping))}
  config_json = paths.as_path(hf_dir) / "config.json"
  for name, shape in expected.items():
    if name not in reader:
      raise ConversionError(f"{hf_dir}: tensor {name} is missing (expected shape {shape} from "
                            f"{config_json.name}; files: "
                            f"{sorted({p.name for p, *_ in reader.entries.values()})})")
    _check_tensor(name, reader.file(name), reader.shape(name), shape, reader.dtype(name),
                  source=config_json.name)
  unexpected = sorted(set(reader.names()) - set(expected) - ({LM_HEAD} if cfg.tie_embeddings
                                                              else set()))
  if unexpected:
    raise ConversionError(
        f"{reader.file(unexpected[0])}: unexpected tensor(s) {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''}, not part of the {spec.architecture} model "
        f"described by config.json")
  embedding = mapping[("embedder", "embedding")][0]
  if cfg.tie_embeddings and LM_HEAD in reader:
    _check_tied(reader, embedding)
  dtype = dtype or reader.dtype(embedding).name
  _check_dtype(dtype)
  cfg = cfg.replace(param_dtype=dtype)  # the config describes the arrays stored beside it
  tokenizer = hf_tokenizer.hf_tokenizer_files(hf_dir)  # carried in CKPT/tokenizer/
  with checkpoints.StreamingWriter(output, cfg, dtype=dtype, overwrite=overwrite,
                                   tokenizer_files=tokenizer) as writer:
    for path, (hf_name, to_maxnucl, _) in mapping.items():
      array = reader.get(hf_name)
      check_finite(array, f"{reader.file(hf_name)}: tensor {hf_name}")
      array = to_maxnucl(array, cfg)
      _guard(functools.partial(writer.write, path, array), f"{reader.file(hf_name)}: tensor {hf_name}: ")
      del array
  return cfg


def check_declared_model(hf_dir, cfg: ModelConfig, hf: dict[str, Any],
                         reader: hf_io.SafetensorsReader) -> hf_format.HfArchitecture:
  """The architecture config.json declares, checked against what the tensors are before any
  per-layer work: as many layers as num_hidden_layers, and the architecture's own modules
  (Gemma-2's pre/post-feedforward norms, Gemma-3's q/k norms, Qwen2's biases) and no other's."""
  path = paths.as_path(hf_dir) / "config.json"
  spec = hf_architectures.detect(hf)
  layers = {int(name.split(".")[2]) for name in reader.names()
            if name.startswith("model.layers.") and name.split(".")[2].isdigit()}
  if layers != set(range(cfg.num_layers)):
    held = f"layers 0..{max(layers)}" if layers == set(range(len(layers))) and layers else (
        f"layer indices {sorted(layers)[:8]}{' ...' if len(layers) > 8 else ''}")
    raise ConversionError(f"{path}: num_hidden_layers {cfg.num_layers}, but the safetensors "
                          f"files hold {len(layers)} layer(s) ({held})")
  mismatch = hf_architectures.declared_mismatch(spec, cfg, reader.names())
  if mismatch:
    raise ConversionError(f"{path}: {mismatch}")
  return spec


def _check_tied(reader: hf_io.SafetensorsReader, embedding: str, rows: int = 8192) -> None:
  """lm_head.weight, when stored, must equal the embedding (config.json ties them)."""
  head, table = reader.get(LM_HEAD), reader.get(embedding)
  if head.shape != table.shape:
    raise ConversionError(f"{reader.file(LM_HEAD)}: tensor {LM_HEAD} has shape {head.shape}, "
                          f"but config.json ties it to {embedding} {table.shape}")
  for start in range(0, head.shape[0], rows):  # block by block: both may be large
    if not np.array_equal(head[start:start + rows], table[start:start + rows]):
      raise ConversionError(
          f"{reader.file(LM_HEAD)}: tensor {LM_HEAD} differs from {embedding} (first differing "
          f"rows from {start}); config.json ties the output projection to the embedding "
          f"(tie_word_embeddings), so an untied lm_head cannot be represented")


# ---- maxnucl -> Hugging Face ----------------------------------------------------------------------

def maxnucl_to_hf(ckpt: str | os.PathLike, output: str | os.PathLike, *,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                  ffn_widths_export: str = "refuse", vocab: Optional[str] = None
                  ) -> list[paths.Path]:
  """Write a maxnucl checkpoint as a Hugging Face directory (config.json + safetensors) of the
  architecture that holds it (`hf_architectures.for_model`: Gemma-2, Gemma-3, Qwen2, Mistral or
  Llama).

  ckpt: a checkpoint or a training workdir (its latest step, `checkpoints.resolve`).
  vocab: the model's vocabulary, 'byte' or a SentencePiece model file: its Hugging Face
  tokenizer files are written too (`hf_tokenizer.tokenizer_files`; AutoTokenizer then encodes as
  maxnucl's tokenizer does); None: no tokenizer.
  ffn_widths_export: how a model whose layers' FFN widths differ (or include 0, a pruned model)
  is written, `hf_format.FFN_WIDTHS_EXPORTS`: "refuse" (the default: an error naming the other
  two), "pad" (every layer zero-padded to the widest width: a plain model of the architecture,
  computing the same function) or "custom_code" (each layer at its width, with model code in the directory:
  AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)).  A model whose layers share
  one nonzero width is a plain model in every mode.  Returns the safetensors files written.
  """
  output = outputs.check_output_path(output, maxnucl_to_hf_inputs(ckpt, vocab),
                                     overwrite=overwrite)
  ckpt = checkpoints.resolve(ckpt)
  cfg = checkpoints.load_config(ckpt)
  tokenizer = {} if vocab is None else _tokenizer_files(vocab, cfg)
  stored = checkpoints.stored_arrays(ckpt)
  dtypes = {dtype for _, dtype in stored.values()}
  if len(dtypes) != 1 or not dtypes <= set(DTYPES):
    raise ConversionError(f"{ckpt}: stored dtypes {sorted(dtypes)}; expected one of {DTYPES} "
                          f"for every tensor")
  (dtype,) = dtypes
  try:
    spec = hf_architectures.for_model(cfg)
    export = hf_format.hf_export(spec, cfg, torch_dtype=dtype,
                                 ffn_widths_export=ffn_widths_export)
  except ValueError as e:
    raise ConversionError(f"{ckpt}: {e}") from None
  sources = _export_sources(ckpt, cfg, spec, stored)

  # The tensors written are those of export.cfg: the checkpoint's own, or, zero-padded, wider
  # FFN tensors and those of FFN-less layers ("pad").
  np_dtype = np.dtype(checkpoints.NP_DTYPES[dtype])
  written = spec.tensor_map(export.cfg)
  specs = [(hf_name, _shape_after(to_hf, shape, export.cfg), np_dtype)
           for (hf_name, _, to_hf), shape in zip(written.values(),
                                                 _maxnucl_shapes(export.cfg, written))]
  shapes = {name: shape for name, shape, _ in specs}

  def hf_tensor(hf_name):  # = to_hf(array), with the transpose done by TensorStore while reading
    if hf_name not in sources:  # "pad": a tensor of a layer without FFN
      return np.zeros(shapes[hf_name], np_dtype)
    path, shape = sources[hf_name]
    array = checkpoints.read_array(ckpt, path, axes=hf_format.hf_axes(path)).reshape(shape)
    return _zero_padded(array, shapes[hf_name])

  # hf_io asks for the tensors in `specs` order; the next ones are read (and transposed) in a
  # background thread while this one is written
  tensors = _prefetched(hf_tensor, [name for name, _, _ in specs],
                        [int(np.prod(shape)) * dtype.itemsize for _, shape, dtype in specs],
                        READ_AHEAD_BYTES)

  def get_tensor(hf_name):
    name, array = next(tensors)
    assert name == hf_name, (name, hf_name)
    return array

  with outputs.TemporaryOutput(output, overwrite) as tmp:
    (tmp / "config.json").write_text(json.dumps(export.config, indent=2))
    for name, text in export.files.items():
      (tmp / name).write_text(text)
    for name, content in tokenizer.items():
      (tmp / name).write_bytes(content)
    files = hf_io.write_sharded(tmp, specs, get_tensor, max_shard_bytes)
  return [output / f.name for f in files]


def _export_sources(ckpt, cfg: ModelConfig, spec, stored: dict) -> dict[str, tuple]:
  """HF name -> (maxnucl path, its shape in HF layout) of every tensor the architecture's map
  names, each checked against the stored arrays (present, the config's shape; no other array)."""
  mapping = spec.tensor_map(cfg)
  sources = {}
  for (path, (hf_name, _, to_hf)), shape in zip(mapping.items(), _maxnucl_shapes(cfg, mapping)):
    if path not in stored:
      raise ConversionError(f"{ckpt}: tensor {'/'.join(path)} is missing")
    if tuple(stored[path][0]) != shape:
      raise ConversionError(f"{ckpt}: tensor {'/'.join(path)} has shape "
                            f"{tuple(stored[path][0])}, expected {shape} from the model config")
    sources[hf_name] = (path, _shape_after(to_hf, shape, cfg))
  unexpected = sorted("/".join(k) for k in stored if k not in mapping)
  if unexpected:
    raise ConversionError(f"{ckpt}: unexpected tensor(s) {unexpected[:5]} for model {cfg.name!r}")
  return sources


def maxnucl_to_hf_inputs(ckpt: str | os.PathLike, vocab: Optional[str]) -> dict[str, Any]:
  """What maxnucl_to_hf reads, for `outputs.check_output_path`."""
  model_file = vocab not in (None, vocabularies.BYTE_VOCAB_NAME)
  return {"input checkpoint": ckpt, "--vocab file": vocab if model_file else None}


def _tokenizer_files(vocab: str, cfg: ModelConfig) -> dict[str, bytes]:
  """The Hugging Face tokenizer files of `vocab`, checked against the model: every id has an
  embedding, and pad, eos and bos are the ids config.json declares (except for a tokenizer.json,
  exported as its source wrote it: e.g. Llama-3's config.json lists several eos ids)."""
  try:
    tokenizer = vocabularies.get_tokenizer(vocab)
    files = hf_tokenizer.tokenizer_files(vocab, model_max_length=cfg.max_positions)
  except (ValueError, OSError) as e:
    raise ConversionError(f"--vocab {vocab}: {e}") from None
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConversionError(f"--vocab {vocab}: {tokenizer.vocab_size} tokens, but model "
                          f"{cfg.name!r} has only {cfg.vocab_size} embeddings")
  roles = ("pad", "eos", "bos") if vocabularies.hf_tokenizer_json(vocab) is None else ()
  for role in roles:
    ids = getattr(tokenizer, f"{role}_id"), getattr(cfg, f"{role}_id")
    if ids[0] != ids[1]:
      raise ConversionError(f"--vocab {vocab}: {role} id {ids[0]}, but model {cfg.name!r} "
                            f"declares {role}_id {ids[1]}")
  return files


# ---- DeepMind gemma -> maxnucl --------------------------------------------------------------------

def gemma_to_maxnucl(dm_dir: str | os.PathLike, output: str | os.PathLike, cfg: ModelConfig, *,
                     dtype: Optional[str] = None, overwrite: bool = False,
                     gating_layout: Optional[str] = None) -> ModelConfig:
  """Convert a DeepMind `gemma` Orbax checkpoint (flat or nested layout, `deepmind_gemma`) to
  maxnucl, for the model `cfg`.

  dm_dir: the checkpoint, or DeepMind's download folder holding it as its one subfolder; a
  tokenizer.model in dm_dir is carried into the output's tokenizer/.
  cfg: e.g. `models.get_config("gemma2_9b")` (its vocab_size decides how many embedding rows are
  kept; the rest are padding; the checkpoint does not store query_pre_attn_scalar).
  gating_layout: "dm" (2, d, m) or "md" (2, m, d), only consulted when d == m makes the shape
  ambiguous.  dtype: default as stored; the output config's param_dtype is the stored dtype.
  """
  outputs.check_output_path(output, {"DeepMind input checkpoint": dm_dir}, overwrite=overwrite)
  checkpoint, tokenizer = _guard(lambda: deepmind_gemma.find_checkpoint(dm_dir))
  stored = _guard(lambda: checkpoints.pytree_arrays(checkpoint),
                  f"{checkpoint}: not a readable Orbax checkpoint: ")
  layout, keys = _guard(lambda: deepmind_gemma.stored_keys(stored), f"{checkpoint}: ")
  shapes = {key: stored[path][0] for key, path in keys.items()}
  mismatch = deepmind_gemma.size_mismatch(deepmind_gemma.checkpoint_sizes(shapes), cfg)
  if mismatch:
    raise ConversionError(f"{checkpoint}: {mismatch}")
  layouts = _gating_layouts(checkpoint, shapes, cfg, gating_layout)
  expected = deepmind_gemma.expected_shapes(cfg, layouts)
  _check_deepmind_tensors(checkpoint, layout, keys, stored, expected, cfg)
  dtype = dtype or stored[keys[("transformer/embedder", "input_embedding")]][1]
  _check_dtype(dtype)
  cfg = cfg.replace(param_dtype=dtype)  # the config describes the arrays stored beside it
  files = {} if tokenizer is None else _deepmind_tokenizer(tokenizer, cfg)
  cache: dict[tuple[str, str], np.ndarray] = {}  # kv, qkv and gating feed several leaves each
  with checkpoints.StreamingWriter(output, cfg, dtype=dtype, overwrite=overwrite,
                                   tokenizer_files=files) as writer:
    for path, (key, to_maxnucl) in deepmind_gemma.tensor_map(cfg, layouts).items():
      if key not in cache:
        cache.clear()
        cache[key] = checkpoints.read_pytree_array(checkpoint, keys[key])
      array = to_maxnucl(cache[key], cfg)
      _guard(functools.partial(writer.write, path, array),
             f"{checkpoint}: tensor {deepmind_gemma.stored_name(key, layout)}: ")
  return cfg


def _gating_layouts(checkpoint, shapes, cfg: ModelConfig, fallback: Optional[str]
                    ) -> dict[int, str]:
  layouts = {}
  for i, m in enumerate(cfg.layer_ffn_widths):
    key = (f"transformer/layer_{i}/mlp/gating_einsum", "w")
    if m and key in shapes:
      layouts[i] = _guard(lambda: deepmind_gemma.gating_layout_of(
          shapes[key], cfg, i, fallback), f"{checkpoint}: ")
    else:
      layouts[i] = deepmind_gemma.default_gating_layout(cfg)
  return layouts


def _check_deepmind_tensors(checkpoint, layout: str, keys: dict, stored: dict, expected: dict,
                            cfg: ModelConfig) -> None:
  """Every expected tensor present with its shape and a float dtype, and no other."""
  for key, shape in expected.items():
    name = deepmind_gemma.stored_name(key, layout)
    if key not in keys:
      raise ConversionError(f"{checkpoint}: tensor {name} is missing (expected shape "
                            f"{tuple(s if s else 'V' for s in shape)})")
    actual, actual_dtype = stored[keys[key]]
    if shape[0] is None:  # the padded embedding: at least vocab_size rows
      if len(actual) != 2 or actual[1] != shape[1] or actual[0] < cfg.vocab_size:
        raise ConversionError(f"{checkpoint}: tensor {name} has shape {actual}, expected "
                              f"(>= {cfg.vocab_size}, {shape[1]}) for vocab_size "
                              f"{cfg.vocab_size} (use --vocab_size / the right --size)")
      continue
    _check_tensor(name, checkpoint, actual, shape, np.dtype(actual_dtype))
  unexpected = sorted(deepmind_gemma.stored_name(k, layout) for k in keys if k not in expected)
  if unexpected:
    raise ConversionError(f"{checkpoint}: unexpected tensor(s) {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''} for model {cfg.name!r} "
                          f"({cfg.num_layers} layers)")


def _deepmind_tokenizer(path, cfg: ModelConfig) -> dict[str, bytes]:
  """The download's tokenizer.model, checked: a SentencePiece model with no more ids than the
  model has embeddings."""
  try:
    tokenizer = vocabularies.get_tokenizer(str(path))
  except (ValueError, OSError, RuntimeError) as e:
    raise ConversionError(f"{path}: not a SentencePiece model ({e})") from None
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConversionError(f"{path}: {tokenizer.vocab_size} tokens, but model {cfg.name!r} has "
                          f"only {cfg.vocab_size} embeddings")
  return {deepmind_gemma.TOKENIZER: paths.as_path(path).read_bytes()}


# ---- helpers --------------------------------------------------------------------------------------

def _maxnucl_shapes(cfg: ModelConfig, mapping) -> list[tuple[int, ...]]:
  abstract = models.abstract_params(cfg)
  shapes = []
  for path in mapping:
    node = abstract
    for key in path:
      node = node[key]
    shapes.append(tuple(node.shape))
  return shapes


def _shape_after(transform: Callable, shape: tuple[int, ...], cfg: ModelConfig
                 ) -> tuple[int, ...]:
  """The shape `transform(array of shape, cfg)` has, computed without allocating."""
  return tuple(jax.eval_shape(lambda x: transform(x, cfg),
                              jax.ShapeDtypeStruct(shape, np.float32)).shape)


def _zero_padded(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """`array` in the leading corner of zeros of `shape`: a padded FFN's extra neurons are zero
  rows of gate_proj, up_proj (m, d) and zero columns of down_proj (d, m), so
  down(gelu_tanh(0) * 0) adds nothing and the function is unchanged."""
  if array.shape == tuple(shape):
    return array
  out = np.zeros(shape, array.dtype)
  out[tuple(slice(0, n) for n in array.shape)] = array
  return out


def _check_tensor(name: str, file, shape, expected_shape, dtype,
                  source: str = "the model config") -> None:
  if tuple(shape) != tuple(expected_shape):
    raise ConversionError(f"{file}: tensor {name} has shape {tuple(shape)}, expected "
                          f"{tuple(expected_shape)} from {source}")
  if np.dtype(dtype).name not in ("float32", "bfloat16", "float16", "float64"):
    raise ConversionError(f"{file}: tensor {name} has dtype {np.dtype(dtype).name}; expected "
                          f"a floating-point dtype")


def check_finite(array: np.ndarray, where: str, block: int = 1 << 24) -> None:
  """Refuse NaN or infinite weights (a damaged file; the checkpoint readers refuse them too),
  unless $MAXNUCL_ALLOW_NONFINITE=1 (checkpoints.ALLOW_NONFINITE_ENV, for debugging).  Scanned in
  blocks: no tensor-sized temporary."""
  if os.environ.get("MAXNUCL_ALLOW_NONFINITE", "") not in ("", "0"):
    return
  flat = array.reshape(-1)
  bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + block])))
            for i in range(0, flat.size, block))
  if bad:
    raise ConversionError(f"{where} holds {bad} non-finite value(s) (NaN or inf); expected "
                          f"finite weights (MAXNUCL_ALLOW_NONFINITE=1 converts them anyway, for "
                          f"debugging)")


def _check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ConversionError(f"output dtype {dtype!r}; expected one of {DTYPES}")


def _guard(fn: Callable[[], Any], prefix: str = "") -> Any:
  """Run fn, turning library errors into ConversionErrors (message prefixed with the source).
  A write that failed for lack of space is raised as it is: it names the output file, and is
  no fault of the source."""
  try:
    return fn()
  except (hf_io.SafetensorsError, checkpoints.CheckpointError, ValueError, OSError) as e:
    if isinstance(e, (ConversionError, FileExistsError)) or outputs.write_failure(e):
      raise
    raise ConversionError(f"{prefix}{e}") from e


def _prefetched(fn: Callable[[Any], Any], items: list, sizes: list[int],
                read_ahead_bytes: int) -> Iterator[tuple[Any, Any]]:
  """(item, fn(item)) in order; a thread computes the next items meanwhile, as many as fit in
  `read_ahead_bytes` (at least one), so memory stays below the current item + that budget."""
  with futures.ThreadPoolExecutor(1) as pool:
    pending: list[futures.Future] = []
    submitted = ahead = 0
    for i, item in enumerate(items):
      while submitted < len(items) and (submitted <= i or
                                        ahead + sizes[submitted] <= read_ahead_bytes):
        pending.append(pool.submit(fn, items[submitted]))
        ahead += sizes[submitted] if submitted > i else 0
        submitted += 1
      result = pending.pop(0).result()
      if i + 1 < submitted:
        ahead -= sizes[i + 1]  # the next item becomes the current one
      yield item, result
      del result
