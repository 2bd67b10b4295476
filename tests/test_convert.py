"""Checkpoint conversion (issue 5): Hugging Face / DeepMind `gemma` <-> maxnucl, streaming.

The reference is a tiny random transformers Gemma-2 (tests/hf_reference.py); every conversion is
checked against its logits or bit-exactly against another conversion.
"""

import hashlib
import json
import pathlib
import shutil
import signal
import struct
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
import torch
import transformers
from jax.sharding import NamedSharding

from maxnucl import checkpoints, ffn, models, outputs, sharding
from maxnucl.conversion import cli, convert, deepmind_gemma, hf_gemma2, hf_io
from maxnucl.conversion import inspect as inspect_lib
from maxnucl.data import vocabularies
import hf_export
import interrupting
from hf_reference import hf_logits, maxnucl_from_hf, tiny_hf_gemma2
from tolerances import EPS64, decoder_terms, magnitude, rounding_atol

REPO = pathlib.Path(__file__).absolute().parents[1]
TOOL = REPO / "tools" / "convert_checkpoint.py"
TOKENS = np.random.default_rng(0).integers(0, 128, size=(2, 16))  # longer than the window (6)


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
  return tiny_hf_gemma2(seed=1)


@pytest.fixture(scope="module")
def reference_logits(hf_model):
  return hf_logits(hf_model, TOKENS)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "tiny_gemma2"
  hf_model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
  """(checkpoint path, input checksums before) of hf_dir converted to maxnucl in float32."""
  before = _checksums(hf_dir)
  out = tmp_path_factory.mktemp("ckpt") / "tiny_maxnucl"
  convert.hf_to_maxnucl(hf_dir, out, dtype="float32")
  return out, before


def _checksums(directory):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(directory).iterdir()) if p.is_file()}


def _logits(ckpt):
  cfg, params = checkpoints.load(ckpt, dtype="float32")
  return np.asarray(models.apply(cfg, params, TOKENS))


def _logit_atol(ckpt, *logits):
  """Two float32 computations of the logits of TOKENS (maxnucl's and transformers', or two
  orders of the same sums) differ by their rounding along a logit's path (tests/tolerances.py)."""
  cfg = checkpoints.load_config(ckpt)
  return rounding_atol(magnitude(*logits), decoder_terms(cfg, TOKENS.shape[1]))


def _flat(params):
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_params_identical(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    assert fa[key].dtype == fb[key].dtype, key
    np.testing.assert_array_equal(fa[key], fb[key], err_msg="/".join(key))


def _random_params(cfg, seed=0):
  """Random float32 params of cfg's shapes (no jit: much faster than models.init here)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                      models.abstract_params(cfg))


def _run_cli(*args):
  return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                        text=True, cwd=REPO)


# ---- Hugging Face -> maxnucl ---------------------------------------------------------------------

def test_hf_to_maxnucl_logits_equal_transformers(converted, reference_logits, hf_dir):
  ckpt, before = converted
  logits = _logits(ckpt)
  np.testing.assert_allclose(logits, reference_logits, rtol=0,
                             atol=_logit_atol(ckpt, logits, reference_logits))
  assert _checksums(hf_dir) == before  # the input is never modified


def test_streamed_checkpoint_matches_whole_tree_conversion(converted, hf_model):
  cfg, params = checkpoints.load(converted[0])
  ref_cfg, ref_params = maxnucl_from_hf(hf_model)
  assert cfg.replace(name=ref_cfg.name) == ref_cfg
  _assert_params_identical(params, jax.tree.map(np.float32, ref_params))
  for key, array in _flat(params).items():  # the one-array reader agrees with the full load
    np.testing.assert_array_equal(checkpoints.read_array(converted[0], key), array)


def test_sharded_safetensors_input_converts_identically(hf_model, converted, tmp_path):
  hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
  assert (tmp_path / "hf" / hf_io.INDEX_FILE).exists()
  assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
  convert.hf_to_maxnucl(tmp_path / "hf", tmp_path / "ckpt")
  _assert_params_identical(checkpoints.load(tmp_path / "ckpt")[1],
                           checkpoints.load(converted[0])[1])


def test_bf16_conversion_stores_bf16_rounded_values(hf_dir, converted, tmp_path):
  convert.hf_to_maxnucl(hf_dir, tmp_path / "bf16", dtype="bfloat16")
  assert {dtype for _, dtype in checkpoints.stored_arrays(tmp_path / "bf16").values()} == {
      "bfloat16"}
  bf16, f32 = _flat(checkpoints.load(tmp_path / "bf16")[1]), _flat(
      checkpoints.load(converted[0])[1])
  for key in f32:
    np.testing.assert_array_equal(bf16[key], f32[key].astype(ml_dtypes.bfloat16))
  # the config describes the arrays stored beside it (it said float32)
  assert checkpoints.load_config(tmp_path / "bf16").param_dtype == "bfloat16"
  assert checkpoints.load_config(converted[0]).param_dtype == "float32"


def test_stored_lm_head_must_equal_embedding(hf_dir, tmp_path):
  state = {k: v.numpy() for k, v in _safetensors_state(hf_dir).items()}
  ok = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"]})
  _write_hf_dir(tmp_path / "tied", hf_dir, ok)
  convert.hf_to_maxnucl(tmp_path / "tied", tmp_path / "tied_ckpt")  # equal: accepted
  bad = dict(ok, **{"lm_head.weight": ok["lm_head.weight"] + 1.0})
  _write_hf_dir(tmp_path / "untied", hf_dir, bad)
  with pytest.raises(convert.ConversionError, match="lm_head.weight differs"):
    convert.hf_to_maxnucl(tmp_path / "untied", tmp_path / "untied_ckpt")
  assert not (tmp_path / "untied_ckpt").exists()


def test_9b_shaped_config_with_224_uses_256(tmp_path, caplog):
  shape = dict(model_type="gemma2", hidden_size=3584, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256,
               num_hidden_layers=2, intermediate_size=14336, vocab_size=256000,
               sliding_window=4096)
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "config.json").write_text(json.dumps({**shape,
                                                            "query_pre_attn_scalar": 224}))
  cfg, _ = convert.read_hf_config(tmp_path / "old")
  assert cfg.query_pre_attn_scalar == 256 and "224" in caplog.text
  cfg, _ = convert.read_hf_config(tmp_path / "old", keep_query_pre_attn_scalar=True)
  assert cfg.query_pre_attn_scalar == 224
  (tmp_path / "27b").mkdir()  # other shapes keep their value (27b: 144)
  (tmp_path / "27b" / "config.json").write_text(json.dumps(
      {**shape, "hidden_size": 4608, "num_attention_heads": 32, "num_key_value_heads": 16,
       "head_dim": 128, "query_pre_attn_scalar": 144}))
  assert convert.read_hf_config(tmp_path / "27b")[0].query_pre_attn_scalar == 144


# ---- maxnucl -> Hugging Face ---------------------------------------------------------------------

def test_maxnucl_to_hf_loads_in_transformers_and_round_trips_bit_exactly(converted, tmp_path):
  ckpt = converted[0]
  before = _checksums(ckpt / checkpoints.PARAMS)
  files = convert.maxnucl_to_hf(ckpt, tmp_path / "hf", max_shard_bytes=60_000)
  assert len(files) > 1 and (tmp_path / "hf" / hf_io.INDEX_FILE).exists()  # sharded + index
  model = transformers.Gemma2ForCausalLM.from_pretrained(
      tmp_path / "hf", attn_implementation="eager", dtype=torch.float32).eval()
  logits, reference = hf_logits(model, TOKENS), _logits(ckpt)
  np.testing.assert_allclose(logits, reference, rtol=0,
                             atol=_logit_atol(ckpt, logits, reference))
  convert.hf_to_maxnucl(tmp_path / "hf", tmp_path / "back")
  cfg, params = checkpoints.load(ckpt)
  cfg_back, params_back = checkpoints.load(tmp_path / "back")
  _assert_params_identical(params_back, params)
  assert cfg_back.replace(name=cfg.name) == cfg
  assert _checksums(ckpt / checkpoints.PARAMS) == before


def test_non_uniform_ffn_widths_are_refused_for_hf(tmp_path):
  cfg = models.get_config("gemma2_tiny", ffn_widths=(256, 128, 0, 256))
  checkpoints.save(tmp_path / "pruned", cfg, _random_params(cfg))
  with pytest.raises(convert.ConversionError, match="per-layer FFN widths.*zero-pad"):
    convert.maxnucl_to_hf(tmp_path / "pruned", tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


# ---- DeepMind gemma -> maxnucl -------------------------------------------------------------------

def _deepmind_fixture(hf_model, path, gating_layout, padded_vocab, layout="flat"):
  """A DeepMind-layout Orbax checkpoint of the HF model (embedding padded with junk rows): the
  flat layout of the released checkpoints, or the nested one of `gm.ckpts.save_params`."""
  cfg, params = maxnucl_from_hf(hf_model)
  flat = {}
  pad = np.random.default_rng(1).normal(size=(padded_vocab - cfg.vocab_size, cfg.d_model))
  flat["transformer/embedder"] = {"input_embedding": np.concatenate(
      [params["embedder"]["embedding"], pad.astype(np.float32)])}
  flat["transformer/final_norm"] = {"scale": params["final_norm"]["scale"]}
  for i in range(cfg.num_layers):
    p, dm = params[f"layers_{i}"], f"transformer/layer_{i}"
    q, k, v = (p["attn"][name].transpose(1, 0, 2) for name in ("q", "k", "v"))  # (N, d, H)
    if cfg.num_kv_heads == cfg.num_heads:  # the library's `use_qkv_einsum`
      flat[f"{dm}/attn/qkv_einsum"] = {"w": np.stack([q, k, v])}
    else:
      flat[f"{dm}/attn/q_einsum"] = {"w": q}
      flat[f"{dm}/attn/kv_einsum"] = {"w": np.stack([k, v])}
    flat[f"{dm}/attn/attn_vec_einsum"] = {"w": p["attn"]["o"]}
    gate, up = p["mlp"]["gate"], p["mlp"]["up"]  # [d, m]
    flat[f"{dm}/mlp/gating_einsum"] = {"w": np.stack([gate, up]) if gating_layout == "dm"
                                       else np.stack([gate.T, up.T])}
    flat[f"{dm}/mlp/linear"] = {"w": p["mlp"]["out"]}
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
      flat[f"{dm}/{norm}"] = {"scale": p[norm]["scale"]}
  if layout == "flat":
    ocp.PyTreeCheckpointer().save(path, flat)
  else:  # gm.ckpts.save_params: StandardCheckpointer().save(path, params) of the nested tree
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, _nested_as_gemma_library(flat))
    checkpointer.wait_until_finished()
  return cfg


def _nested_as_gemma_library(flat):
  """gm.ckpts' `_flat_to_nested` (gemma 3.3.0, ckpts/_checkpoint.py and _compat.py): the MLP's
  {"w": array} dicts lose their "w" (`param_remapper`), the paths are nested at "/"
  (`nest_params`) and the "transformer" level is dropped."""
  remapped = {}
  for key, value in flat.items():
    if "mlp/" in key:
      layer_name, param = key.rsplit("/", maxsplit=1)
      remapped.setdefault(layer_name, {})[param] = value["w"]
    else:
      remapped[key] = value
  nested = {}
  for key, value in remapped.items():
    *parents, leaf = key.split("/")
    node = nested
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return nested["transformer"]


@pytest.mark.parametrize("layout, gating_layout",
                         [("flat", "dm"), ("flat", "md"), ("nested", "dm"), ("nested", "md")])
def test_deepmind_layout_converts_to_equal_logits(hf_model, reference_logits, converted, tmp_path,
                                                  layout, gating_layout):
  cfg = _deepmind_fixture(hf_model, tmp_path / "dm", gating_layout, padded_vocab=136,
                          layout=layout)
  assert deepmind_gemma.gating_layout_of(
      _stored_shapes(tmp_path / "dm")[("transformer/layer_0/mlp/gating_einsum", "w")], cfg,
      0) == gating_layout
  convert.gemma_to_maxnucl(tmp_path / "dm", tmp_path / "ckpt", cfg)
  _assert_params_identical(checkpoints.load(tmp_path / "ckpt")[1],
                           checkpoints.load(converted[0])[1])
  logits = _logits(tmp_path / "ckpt")
  np.testing.assert_allclose(logits, reference_logits, rtol=0,
                             atol=_logit_atol(tmp_path / "ckpt", logits, reference_logits))


def _stored_shapes(dm_dir):
  """Stored shapes by flat-layout key (a nested path: "transformer/" + its parents, and the
  leaf, or "w" for the MLP's matrices)."""
  out = {}
  for path, (shape, _) in checkpoints.pytree_arrays(dm_dir).items():
    if not path[0].startswith("transformer/"):
      path = (("transformer/" + "/".join(path), "w") if path[-2] == "mlp" else
              ("transformer/" + "/".join(path[:-1]), path[-1]))
    out[path] = shape
  return out


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_deepmind_qkv_einsum_of_as_many_kv_heads_as_query_heads_converts_to_equal_logits(
    tmp_path, layout):
  hf_model = tiny_hf_gemma2(seed=2, num_key_value_heads=4)  # N == K: one qkv_einsum (3, N, d, H)
  reference = hf_logits(hf_model, TOKENS)
  cfg = _deepmind_fixture(hf_model, tmp_path / "dm", "md", padded_vocab=136, layout=layout)
  assert ("transformer/layer_0/attn/qkv_einsum", "w") in _stored_shapes(tmp_path / "dm")
  convert.gemma_to_maxnucl(tmp_path / "dm", tmp_path / "ckpt", cfg)
  logits = _logits(tmp_path / "ckpt")
  np.testing.assert_allclose(logits, reference, rtol=0,
                             atol=_logit_atol(tmp_path / "ckpt", logits, reference))


def test_gemma_to_maxnucl_reads_a_download_folder_and_carries_its_tokenizer(hf_model, converted,
                                                                            tmp_path):
  """DeepMind's downloads hold the checkpoint as a subfolder beside tokenizer.model."""
  download = tmp_path / "gemma2-tiny"
  cfg = _deepmind_fixture(hf_model, download / "gemma2-tiny", "md", padded_vocab=136)
  tokenizer = vocabularies.train_sentencepiece([hf_export.corpus(tmp_path)], tmp_path / "sp",
                                               vocab_size=100, byte_fallback=False)
  shutil.copy(tokenizer, download / "tokenizer.model")
  (tmp_path / "cfg.json").write_text(cfg.to_json())
  result = _run_cli("gemma-to-maxnucl", "--input", download, "--output", tmp_path / "ckpt",
                    "--config", tmp_path / "cfg.json")
  assert result.returncode == 0, result.stderr
  _assert_params_identical(checkpoints.load(tmp_path / "ckpt")[1],
                           checkpoints.load(converted[0])[1])
  carried = checkpoints.checkpoint_vocab(tmp_path / "ckpt")
  assert pathlib.Path(carried).read_bytes() == (download / "tokenizer.model").read_bytes()
  (download / "other").mkdir()  # a second checkpoint folder: which one is meant is unclear
  shutil.copy(download / "gemma2-tiny" / "_METADATA", download / "other")
  result = _run_cli("gemma-to-maxnucl", "--input", download, "--output", tmp_path / "x",
                    "--config", tmp_path / "cfg.json")
  assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
  assert "checkpoint folders: 2: ['gemma2-tiny', 'other']" in result.stderr


def test_gemma_to_maxnucl_wrong_size_names_the_differing_config_sizes(hf_model, tmp_path):
  _deepmind_fixture(hf_model, tmp_path / "dm", "md", padded_vocab=136)
  result = _run_cli("gemma-to-maxnucl", "--input", tmp_path / "dm", "--output", tmp_path / "x",
                    "--size", "2b")
  assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
  assert ("the checkpoint's d_model is 48, num_layers is 4, num_heads is 4, num_kv_heads is 2, "
          "head_dim is 16, ffn_dim is 96; model 'gemma2_2b' has d_model 2304, num_layers 26, "
          "num_heads 8, num_kv_heads 4, head_dim 256, ffn_dim 9216") in result.stderr
  assert not (tmp_path / "x").exists()


def test_gemma_to_maxnucl_config_must_give_query_pre_attn_scalar(hf_model, tmp_path):
  """The checkpoint does not store the query scale (27b's is d_model / num_heads, not head_dim):
  a --config without it would silently give other logits."""
  cfg = _deepmind_fixture(hf_model, tmp_path / "dm", "md", padded_vocab=136)
  fields = json.loads(cfg.to_json())
  del fields["query_pre_attn_scalar"]
  (tmp_path / "cfg.json").write_text(json.dumps(fields))
  result = _run_cli("gemma-to-maxnucl", "--input", tmp_path / "dm", "--output", tmp_path / "x",
                    "--config", tmp_path / "cfg.json")
  assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
  assert f"{tmp_path / 'cfg.json'}: no query_pre_attn_scalar" in result.stderr
  assert not (tmp_path / "x").exists()


def test_gemma_to_maxnucl_cli_with_config_file(hf_model, converted, tmp_path):
  cfg = _deepmind_fixture(hf_model, tmp_path / "dm", "md", padded_vocab=136)
  (tmp_path / "cfg.json").write_text(cfg.to_json())
  result = _run_cli("gemma-to-maxnucl", "--input", tmp_path / "dm", "--output",
                    tmp_path / "ckpt", "--config", tmp_path / "cfg.json", "--dtype", "bfloat16")
  assert result.returncode == 0, result.stderr
  stored = checkpoints.stored_arrays(tmp_path / "ckpt")
  assert stored[("embedder", "embedding")] == ((128, 48), "bfloat16")
  assert {dtype for _, dtype in stored.values()} == {"bfloat16"}
  assert checkpoints.load_config(tmp_path / "ckpt").param_dtype == "bfloat16"  # as stored
  wrong = _run_cli("gemma-to-maxnucl", "--input", tmp_path / "dm", "--output", tmp_path / "x",
                   "--config", tmp_path / "cfg.json", "--vocab_size", 200)
  assert wrong.returncode == 2 and "input_embedding" in wrong.stderr and "200" in wrong.stderr


# ---- safety ----------------------------------------------------------------------------------------

def test_interrupted_conversion_leaves_no_output(hf_dir, tmp_path, monkeypatch):
  write = checkpoints.StreamingWriter.write
  calls = []

  def failing_write(self, key_path, array):
    calls.append(key_path)
    if len(calls) == 5:
      raise KeyboardInterrupt("simulated interruption")
    return write(self, key_path, array)

  monkeypatch.setattr(checkpoints.StreamingWriter, "write", failing_write)
  with pytest.raises(KeyboardInterrupt):
    convert.hf_to_maxnucl(hf_dir, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


def test_existing_output_is_refused_without_overwrite(hf_dir, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  result = _run_cli("hf-to-maxnucl", "--input", hf_dir, "--output", tmp_path / "out")
  assert result.returncode == 2 and "already exists" in result.stderr
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
  convert.hf_to_maxnucl(hf_dir, tmp_path / "out", overwrite=True)
  assert checkpoints.load_config(tmp_path / "out").num_layers == 4
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _tree_checksums(directory):
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def test_output_that_is_the_input_or_inside_it_is_refused_in_every_direction(
    hf_model, hf_dir, converted, tmp_path):
  inputs = tmp_path.resolve() / "inputs"
  hf = shutil.copytree(hf_dir, inputs / "hf")
  ckpt = shutil.copytree(converted[0], inputs / "ckpt")
  _deepmind_fixture(hf_model, inputs / "dm", "dm", padded_vocab=136)
  (tmp_path / "ckpt_link").symlink_to(ckpt)  # the output is a symlink to the input
  (tmp_path / "alias").symlink_to(inputs)  # the input is given through a symlinked parent
  link, dm = tmp_path.resolve() / "ckpt_link", tmp_path.resolve() / "alias" / "dm"
  before = {path: _tree_checksums(path) for path in (hf, ckpt, inputs / "dm")}
  runs = {
      ("hf-to-maxnucl", "--input", hf, "--output", hf, "--overwrite"):
          f"--output {hf} is the Hugging Face input directory {hf}: choose another path",
      ("maxnucl-to-hf", "--input", ckpt, "--output", link, "--overwrite"):
          f"--output {link} (resolves to {ckpt}) is the input checkpoint {ckpt}",
      ("gemma-to-maxnucl", "--input", dm, "--output", inputs / "dm" / "converted", "--size",
       "2b"): f"--output {inputs / 'dm' / 'converted'} lies inside the DeepMind input "
              f"checkpoint {dm} (resolves to {inputs / 'dm'})",
  }
  for args, message in runs.items():
    result = _run_cli(*args)
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
  assert {path: _tree_checksums(path) for path in before} == before
  with pytest.raises(outputs.OutputPathError, match="contains the Hugging Face input"):
    convert.hf_to_maxnucl(tmp_path / "alias" / "hf", inputs, overwrite=True)
  assert {path: _tree_checksums(path) for path in before} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "ckpt_link", "inputs"]


def test_output_path_is_checked_before_the_input_is_read(hf_dir, converted, tmp_path,
                                                         monkeypatch):
  def read(*args, **kwargs):
    raise AssertionError("the input was read before the output path was checked")

  for module, name in ((convert, "read_hf_config"), (checkpoints, "load_config"),
                       (checkpoints, "pytree_arrays")):
    monkeypatch.setattr(module, name, read)
  (tmp_path / "file").write_text("not a directory")
  output = tmp_path / "file" / "out"
  message = f"--output {output}: {tmp_path / 'file'} is not a directory"
  cfg = models.get_config("gemma2_tiny")
  for conversion in (lambda: convert.hf_to_maxnucl(hf_dir, output),
                     lambda: convert.maxnucl_to_hf(converted[0], output),
                     lambda: convert.gemma_to_maxnucl(tmp_path / "dm", output, cfg)):
    with pytest.raises(outputs.OutputPathError) as error:
      conversion()
    assert str(error.value) == message
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture(scope="module")
def medium_ckpt(tmp_path_factory):
  return interrupting.write_medium_checkpoint(tmp_path_factory.mktemp("medium") / "ckpt")


def test_killed_conversion_leaves_a_temporary_that_the_next_run_removes(medium_ckpt, tmp_path):
  output = tmp_path / "hf"
  run = interrupting.start_and_wait_until_writing(
      "convert_checkpoint.py", ["maxnucl-to-hf", "--input", medium_ckpt, "--output", output],
      output)
  run.kill()  # SIGKILL: no cleanup is possible
  assert run.wait(timeout=60) == -signal.SIGKILL
  assert len(interrupting.temporaries(output)) == 1 and not output.exists()
  convert.maxnucl_to_hf(medium_ckpt, output)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
  assert (output / "config.json").is_file()


def test_sigterm_during_conversion_removes_the_temporary_and_exits_nonzero(medium_ckpt,
                                                                           tmp_path):
  output = tmp_path / "hf"
  run = interrupting.start_and_wait_until_writing(
      "convert_checkpoint.py", ["maxnucl-to-hf", "--input", medium_ckpt, "--output", output],
      output)
  run.terminate()  # SIGTERM
  assert run.wait(timeout=60) == 128 + signal.SIGTERM
  assert list(tmp_path.iterdir()) == []


def _safetensors_state(hf_dir):
  from safetensors.torch import load_file
  return load_file(str(pathlib.Path(hf_dir) / "model.safetensors"))


def _write_hf_dir(path, hf_dir, state):
  from safetensors.numpy import save_file
  path.mkdir()
  shutil.copy(pathlib.Path(hf_dir) / "config.json", path / "config.json")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            str(path / "model.safetensors"), metadata={"format": "pt"})


def test_truncated_safetensors_file_fails_with_one_line_error(hf_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(hf_dir, broken)
  data = (broken / "model.safetensors").read_bytes()
  (broken / "model.safetensors").write_bytes(data[:len(data) - 1000])
  result = _run_cli("hf-to-maxnucl", "--input", broken, "--output", tmp_path / "out")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  assert "model.safetensors" in lines[0] and "truncated" in lines[0]
  assert "tensor model." in lines[0]  # names the tensor cut off
  assert not (tmp_path / "out").exists()


def test_missing_tensor_names_tensor(hf_dir, tmp_path):
  state = {k: v.numpy() for k, v in _safetensors_state(hf_dir).items()}
  del state["model.layers.2.mlp.up_proj.weight"]
  _write_hf_dir(tmp_path / "missing", hf_dir, state)
  result = _run_cli("hf-to-maxnucl", "--input", tmp_path / "missing", "--output",
                    tmp_path / "out")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "model.layers.2.mlp.up_proj.weight is missing" in result.stderr


def test_wrong_shape_names_tensor_and_file(hf_dir, tmp_path):
  state = {k: v.numpy() for k, v in _safetensors_state(hf_dir).items()}
  state["model.layers.1.self_attn.o_proj.weight"] = state[
      "model.layers.1.self_attn.o_proj.weight"][:, :32]
  _write_hf_dir(tmp_path / "wrong", hf_dir, state)
  with pytest.raises(convert.ConversionError,
                     match=r"model.safetensors: tensor model.layers.1.self_attn.o_proj.weight "
                           r"has shape \(48, 32\), expected \(48, 64\)"):
    convert.hf_to_maxnucl(tmp_path / "wrong", tmp_path / "out")
  state["model.layers.1.self_attn.extra.weight"] = np.zeros(3, np.float32)
  state["model.layers.1.self_attn.o_proj.weight"] = np.zeros((48, 64), np.float32)
  _write_hf_dir(tmp_path / "extra", hf_dir, state)
  with pytest.raises(convert.ConversionError, match="unexpected tensor.*self_attn.extra"):
    convert.hf_to_maxnucl(tmp_path / "extra", tmp_path / "out")
  assert not (tmp_path / "out").exists()


# ---- inspect -----------------------------------------------------------------------------------------

def test_inspect_maxnucl_and_hf_agree(converted, hf_dir):
  ckpt = converted[0]
  ours, theirs = inspect_lib.inspect_checkpoint(ckpt), inspect_lib.inspect_checkpoint(hf_dir)
  cfg, params = checkpoints.load(ckpt)
  assert ours["ffn_widths"] == theirs["ffn_widths"] == [96] * 4
  assert ours["param_counts"]["total"] == ours["param_counts"]["stored_total"]
  for i, (a, b) in enumerate(zip(ours["outgoing_entropy"], theirs["outgoing_entropy"])):
    h = ffn.row_entropy(np.asarray(params[ffn.layer_name(i)]["mlp"][ffn.OUT]))
    # the same float64 entropies of the same rows, summed in other orders (a transposed HF
    # matrix, other blocks): a row's roundings (2 d + 7, test_ffn.py) and the mean over rows
    atol = rounding_atol(magnitude(h), 2 * cfg.d_model + 7 + len(h), EPS64)
    for stats in (a, b):
      np.testing.assert_allclose([stats["mean"], stats["min"], stats["max"]],
                                 [h.mean(), h.min(), h.max()], rtol=0, atol=atol)
      assert stats["zero_rows"] == 0
  result = _run_cli("inspect", ckpt, "--json")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["ffn_widths"] == [96] * 4
  text = _run_cli("inspect", hf_dir)
  assert "model.layers.3.mlp.down_proj.weight" in text.stdout and "entropy" in text.stdout


def test_inspect_counts_zero_rows_of_pruned_layers(tmp_path):
  cfg = models.get_config("gemma2_tiny", ffn_widths=(256, 128, 0, 256))
  params = _random_params(cfg)
  params["layers_1"]["mlp"]["out"][:5] = 0.0
  checkpoints.save(tmp_path / "pruned", cfg, params)
  summary = inspect_lib.inspect_checkpoint(tmp_path / "pruned")
  assert summary["ffn_widths"] == [256, 128, 0, 256]
  assert [e["layer"] for e in summary["outgoing_entropy"]] == ["layers_0", "layers_1",
                                                                "layers_3"]
  assert summary["outgoing_entropy"][1]["zero_rows"] == 5
  # log d, the uniform row's entropy in float64: a sum of d terms and a log each (2d + 7, as above)
  log_d = np.log(cfg.d_model)
  assert summary["outgoing_entropy"][1]["max"] == pytest.approx(
      log_d, rel=0, abs=rounding_atol(log_d, 2 * cfg.d_model + 7, EPS64))


# ---- sharded restore ---------------------------------------------------------------------------

def test_load_restores_each_array_into_its_sharding(converted):
  assert len(jax.devices()) == 8
  mesh = sharding.create_mesh((2, 2, 2))
  rules = sharding.logical_axis_rules()
  cfg, sharded = checkpoints.load(converted[0], mesh=mesh, rules=rules)
  _, plain = checkpoints.load(converted[0])
  axes = models.logical_axes(cfg)
  for (key, array), (_, reference) in zip(_flat_arrays(sharded), _flat_arrays(plain)):
    node = axes
    for k in key:
      node = node[k]
    expected = NamedSharding(mesh, sharding.logical_to_spec(node, array.shape, mesh, rules))
    assert array.sharding == expected, key
    np.testing.assert_array_equal(np.asarray(array), np.asarray(reference))
  assert sharded["layers_0"]["mlp"]["out"].sharding.spec != ()  # something is really sharded


def _flat_arrays(params):
  return [(tuple(k.key for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


# ---- the streamed checkpoint format ----------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_checkpoint_is_read_by_plain_orbax(tmp_path, dtype):
  """StreamingWriter's arrays (TensorStore zarr) and hand-written metadata are what Orbax reads."""
  cfg = models.get_config("gemma2_tiny", ffn_widths=(256, 128, 0, 256))
  params = _random_params(cfg)
  with checkpoints.StreamingWriter(tmp_path / "ckpt", cfg, dtype=dtype) as writer:
    for key, array in reversed(list(_flat(params).items())):  # any order; strided views too
      writer.write(key, array.T.copy().T if array.ndim == 2 else array)
  expected = jax.tree.map(lambda x: x.astype(checkpoints.NP_DTYPES[dtype]), params)
  restored = ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt" / checkpoints.PARAMS)
  _assert_params_identical(restored, expected)
  composite = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(tmp_path / "ckpt")
  assert models.ModelConfig.from_dict(composite["model_config"]) == cfg
  _assert_params_identical(checkpoints.load(tmp_path / "ckpt")[1], expected)
  for key, array in _flat(expected).items():  # the TensorStore single-array reader, with a cast
    np.testing.assert_array_equal(checkpoints.read_array(tmp_path / "ckpt", key, "float32"),
                                  array.astype(np.float32))


def test_streamed_files_are_about_as_large_as_the_arrays(tmp_path, monkeypatch):
  """zarr v2 pads a leaf's last chunk to full size; near-equal row blocks keep that padding below
  one row per chunk, so a narrower (pruned) matrix is smaller on disk too."""
  monkeypatch.setattr(checkpoints, "_CHUNK_BYTES", 10_000)  # many chunks even for tiny arrays
  cfg = models.get_config("gemma2_tiny", ffn_widths=(256, 130, 0, 97))
  params = _random_params(cfg)
  with checkpoints.StreamingWriter(tmp_path / "ckpt", cfg, dtype="float32") as writer:
    for key, array in _flat(params).items():
      writer.write(key, array)
  for key, array in _flat(params).items():
    leaf = tmp_path / "ckpt" / checkpoints.PARAMS / ".".join(key)
    chunks = [p for p in leaf.iterdir() if not p.name.startswith(".")]
    on_disk = sum(p.stat().st_size for p in chunks)
    row_bytes = array[0].size * 4 if array.ndim else 4
    assert array.nbytes <= on_disk < array.nbytes + len(chunks) * row_bytes, (key, on_disk)
  _assert_params_identical(checkpoints.load(tmp_path / "ckpt")[1], params)


def test_truncated_chunk_names_the_array(converted, tmp_path):
  ckpt = tmp_path / "ckpt"
  shutil.copytree(converted[0], ckpt)
  leaf = ckpt / checkpoints.PARAMS / "layers_2.mlp.out"
  chunk = leaf / "0.0"
  chunk.write_bytes(chunk.read_bytes()[:-100])
  with pytest.raises(checkpoints.CheckpointError, match="layers_2.mlp.out"):
    checkpoints.read_array(ckpt, ("layers_2", "mlp", "out"))


def test_hf_axes_is_the_permutation_inside_to_hf():
  cfg = models.get_config("gemma2_tiny")
  params = _random_params(cfg)
  for path, (name, _, to_hf) in hf_gemma2.tensor_map(cfg).items():
    array = _flat(params)[path]
    expected = to_hf(array, cfg)
    np.testing.assert_array_equal(
        array.transpose(hf_gemma2.hf_axes(path)).reshape(expected.shape), expected, err_msg=name)


# ---- safetensors validated as the format's spec (and the `safetensors` library) does ---------------

def _safetensors_parts(path):
  data = path.read_bytes()
  (length,) = struct.unpack("<Q", data[:8])
  return length, json.loads(data[8:8 + length]), data[8 + length:]


def _with_header(header, body, length_delta=0):
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text) + length_delta) + text + body


def _layout_mutants(path):
  """name -> (mutated file bytes, what the one-line refusal must name besides the file)."""
  length, header, body = _safetensors_parts(path)
  data = path.read_bytes()
  norm = "model.norm.weight"
  first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
  shifted = json.loads(json.dumps(header))
  shifted[norm]["data_offsets"] = [o + 4 for o in header[norm]["data_offsets"]]
  overlapping = json.loads(json.dumps(header))
  begin, end = header[norm]["data_offsets"]
  overlapping[norm]["data_offsets"] = [begin - 4, end - 4]
  bad_metadata = {**header, "__metadata__": {"format": 1}}
  bad_shape = json.loads(json.dumps(header))
  bad_shape[first]["shape"] = "48"
  return {
      # the JSON still parses thanks to its space padding: every tensor one byte off
      "header_length_one_short": (struct.pack("<Q", length - 1) + data[8:], "not fully covered"),
      "one_byte_appended": (data + b"\0", "not fully covered"),
      "gap_before_a_tensor": (_with_header(shifted, body), norm),
      "overlapping_tensors": (_with_header(overlapping, body), norm),
      "metadata_not_strings": (_with_header(bad_metadata, body), "__metadata__"),
      "shape_not_a_list": (_with_header(bad_shape, body), first),
      "header_length_beyond_file": (struct.pack("<Q", len(data)) + data[8:], "header length"),
  }


@pytest.mark.parametrize("mutant", ["header_length_one_short", "one_byte_appended",
                                    "gap_before_a_tensor", "overlapping_tensors",
                                    "metadata_not_strings", "shape_not_a_list",
                                    "header_length_beyond_file"])
def test_safetensors_the_library_refuses_is_refused_in_one_line(hf_dir, tmp_path, mutant,
                                                                 capsys):
  bad = tmp_path / "bad"
  shutil.copytree(hf_dir, bad)
  data, named = _layout_mutants(hf_dir / "model.safetensors")[mutant]
  (bad / "model.safetensors").write_bytes(data)
  with pytest.raises(Exception):  # the reference: safetensors' own reader refuses the file
    with safetensors.safe_open(bad / "model.safetensors", framework="pt") as f:
      [f.get_tensor(k) for k in f.keys()]
  assert cli.main(["hf-to-maxnucl", "--input", str(bad), "--output", str(tmp_path / "out")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and str(bad / "model.safetensors") in lines[0] and named in lines[0], (
      lines)
  assert not (tmp_path / "out").exists()


def test_safetensors_layouts_the_library_reads_convert_identically(hf_dir, converted, tmp_path):
  """Tensors in another order in the header or the file, a header of other whitespace: the same
  checkpoint."""
  length, header, body = _safetensors_parts(hf_dir / "model.safetensors")
  names = sorted((k for k in header if k != "__metadata__"), reverse=True)
  reordered, parts, offset = {}, [], 0
  for name in names:  # data in reverse order, header in reverse order
    begin, end = header[name]["data_offsets"]
    reordered[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
    parts.append(body[begin:end])
    offset += end - begin
  other = tmp_path / "other"
  shutil.copytree(hf_dir, other)
  text = (" " + json.dumps(reordered, indent=1)).encode()
  text += b"\n" * (-len(text) % 8)
  (other / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(parts))
  with safetensors.safe_open(other / "model.safetensors", framework="pt") as f:
    assert sorted(f.keys()) == sorted(names)
  convert.hf_to_maxnucl(other, tmp_path / "out", dtype="float32")
  _assert_params_identical(checkpoints.load(tmp_path / "out")[1],
                           checkpoints.load(converted[0])[1])
