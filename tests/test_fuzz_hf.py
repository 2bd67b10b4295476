"""A seeded mutation fuzz of the Hugging Face reader (safetensors + config.json, through
`maxnucl-convert hf-to-maxnucl`) and of the GGUF reader (`maxnucl-convert gguf-to-maxnucl`), run
in-process (issue 28, item 9; tests/fuzzing.py classifies each outcome).

Specifies: every mutant of a tiny export is either ACCEPTED validly or REFUSED with exit 2 and
one line naming the mutated file; never a traceback, a hang, a modified input or a partial
output.  Valid means the reference readers agree:
  - Hugging Face: `safetensors.safe_open` reads every tensor of the mutant, transformers'
    config class (AutoConfig) reads its config.json as the model_type that was converted, the
    checkpoint's ModelConfig is the one transformers' fully populated config
    describes, and every stored array is what safetensors reads, in maxnucl's layout, bit for bit;
  - GGUF: `gguf.GGUFReader` reads the mutant, the checkpoint's config differs from the original's
    only in fields whose metadata the mutant changed, and every stored array equals the
    original's unless the mutant changed that tensor's bytes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import shutil
import struct

import gguf
import numpy as np
import pytest
import safetensors
import transformers

import fuzzing
import gguf_files
from hf_reference import tiny_hf_gemma2
from maxnucl import checkpoints
from maxnucl.conversion import cli, hf_architectures

SEED = 28
TIMEOUT_S = 60.0
ST = "model.safetensors"
CONFIG = "config.json"


# ---- the Hugging Face input ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma2_export(tmp_path_factory) -> pathlib.Path:
  """A tiny random transformers Gemma-2 (2 layers, float32) as save_pretrained writes it."""
  path = tmp_path_factory.mktemp("fuzz_hf") / "export"
  tiny_hf_gemma2(seed=3, num_hidden_layers=2).save_pretrained(path)
  (path / "generation_config.json").unlink(missing_ok=True)
  return path


def split_safetensors(data: bytes) -> tuple[int, dict, bytes]:
  (length,) = struct.unpack("<Q", data[:8])
  return length, json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header, body: bytes, text: str | None = None) -> bytes:
  encoded = (text if text is not None else json.dumps(header)).encode()
  encoded += b" " * (-len(encoded) % 8)
  return struct.pack("<Q", len(encoded)) + encoded + body


# The config.json fields the converters read (others, e.g. initializer_range, are not read).
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_activation",
                 "max_position_embeddings", "rms_norm_eps", "pad_token_id", "eos_token_id",
                 "bos_token_id", "tie_word_embeddings", "rope_parameters", "attention_bias",
                 "query_pre_attn_scalar", "sliding_window", "layer_types",
                 "final_logit_softcapping", "attn_logit_softcapping",
                 "use_bidirectional_attention", "architectures", "model_type")
DECLARED = ("gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral", "qwen2",
            "gemma2_ffn_widths", "llama_ffn_widths")
CLASSES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM",
           "MistralForCausalLM", "Qwen2ForCausalLM")


def hf_mutants(export: pathlib.Path, rng: np.random.Generator):
  """(name, {file name: mutated bytes}) pairs: about 300 mutants of the export."""
  data = (export / ST).read_bytes()
  length, header, body = split_safetensors(data)
  config = json.loads((export / CONFIG).read_text())
  tensors = [k for k in header if k != "__metadata__"]

  # the header's bytes and its length field
  for name, mutant in fuzzing.byte_mutants(data, rng, 60, region=(8, 8 + length)):
    yield f"header_bytes/{name}", {ST: mutant}
  for name, mutant in fuzzing.byte_mutants(data, rng, 10, region=(0, 8)):
    yield f"length_bytes/{name}", {ST: mutant}
  for value in (length - 1, length + 1, length - 8, length + 8, 0, 1, 7, len(data) - 8,
                len(data) - 7, len(data), 2**63, 2**64 - 1, length - 2, length + 2):
    yield f"length={value}", {ST: struct.pack("<Q", value) + data[8:]}

  # the header's fields: dtypes, shapes, offsets, metadata
  for name, mutant in fuzzing.json_mutants(header, rng, 70):
    yield f"header_field/{name}", {ST: join_safetensors(mutant, body)}
  for i in range(16):
    mutant = copy.deepcopy(header)
    tensor = tensors[int(rng.integers(len(tensors)))]
    mutant[tensor]["dtype"] = str(rng.choice(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL",
                                              "F8_E4M3", "f32", "", "F32 "]))
    yield f"dtype/{i}:{tensor}={mutant[tensor]['dtype']}", {ST: join_safetensors(mutant, body)}
  for i in range(10):  # offsets moved: swapped between tensors, shifted, overlapping
    mutant = copy.deepcopy(header)
    a, b = (tensors[int(j)] for j in rng.choice(len(tensors), 2, replace=False))
    op = ("swap", "shift_all", "overlap", "gap")[i % 4]
    if op == "swap":
      mutant[a]["data_offsets"], mutant[b]["data_offsets"] = (header[b]["data_offsets"],
                                                              header[a]["data_offsets"])
    elif op == "shift_all":
      for t in tensors:
        mutant[t]["data_offsets"] = [o + 4 for o in header[t]["data_offsets"]]
      body_ = b"\0" * 4 + body
      yield f"offsets/{i}:{op}", {ST: join_safetensors(mutant, body_)}
      continue
    elif op == "overlap":
      begin, end = header[a]["data_offsets"]
      mutant[a]["data_offsets"] = [begin - 4 if begin else begin + 4, end - 4 if begin else end + 4]
    else:
      mutant[a]["data_offsets"] = [o + 4 for o in header[a]["data_offsets"]]
    yield f"offsets/{i}:{op}:{a}", {ST: join_safetensors(mutant, body)}

  # truncated or extended data
  for i in range(8):
    cut = int(rng.integers(8 + length, len(data)))
    yield f"truncate/{i}@{cut}", {ST: data[:cut]}
  yield "append/1", {ST: data + b"\0"}
  yield "append/8", {ST: data + b"\0" * 8}

  # dropped, renamed, duplicated or added tensors
  for i in range(5):
    tensor = tensors[int(rng.integers(len(tensors)))]
    mutant = {k: v for k, v in header.items() if k != tensor}
    yield f"drop_entry/{i}:{tensor}", {ST: join_safetensors(mutant, body)}
    yield f"drop_tensor/{i}:{tensor}", {ST: without_tensor(header, body, tensor)}
    renamed = {(k + ".x" if k == tensor else k): v for k, v in header.items()}
    yield f"rename/{i}:{tensor}", {ST: join_safetensors(renamed, body)}
  text = json.dumps(header)
  first = json.dumps({tensors[0]: header[tensors[0]]})[1:-1]
  yield "duplicate_key", {ST: join_safetensors(None, body, text[:-1] + ", " + first + "}")}
  yield "header_not_object", {ST: join_safetensors(list(header.items()), body)}

  # config.json
  fields = [(k,) for k in CONFIG_FIELDS if k in config] + [
      p for p in fuzzing.json_paths(config) if len(p) > 1 and p[0] in CONFIG_FIELDS]
  for name, mutant in fuzzing.json_mutants(config, rng, 80, fields):
    yield f"config/{name}", {CONFIG: fuzzing.dumps(mutant).encode()}
  yield "config/not_json", {CONFIG: b"{\"vocab_size\": "}
  yield "config/not_object", {CONFIG: b"[1, 2]"}

  # the declared architecture
  for model_type in DECLARED:
    yield f"arch/model_type={model_type}", {CONFIG: json.dumps(
        {**config, "model_type": model_type}).encode()}
    yield f"arch/model_type={model_type},no_architectures", {CONFIG: json.dumps(
        {**{k: v for k, v in config.items() if k != "architectures"},
         "model_type": model_type}).encode()}
  for architecture in CLASSES:
    yield f"arch/architectures={architecture}", {CONFIG: json.dumps(
        {**config, "architectures": [architecture]}).encode()}
    spec = hf_architectures.BY_NAME.get(architecture)
    if spec is not None:  # both fields declaring it, consistently
      yield f"arch/both={architecture}", {CONFIG: json.dumps(
          {**config, "architectures": [architecture], "model_type": spec.model_type}).encode()}


def without_tensor(header: dict, body: bytes, tensor: str) -> bytes:
  """A well-formed safetensors file of the same tensors but `tensor`."""
  out, parts, offset = {"__metadata__": header.get("__metadata__", {})}, [], 0
  for name, info in header.items():
    if name in ("__metadata__", tensor):
      continue
    begin, end = info["data_offsets"]
    out[name] = {**info, "data_offsets": [offset, offset + end - begin]}
    parts.append(body[begin:end])
    offset += end - begin
  return join_safetensors(out, b"".join(parts))


def hf_valid(directory: pathlib.Path, ckpt: pathlib.Path):
  """None when the accepted mutant reads the same through the reference readers, else why
  not."""
  try:
    with safetensors.safe_open(directory / ST, framework="pt") as f:
      tensors = {name: f.get_tensor(name).float().numpy() for name in f.keys()}
  except Exception as e:  # noqa: BLE001 - any refusal of the reference
    return f"safetensors refuses it: {str(e)[:100]}"
  try:
    config = transformers.AutoConfig.from_pretrained(directory)
  except Exception as e:  # noqa: BLE001
    return f"transformers refuses config.json: {str(e).splitlines()[0][:100]}"
  cfg = checkpoints.load_config(ckpt)
  if implausible(cfg):
    return f"accepted an implausible config: {implausible(cfg)}"
  spec = hf_architectures.detect(config.to_dict())
  if config.model_type != spec.model_type:  # transformers builds the model of its model_type
    return f"transformers reads a {config.model_type!r} model, converted as {spec.architecture}"
  expected = spec.config_from_hf(config.to_dict(), cfg.name)
  if cfg != expected:
    diff = {f.name: (getattr(cfg, f.name), getattr(expected, f.name))
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expected, f.name)}
    return f"config differs from transformers' reading: {diff}"
  for path, (hf_name, to_maxnucl, _) in spec.tensor_map(cfg).items():
    want = to_maxnucl(tensors[hf_name], cfg)
    got = np.asarray(checkpoints.read_array(ckpt, path), np.float32)
    if not np.array_equal(got, want, equal_nan=True):
      return f"tensor {hf_name} differs from what safetensors reads"
  return None


def implausible(cfg) -> str | None:
  """Why a converted ModelConfig cannot describe a working model (None when it can): a
  non-finite or non-positive size, base, epsilon or cap (the issue's NaN logits)."""
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "max_positions", "rope_theta", "norm_eps", "query_pre_attn_scalar",
                "attn_logit_softcap", "final_logit_softcap", "sliding_window",
                "rope_local_theta"):
    value = getattr(cfg, field)
    if value is not None and not (np.isfinite(value) and value > 0):
      return f"{field} = {value!r}"
  if not all(0 <= getattr(cfg, f"{role}_id") for role in ("pad", "eos", "bos")):
    return "a negative special token id"
  return None


def run_mutant(main_argv, directory, output, names, valid):
  """(outcome, detail) of `maxnucl-convert MAIN_ARGV` on the mutant `directory` (tests/fuzzing.py)."""
  before = fuzzing.tree_digest(directory)
  run = fuzzing.run_main(cli.main, main_argv, TIMEOUT_S)
  return fuzzing.classify(run, names, before, fuzzing.tree_digest(directory), output,
                          lambda: valid(directory, output))


def test_hf_to_maxnucl_mutants_are_converted_validly_or_refused_in_one_line(gemma2_export,
                                                                          tmp_path):
  rng = np.random.default_rng(SEED)
  tally = fuzzing.Tally("hf-to-maxnucl (safetensors + config.json)")
  for i, (name, files) in enumerate(hf_mutants(gemma2_export, rng)):
    directory, output = tmp_path / f"m{i}", tmp_path / f"out{i}"
    shutil.copytree(gemma2_export, directory)
    for file, content in files.items():
      (directory / file).write_bytes(content)
    outcome, detail = run_mutant(
        ["hf-to-maxnucl", "--input", str(directory), "--output", str(output)],
        directory, output, list(files), hf_valid)
    tally.add(name, outcome, detail)
    shutil.rmtree(directory)
    shutil.rmtree(output, ignore_errors=True)
  assert tally.counts[fuzzing.ACCEPTED] > 0 and tally.counts[fuzzing.REFUSED] > 0
  tally.assert_clean()


# ---- the GGUF input ------------------------------------------------------------------------------

GGUF_SHAPE = gguf_files.Shape("llama", vocab=64, d=64, layers=1, heads=2, kv_heads=1,
                              head_dim=32, ffn=64, untied=False)
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(a tiny Llama GGUF in F16 and Q8_0, its conversion)."""
  root = tmp_path_factory.mktemp("fuzz_gguf")
  gguf_files.write_gguf(root / "tiny.gguf", GGUF_SHAPE, types=(Q.F16, Q.Q8_0, Q.F32))
  assert cli.main(["gguf-to-maxnucl", "--input", str(root / "tiny.gguf"), "--output",
                   str(root / "ckpt")]) == 0
  return root / "tiny.gguf", root / "ckpt"


# GGUF metadata key (without the architecture prefix) -> the ModelConfig fields it decides
GGUF_FIELDS = {
    "general.architecture": None,  # anything may change
    "embedding_length": ("d_model", "head_dim"), "block_count": ("num_layers",),
    "attention.head_count": ("num_heads", "head_dim"), "attention.head_count_kv": ("num_kv_heads",),
    "attention.key_length": ("head_dim",), "rope.dimension_count": (),
    "feed_forward_length": ("ffn_dim", "ffn_widths"), "context_length": ("max_positions",),
    "rope.freq_base": ("rope_theta",), "attention.layer_norm_rms_epsilon": ("norm_eps",),
    "tokenizer.ggml.bos_token_id": ("bos_id",), "tokenizer.ggml.eos_token_id": ("eos_id",),
    "tokenizer.ggml.padding_token_id": ("pad_id",), "general.name": (), "vocab_size": (),
}


def gguf_contents(reader: gguf.GGUFReader) -> dict:
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = repr(field.contents())
    except Exception:  # noqa: BLE001
      out[key] = "?"
  return out


def gguf_valid(original: pathlib.Path, reference_ckpt: pathlib.Path):
  """valid(mutant, ckpt) for an accepted GGUF mutant: None when the reference reader reads it and
  the checkpoint differs from the original's only where the mutant's metadata or tensor bytes
  do, else why not."""
  before_reader = gguf.GGUFReader(original)
  before_fields = gguf_contents(before_reader)
  before_tensors = {t.name: bytes(t.data.tobytes()) for t in before_reader.tensors}
  reference_cfg = checkpoints.load_config(reference_ckpt)
  arch = GGUF_SHAPE.arch

  def valid(path: pathlib.Path, ckpt: pathlib.Path):
    try:
      reader = gguf.GGUFReader(path)
      tensors = {t.name: bytes(t.data.tobytes()) for t in reader.tensors}
    except Exception as e:  # noqa: BLE001 - any refusal of the reference
      return f"gguf.GGUFReader refuses it: {str(e)[:100]}"
    changed = {k for k in set(before_fields) | set(gguf_contents(reader))
               if before_fields.get(k) != gguf_contents(reader).get(k)}
    allowed = set()
    for key in changed:
      short = key.removeprefix(f"{arch}.")
      fields = GGUF_FIELDS.get(short, GGUF_FIELDS.get(key, ()))
      allowed |= {f.name for f in dataclasses.fields(reference_cfg)} if fields is None else set(
          fields)
    cfg = checkpoints.load_config(ckpt)
    if implausible(cfg):
      return f"accepted an implausible config: {implausible(cfg)}"
    diff = {f.name for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(reference_cfg, f.name)} - {"name"}
    if diff - allowed:
      return f"config fields {sorted(diff - allowed)} changed, metadata changed: {sorted(changed)}"
    if diff or set(tensors) != set(before_tensors):
      return None  # another model, read as its metadata says: checked against the reference
    for key, array in checkpoints.iter_arrays(reference_ckpt):
      got = checkpoints.read_array(ckpt, key)
      if not np.array_equal(np.asarray(got), np.asarray(array), equal_nan=True):
        if all(tensors[n] == before_tensors[n] for n in tensors):
          return f"tensor {'/'.join(key)} changed although no tensor's bytes did"
    return None
  return valid


def gguf_mutants(path: pathlib.Path, rng: np.random.Generator):
  """(name, mutant) pairs: about 300 byte mutants (header, metadata and tensor infos; tensor
  data; truncation) and metadata values of the wrong type or range, or left out."""
  data = path.read_bytes()
  reader = gguf.GGUFReader(path)
  header = reader.data_offset
  for name, mutant in fuzzing.byte_mutants(data, rng, 170, region=(0, header)):
    yield f"header_bytes/{name}", mutant
  for name, mutant in fuzzing.byte_mutants(data, rng, 30, region=(header, len(data))):
    yield f"data_bytes/{name}", mutant
  for i in range(10):
    cut = int(rng.integers(1, len(data)))
    yield f"truncate/{i}@{cut}", data[:cut]
  # metadata values of the wrong type or range, written by gguf's own writer
  V = gguf.GGUFValueType
  wrong = [(V.STRING, "x"), (V.UINT32, 0), (V.UINT32, 2**32 - 1), (V.INT32, -1),
           (V.FLOAT32, float("nan")), (V.FLOAT32, float("inf")), (V.FLOAT32, -1.0),
           (V.FLOAT32, 0.0), (V.BOOL, True), (V.UINT64, 2**63), (V.FLOAT32, 1.5)]
  keys = [k for k in reader.fields if not k.startswith("GGUF.")]
  for i in range(80):
    key = keys[int(rng.integers(len(keys)))]
    vtype, value = wrong[int(rng.integers(len(wrong)))]
    yield f"metadata/{i}:{key}={value!r}({vtype.name})", ("metadata", key, vtype, value)
  for i, key in enumerate(keys[:12]):
    yield f"metadata_dropped/{key}", ("metadata", key, None, None)


def write_gguf_mutant(target: pathlib.Path, mutant):
  """A byte mutant as it is; a metadata mutant rewritten by gguf's own writer (the fixture's
  tensors, seed 0)."""
  if isinstance(mutant, bytes):
    target.write_bytes(mutant)
    return
  _, key, vtype, value = mutant
  metadata, dropped = {}, set()
  if vtype is None:
    dropped.add(key)
  else:
    metadata[key] = (value, vtype)
  gguf_files.write_gguf(target, GGUF_SHAPE, types=(Q.F16, Q.Q8_0, Q.F32),
                        metadata=metadata, drop_metadata=tuple(dropped))


def test_gguf_to_maxnucl_mutants_are_converted_validly_or_refused_in_one_line(tiny_gguf,
                                                                            tmp_path):
  original, reference_ckpt = tiny_gguf
  rng = np.random.default_rng(SEED)
  valid = gguf_valid(original, reference_ckpt)
  tally = fuzzing.Tally("gguf-to-maxnucl (GGUF)")
  for i, (name, mutant) in enumerate(gguf_mutants(original, rng)):
    path, output = tmp_path / f"m{i}.gguf", tmp_path / f"out{i}"
    write_gguf_mutant(path, mutant)
    outcome, detail = run_mutant(
        ["gguf-to-maxnucl", "--input", str(path), "--output", str(output)], path,
        output, [path.name], valid)
    tally.add(name, outcome, detail)
    path.unlink()
    shutil.rmtree(output, ignore_errors=True)
  assert tally.counts[fuzzing.ACCEPTED] > 0 and tally.counts[fuzzing.REFUSED] > 0
  tally.assert_clean()
