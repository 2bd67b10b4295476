"""gguf-to-maxnucl (maxnucl/conversion/gguf_import.py): tiny GGUF files written with
gguf.GGUFWriter (tests/gguf_files.py) in every supported tensor type and architecture, compared
with transformers' own GGUF loading of the same files (which dequantises with the same package):
weights bit-equal, logits within the decoder's rounding bound."""

import contextlib
import io
import zipfile

import gguf
import numpy as np
import pytest
import torch
import transformers

from maxnucl import checkpoints, models
from maxnucl.conversion import cli, gguf_import
from maxnucl.conversion.convert import ConversionError
from maxnucl.layers.embeddings import rope_inverse_frequencies
import gguf_files
from gguf_files import ALL_TYPES, Q, SHAPES
from tolerances import decoder_terms, magnitude, rounding_atol

TOKENS = np.random.default_rng(0).integers(0, 389, size=(2, 13))  # longer than the windows (4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """architecture key -> (GGUF path, name -> type written); each file cycles through every type."""
  out = {}
  for key, shape in SHAPES.items():
    path = tmp_path_factory.mktemp(key) / f"tiny-{key}.gguf"
    out[key] = path, gguf_files.write_gguf(path, shape, seed=len(out))
  return out


def test_gguf_files_cover_every_supported_type(files):
  for key, (_, types) in files.items():
    assert set(types.values()) == set(gguf_import.SUPPORTED_TYPES), key
  assert set(ALL_TYPES) == set(gguf_import.SUPPORTED_TYPES)


@pytest.mark.parametrize("key", sorted(SHAPES))
def test_weights_and_logits_equal_transformers_gguf_loading(files, key, tmp_path):
  path, _ = files[key]
  cfg = gguf_import.gguf_to_maxnucl(path, tmp_path / "ckpt")
  _, params = checkpoints.load(tmp_path / "ckpt")
  hf = gguf_files.hf_from_gguf(path)
  reference = gguf_files.params_from_hf(cfg, hf)
  # the same dequantiser, permutation and norm offset: the same float32 numbers
  for (leaf_path, ours), theirs in zip(jax_leaves(params), jax_leaves(reference)):
    assert leaf_path == theirs[0]
    np.testing.assert_array_equal(ours, theirs[1], err_msg="/".join(leaf_path))
  logits = np.asarray(models.apply(cfg, params, TOKENS))
  expected = gguf_files.hf_logits(hf, TOKENS)
  # two float32 evaluations of the same decoder: its rounding path (tests/tolerances.py)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=rounding_atol(
      magnitude(expected), decoder_terms(cfg, TOKENS.shape[1])))


def jax_leaves(tree, prefix=()):
  for key in sorted(tree):
    if isinstance(tree[key], dict):
      yield from jax_leaves(tree[key], prefix + (key,))
    else:
      yield prefix + (key,), np.asarray(tree[key])


def test_config_follows_the_metadata_and_tensors(files):
  configs = {}
  for key, (path, _) in files.items():
    with gguf_import.open_gguf(path) as (reader, label):
      configs[key] = gguf_import.config_from_gguf(reader, label)
  assert not configs["llama"].tie_embeddings and configs["llama_tied"].tie_embeddings
  assert configs["qwen2"].qkv_bias and not configs["llama"].qkv_bias
  assert configs["gemma3"].qk_norm and configs["gemma3"].family == "gemma3"
  assert configs["gemma3"].attention_pattern == ("local",) * 5 + ("global",)
  assert (configs["gemma3"].rope_theta, configs["gemma3"].rope_local_theta) == (1e6, 1e4)
  assert configs["gemma2"].attention_pattern == ("local", "global")
  assert (configs["gemma2"].attn_logit_softcap, configs["gemma2"].final_logit_softcap) == (50, 30)
  assert configs["gemma2"].sliding_window == 4 and configs["llama"].sliding_window is None
  assert (configs["llama"].vocab_size, configs["llama"].d_model, configs["llama"].num_layers,
          configs["llama"].num_heads, configs["llama"].num_kv_heads, configs["llama"].head_dim,
          configs["llama"].ffn_dim) == (389, 256, 3, 4, 2, 64, 512)
  assert (configs["llama"].bos_id, configs["llama"].eos_id, configs["llama"].pad_id) == (1, 2, 0)


def test_llama_rotary_permutation_is_undone_exactly(tmp_path):
  """F32 file: the checkpoint's q/k are the Hugging Face values from before llama.cpp permuted
  them (an independent check of the permutation, beside transformers' reverse_permute)."""
  shape = SHAPES["llama"]
  gguf_files.write_gguf(tmp_path / "f32.gguf", shape, types=(Q.F32,), seed=3)
  values = gguf_files.hf_tensors(shape, np.random.default_rng(3))
  gguf_import.gguf_to_maxnucl(tmp_path / "f32.gguf", tmp_path / "ckpt")
  for kind, heads in (("q", shape.heads), ("k", shape.kv_heads)):
    stored = checkpoints.read_array(tmp_path / "ckpt", ("layers_1", "attn", kind))
    hf = values[f"blk.1.attn_{kind}.weight"]  # (heads * H, d), rotate_half layout
    np.testing.assert_array_equal(stored, hf.reshape(heads, shape.head_dim, shape.d)
                                  .transpose(2, 0, 1))
  assert not np.array_equal(gguf_files.permute_rotary(values["blk.1.attn_q.weight"], 4),
                            values["blk.1.attn_q.weight"])


def test_bfloat16_output_is_the_float32_output_rounded(files, tmp_path):
  path, _ = files["qwen2"]
  gguf_import.gguf_to_maxnucl(path, tmp_path / "f32")
  gguf_import.gguf_to_maxnucl(path, tmp_path / "bf16", dtype="bfloat16")
  for key, array in checkpoints.iter_arrays(tmp_path / "f32"):
    stored = checkpoints.read_array(tmp_path / "bf16", key)
    assert stored.dtype.name == "bfloat16"
    np.testing.assert_array_equal(stored, array.astype(stored.dtype))
  # the config describes the arrays stored beside it (it said float32)
  assert checkpoints.load_config(tmp_path / "bf16").param_dtype == "bfloat16"
  assert checkpoints.load_config(tmp_path / "f32").param_dtype == "float32"


def llama_cpp_rope_factors(head_dim, theta, factor, low, high, original):
  """convert_hf_to_gguf.py's LlamaModel rope_freqs for Llama-3.1 rope scaling."""
  freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  out = []
  for freq in freqs:
    wavelength = 2 * np.pi / freq
    if wavelength < original / high:
      out.append(1.0)
    elif wavelength > original / low:
      out.append(factor)
    else:
      smooth = (original / wavelength - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def test_llama3_rope_scaling_read_from_rope_freqs(tmp_path):
  shape = SHAPES["llama_tied"]
  factors = llama_cpp_rope_factors(shape.head_dim, 10_000.0, 8.0, 1.0, 4.0, 8192)
  gguf_files.write_gguf(tmp_path / "m.gguf", shape, types=(Q.F16,),
                        extra_tensors={gguf_import.ROPE_FREQS: (factors, None)})
  with gguf_import.open_gguf(tmp_path / "m.gguf") as (reader, label):
    cfg = gguf_import.config_from_gguf(reader, label)
  assert cfg.rope_scaling[0] == "llama3" and cfg.rope_scaling[1] == 8.0
  # the reference: transformers' Llama-3.1 frequencies for the scaling llama.cpp encoded
  hf_config = transformers.LlamaConfig(
      hidden_size=shape.d, num_attention_heads=shape.heads, head_dim=shape.head_dim,
      rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192})
  init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
  expected = init(hf_config, torch.device("cpu"))[0].numpy()
  ours = rope_inverse_frequencies(shape.head_dim, 10_000.0, cfg.rope_scaling)
  # a few float32 roundings per frequency (power, division, interpolation)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=rounding_atol(magnitude(expected), 8))


def test_linear_rope_scaling_and_sliding_window_pattern_from_metadata(tmp_path):
  V = gguf.GGUFValueType
  gguf_files.write_gguf(tmp_path / "m.gguf", SHAPES["gemma3"], types=(Q.F16,), metadata={
      "gemma3.rope.scaling.type": ("linear", V.STRING),
      "gemma3.rope.scaling.factor": (8.0, V.FLOAT32),
      "gemma3.attention.sliding_window_pattern": (3, V.UINT32)})
  with gguf_import.open_gguf(tmp_path / "m.gguf") as (reader, label):
    cfg = gguf_import.config_from_gguf(reader, label)
  assert cfg.rope_scaling == ("linear", 8.0)
  assert cfg.attention_pattern == ("local", "local", "global")


# ---- bad input -----------------------------------------------------------------------------------

def test_unsupported_type_refused_in_one_line_listing_the_supported(tmp_path):
  shape = SHAPES["llama_tied"]
  rng = np.random.default_rng(0)
  q2k = rng.integers(0, 256, (shape.ffn, shape.d // 256 * 84), dtype=np.uint8)  # Q2_K blocks
  gguf_files.write_gguf(tmp_path / "m.gguf", shape, types=(Q.F16,),
                        extra_tensors={"blk.9.ffn_up.weight": (q2k, Q.Q2_K)})
  with pytest.raises(ConversionError) as error:
    gguf_import.gguf_to_maxnucl(tmp_path / "m.gguf", tmp_path / "ckpt")
  message = str(error.value)
  assert "\n" not in message and "blk.9.ffn_up.weight" in message and "Q2_K" in message
  assert all(q.name in message.split("supported types:")[1] for q in gguf_import.SUPPORTED_TYPES)
  assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_file_refused_and_nothing_written(files, tmp_path, damage):
  data = files["llama_tied"][0].read_bytes()
  if damage == "truncated":
    data = data[:len(data) // 2]
  else:
    data = b"GGUX" + data[4:]
  (tmp_path / "bad.gguf").write_bytes(data)
  code, err = run_cli(["--input", str(tmp_path / "bad.gguf"), "--output", str(tmp_path / "out")])
  assert code == 2 and "bad.gguf" in err and "not a readable GGUF file" in err
  assert not (tmp_path / "out").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no temporary left


FUZZ_CASES = 40


def test_mutated_headers_convert_validly_or_are_refused_in_one_line(files, tmp_path):
  """Seeded mutation fuzz of what the reader trusts: 1-4 random bytes of the header, metadata and
  tensor infos (everything before the tensor data) replaced.  Every mutant either converts into
  a checkpoint whose config loads, or is refused with exit 2, a one-line message naming the
  file and nothing written; never a traceback."""
  original = files["llama_tied"][0].read_bytes()
  header = gguf.GGUFReader(files["llama_tied"][0]).data_offset
  rng = np.random.default_rng(2026)
  outcomes = {0: 0, 2: 0}
  for case in range(FUZZ_CASES):
    data = bytearray(original)
    for offset in rng.integers(0, header, rng.integers(1, 5)):
      data[offset] = rng.integers(0, 256)
    path, out = tmp_path / f"mutant{case}.gguf", tmp_path / f"out{case}"
    path.write_bytes(bytes(data))
    code, err = run_cli(["--input", str(path), "--output", str(out)])
    assert code in outcomes, (case, code, err)
    outcomes[code] += 1
    if code == 0:
      checkpoints.load_config(out)
    else:
      lines = [line for line in err.splitlines() if line.strip()]
      assert path.name in lines[-1] and "Traceback" not in err, (case, err)
      assert not out.exists()
  assert outcomes[2] > 0  # the mutations do reach what the reader checks


def run_cli(args):
  """(exit status, stderr) of `maxnucl-convert gguf-to-maxnucl ARGS`, run in this process."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(["gguf-to-maxnucl"] + args)
  return code, err.getvalue()


def test_wheel_input_needs_exactly_one_gguf_member(files, tmp_path):
  path, _ = files["llama_tied"]
  empty, two, one = (tmp_path / f"{n}.whl" for n in ("empty", "two", "one"))
  with zipfile.ZipFile(empty, "w") as z:
    z.writestr("pkg/__init__.py", "")
  with zipfile.ZipFile(two, "w", zipfile.ZIP_DEFLATED) as z:
    z.write(path, "pkg/a.gguf")
    z.write(path, "pkg/b.gguf")
  with zipfile.ZipFile(one, "w", zipfile.ZIP_DEFLATED) as z:
    z.write(path, "pkg/model.gguf")
  code, err = run_cli(["--input", str(empty), "--output", str(tmp_path / "o1")])
  assert code == 2 and "empty.whl: no .gguf members" in err
  code, err = run_cli(["--input", str(two), "--output", str(tmp_path / "o2")])
  assert code == 2 and "['pkg/a.gguf', 'pkg/b.gguf']" in err and "--member" in err
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
  assert run_cli(["--input", str(two), "--member", "pkg/b.gguf", "--output",
                  str(tmp_path / "o3")])[0] == 0
  assert run_cli(["--input", str(one), "--output", str(tmp_path / "o4")])[0] == 0
  gguf_import.gguf_to_maxnucl(path, tmp_path / "direct")
  for key, array in checkpoints.iter_arrays(tmp_path / "direct"):
    np.testing.assert_array_equal(checkpoints.read_array(tmp_path / "o4", key), array)
    np.testing.assert_array_equal(checkpoints.read_array(tmp_path / "o3", key), array)


def test_existing_output_refused_without_overwrite(files, tmp_path):
  path, _ = files["llama_tied"]
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  code, err = run_cli(["--input", str(path), "--output", str(tmp_path / "out")])
  assert code == 2 and "already exists" in err and "--overwrite" in err
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
  assert run_cli(["--input", str(path), "--output", str(tmp_path / "out"), "--overwrite"])[0] == 0
  assert checkpoints.load_config(tmp_path / "out").num_layers == SHAPES["llama_tied"].layers


def test_unsupported_architecture_refused_naming_it(tmp_path):
  shape = gguf_files.Shape("phi3", layers=1)
  gguf_files.write_gguf(tmp_path / "m.gguf", shape, types=(Q.F16,))
  with pytest.raises(ConversionError, match=r"general.architecture 'phi3' is not supported"):
    gguf_import.gguf_to_maxnucl(tmp_path / "m.gguf", tmp_path / "ckpt")


V = gguf.GGUFValueType


@pytest.mark.parametrize("key, value, vtype", [
    ("llama.block_count", float("inf"), V.FLOAT32), ("llama.block_count", 0, V.UINT32),
    ("llama.embedding_length", float("nan"), V.FLOAT32),
    ("llama.attention.head_count", "x", V.STRING),
    ("llama.attention.head_count_kv", float("inf"), V.FLOAT32),
    ("llama.rope.dimension_count", float("inf"), V.FLOAT32),
    ("llama.attention.layer_norm_rms_epsilon", "x", V.STRING),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, V.FLOAT32),
    ("llama.rope.freq_base", float("nan"), V.FLOAT32),
    ("llama.context_length", 1.5, V.FLOAT32),
    ("tokenizer.ggml.bos_token_id", "x", V.STRING),
    ("tokenizer.ggml.padding_token_id", float("inf"), V.FLOAT32),
    ("tokenizer.ggml.eos_token_id", -1, V.INT32),
])
def test_metadata_of_the_wrong_type_or_range_is_refused_naming_the_key(key, value, vtype,
                                                                       tmp_path):
  """Found by tests/test_fuzz_hf.py: OverflowError tracebacks, and refusals naming neither the
  file nor the key."""
  path = tmp_path / "bad.gguf"
  gguf_files.write_gguf(path, SHAPES["llama_tied"], types=(Q.F16,),
                        metadata={key: (value, vtype)})
  code, err = run_cli(["--input", str(path), "--output", str(tmp_path / "out")])
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1, err
  assert "bad.gguf" in lines[0] and key in lines[0], lines[0]
  assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
  """A tensor of NaN (a damaged file) is not converted into a checkpoint its readers refuse."""
  shape = gguf_files.Shape("llama", vocab=64, d=64, layers=1, heads=2, kv_heads=1, head_dim=32,
                           ffn=64, untied=False)
  path = tmp_path / "nan.gguf"
  gguf_files.write_gguf(path, shape, types=(Q.F32,))
  data = bytearray(path.read_bytes())
  reader = gguf.GGUFReader(path)
  target = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
  offset = int(target.data_offset)  # the tensor's first byte in the file
  data[offset:offset + 4] = np.float32(np.nan).tobytes()
  path.write_bytes(bytes(data))
  code, err = run_cli(["--input", str(path), "--output", str(tmp_path / "out")])
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1, err
  assert "nan.gguf" in lines[0] and "blk.0.ffn_up.weight" in lines[0] and "non-finite" in lines[0]
  assert not (tmp_path / "out").exists()
