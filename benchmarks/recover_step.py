"""The SmolLM2-135M recovery step on this machine: a pruned student trained by distillation from
its unpruned teacher (student forward + backward, teacher forward, in one jitted step) and by
plain NLL, each beside the machine's sgemm limit, with the training process's peak memory.

It reruns two recovery runs of a study output (`tools/reproduce.py --model smollm2_135m --stages
recover`, docs/recovery.md) for a few steps in temporary workdirs: the same run.gin, the same
pruned student, teacher and data, only `train_loop.num_steps` lowered and no checkpoints kept.

    python benchmarks/recover_step.py --study /tmp/maxnucl_real [--run rec_entropy_r0.5] [--steps 8]

Per mode: the median step time after the first step (compilation excluded), tokens/s (row
positions: batch x sequence length), the step's matmul FLOPs (maxnucl.flops: 3 x the student's
forward, plus the teacher's forward for distillation) as GFLOP/s and as a share of the float32
sgemm rate measured here, and the peak resident memory of the `python -m maxnucl.train`
process.  Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile

from maxnucl import checkpoints, flops

import arguments  # benchmarks/arguments.py
import smollm2_speed  # benchmarks/smollm2_speed.py: the sgemm rate

MODES = ("distill", "nll")


def run_steps(gin_file: pathlib.Path, steps: int) -> tuple[list[dict], float]:
  """The metrics of `steps` steps of the run `gin_file` in a fresh workdir, and the training
  process's peak resident memory in GiB (its own rusage, from os.wait4)."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, "-m", "maxnucl.train", f"--gin_file={gin_file}",
               f"--workdir={workdir}", f"--gin_param=train_loop.num_steps = {steps}",
               "--gin_param=train_loop.log_every = 1",
               f"--gin_param=train_loop.checkpoint_every = {steps + 1}"]
    log = pathlib.Path(workdir, "train.log")
    with open(log, "w") as out:
      child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
      _, status, usage = os.wait4(child.pid, 0)
      child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
      raise SystemExit(f"error: {' '.join(command)} failed (exit {child.returncode}):\n"
                       f"{log.read_text()[-2000:]}")
    metrics = [json.loads(line) for line in
               pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  return [m for m in metrics if "step_time_s" in m], usage.ru_maxrss / 2 ** 20  # KiB -> GiB


def gin_value(gin_text: str, name: str) -> str:
  for line in gin_text.splitlines():
    if line.startswith(f"{name} = "):
      return line.split(" = ", 1)[1].strip().strip("'\"")
  raise SystemExit(f"error: the run's gin file has no {name}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--study", required=True, type=pathlib.Path,
                      help="an output directory of tools/reproduce.py --stages recover")
  parser.add_argument("--run", default="rec_entropy_r0.5",
                      help="the runs rec_<method>_r<ratio>_{distill,nll} to time (default: "
                           "%(default)s)")
  parser.add_argument("--steps", type=arguments.at_least(3), default=8)
  args = parser.parse_args()
  gin_files = {mode: args.study / "runs" / f"{args.run}_{mode}" / "run.gin" for mode in MODES}
  for path in gin_files.values():
    if not path.is_file():
      parser.error(f"--study/--run: {path} does not exist (run the recover stage first)")
  sgemm = smollm2_speed.sgemm_flops_per_s()
  print(f"machine: {platform.processor() or platform.machine()}, float32 sgemm "
        f"{sgemm / 1e9:.0f} GFLOP/s")
  rows = []
  for mode, gin_file in gin_files.items():
    text = gin_file.read_text()
    student = checkpoints.load_config(gin_value(text, "train_loop.init_checkpoint"))
    batch = int(gin_value(text, "DATA_BATCH_SIZE"))
    seq_len = int(gin_value(text, "DATA_SEQ_LEN"))
    step_flops = flops.training_flops_per_step(student, batch, seq_len)
    if mode == "distill":
      teacher = checkpoints.load_config(checkpoints.resolve(gin_value(text, "distill.teacher")))
      step_flops += flops.forward_flops(teacher, batch, seq_len)
    metrics, peak_gib = run_steps(gin_file, args.steps)
    seconds = statistics.median(m["step_time_s"] for m in metrics[1:])
    rows.append({"mode": mode, "batch": batch, "seq_len": seq_len, "step_s": seconds,
                 "tokens_per_s": batch * seq_len / seconds,
                 "gflop_per_s": step_flops / seconds / 1e9,
                 "of_sgemm": step_flops / seconds / sgemm, "peak_rss_gib": peak_gib})
  print("| recovery | tokens a step | step (median) | tokens/s | GFLOP/s | of sgemm | "
        "peak memory |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['mode']} | {r['batch']} x {r['seq_len']} | {r['step_s']:.2f} s | "
          f"{r['tokens_per_s']:.0f} | {r['gflop_per_s']:.0f} | {r['of_sgemm']:.0%} | "
          f"{r['peak_rss_gib']:.1f} GiB |")


if __name__ == "__main__":
  main()
