"""The accelerator suite: SiD steps and one-step sampling at training sizes, as one markdown table.

    bash benchmarks/device_suite.sh                 # GPU/TPU: the full suite (minutes)
    bash benchmarks/device_suite.sh --smoke         # any machine, CPU included: tiny networks, same code path

Rows (full): the SiD step of CIFAR-10 DDPM++ (55.7M) at batch 64 and 256 in float32 and bfloat16, EDM2-XS
and EDM2-S at batch 32 (bfloat16), and one-step generation of 1,000 CIFAR-10 images. Every step row runs in
its own process (`bench_step.py --worker`), so its peak device memory is its own. Columns: images/s
(generated images per second: the official kimg counter), MFU = XLA-counted FLOP/s over the device's
datasheet peak for the row's dtype (dense, `PEAK_TFLOPS`; on a device not in the table, over a large jnp.dot
measured in the same process, marked 'matmul'), peak device memory (`memory_stats()`, GPU/TPU; peak RSS on
CPU) and compile seconds. float32 rows use matmul precision 'highest' (true fp32, the precision of the golden
tests), measured against the fp32 peak; bfloat16 rows use 'default' against the bf16 tensor peak.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import common
import bench_step

# Dense datasheet peaks in TFLOP/s: (substring of jax's device_kind, bf16, fp32 without tensor cores).
# First match wins, so more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),
    ("H200", 989.4, 66.9),
    ("GH200", 989.4, 66.9),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
    ("V100", None, 15.7),
    ("TPU v6", 918.0, None),
    ("TPU v5 lite", 197.0, None),
    ("TPU v5e", 197.0, None),
    ("TPU v5", 459.0, None),
    ("TPU v4", 275.0, None),
)

FULL_STEPS = (("cifar10", 64, "float32"), ("cifar10", 64, "bfloat16"), ("cifar10", 256, "float32"),
              ("cifar10", 256, "bfloat16"), ("edm2-xs", 32, "bfloat16"), ("edm2-s", 32, "bfloat16"))
SMOKE_STEPS = (("ddpmpp-tiny", 4, "float32"), ("edm2-tiny", 4, "bfloat16"))   # both families, both dtypes
FULL_SAMPLING = ("cifar10", 1000, 250, "float32")     # config, images, batch, dtype
SMOKE_SAMPLING = ("ddpmpp-tiny", 16, 8, "float32")

COLUMNS = (("row", "row", ""), ("device", "device_kind", ""), ("params M", "params_m", ".1f"),
           ("batch", "batch", "d"), ("dtype", "dtype", ""), ("compile s", "compile_s", ".1f"),
           ("s/step or s/call", "step_s", ".5g"), ("images/s", "images_per_s", ".4g"),
           ("GFLOP/step", "gflop", ".1f"), ("TFLOP/s", "tflops", ".2f"), ("MFU %", "mfu", ".1f"),
           ("peak source", "peak_source", ""), ("peak memory GiB", "memory_gib", ".2f"))


def device_peak_tflops(device_kind: str, dtype: str):
  """The datasheet dense peak of `device_kind` for `dtype` in TFLOP/s, or None when unknown."""
  for name, bf16, fp32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def with_mfu(row: dict) -> dict:
  """Adds TFLOP/s, MFU and where the peak came from to a measured row."""
  if row.get("skipped"):
    return row
  row["tflops"] = row["gflop"] / row["step_s"] / 1e3
  peak = device_peak_tflops(row.get("device_kind", ""), row["dtype"])
  if peak is not None:
    row["mfu"], row["peak_source"] = 100 * row["tflops"] / peak, f"datasheet {peak:g}"
  elif row.get("peak_gflops"):
    row["mfu"], row["peak_source"] = 100 * row["tflops"] * 1e3 / row["peak_gflops"], "matmul"
  row["memory_gib"] = row.get("device_peak_gib") or row.get("peak_rss_gib")
  return row


def step_row(name: str, batch: int, dtype: str, steps: int, timeout: int) -> dict:
  args = argparse.Namespace(steps=steps, dtype=dtype, batch=batch, fsdp=1, timeout=timeout,
                            matmul_precision="highest" if dtype == "float32" else "default")
  row = bench_step.run_row(args, name, 1)
  row.update(row=f"SiD step {name}", batch=batch, dtype=dtype)
  return with_mfu(row)


def sampling_worker(name: str, images: int, batch: int, dtype: str) -> dict:
  """One-step generation of `images` images in calls of `batch` (the EMA generator of a random-weight run)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sida_jax import sampling  # pylint: disable=import-outside-toplevel
  from sida_jax.models import convert  # pylint: disable=import-outside-toplevel
  from sida_jax.train import run as run_lib  # pylint: disable=import-outside-toplevel
  common.set_matmul_precision("highest" if dtype == "float32" else "default")
  run = run_lib.build_run(common.bench_config(name, dtype))
  z = jax.random.normal(jax.random.key(0), (batch, *run.image_shape))
  label_dim = run.nets.generator.label_dim
  labels = jax.nn.one_hot(jax.numpy.arange(batch) % label_dim, label_dim) if label_dim else None
  variables = run.teacher.variables
  generate = jax.jit(lambda v, z, y: sampling.generate(run.nets.generator, v, z, y, run.spec.init_sigma))
  compiled, compile_s, flops = common.compile_timed(generate, variables, z, labels)
  common.block(compiled(variables, z, labels))
  calls = -(-images // batch)
  start = time.perf_counter()
  for _ in range(calls):
    out = compiled(variables, z, labels)
  common.block(out)
  seconds = time.perf_counter() - start
  device_peak = common.device_peak_bytes()
  return dict(device_kind=jax.devices()[0].device_kind, params_m=convert.count_params(variables) / 1e6,
              compile_s=compile_s, step_s=seconds, images_per_s=calls * batch / seconds, gflop=flops * calls / 1e9,
              peak_gflops=common.matmul_peak_flops() / 1e9,
              device_peak_gib=None if device_peak is None else device_peak / common.GIB,
              peak_rss_gib=common.peak_rss_bytes() / common.GIB, finite=bool(np.all(np.isfinite(out))))


def sampling_row(name: str, images: int, batch: int, dtype: str, timeout: int) -> dict:
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  command = [sys.executable, os.path.abspath(__file__), "--sampling_worker", f"{name},{images},{batch},{dtype}"]
  head = dict(row=f"one-step sampling {name}, {images} images", batch=batch, dtype=dtype)
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=bench_step._worker_env(1))
  except subprocess.TimeoutExpired:
    return dict(head, skipped=f"did not finish within {timeout} s")
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    errors = done.stderr.strip().splitlines()
    return dict(head, skipped=errors[-1] if errors else f"exit {done.returncode}")
  return with_mfu(dict(head, **json.loads(lines[-1])))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny networks, one step: proves the suite runs")
  parser.add_argument("--steps", type=int, default=0, help="timed steps per row (default 5; --smoke 1)")
  parser.add_argument("--timeout", type=int, default=0, help="seconds per row (default 300; --smoke 600)")
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  parser.add_argument("--sampling_worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.sampling_worker:
    import json  # pylint: disable=import-outside-toplevel
    name, images, batch, dtype = args.sampling_worker.split(",")
    print(json.dumps(sampling_worker(name, int(images), int(batch), dtype)))
    return
  steps = args.steps or (1 if args.smoke else 5)
  timeout = args.timeout or (600 if args.smoke else 300)
  started, load = time.time(), common.load_average()
  rows = []
  for name, batch, dtype in (SMOKE_STEPS if args.smoke else FULL_STEPS):
    rows.append(step_row(name, batch, dtype, steps, timeout))
    print(f"# {rows[-1]['row']} b{batch} {dtype}: {rows[-1].get('skipped') or 'done'}", file=sys.stderr, flush=True)
  rows.append(sampling_row(*(SMOKE_SAMPLING if args.smoke else FULL_SAMPLING), timeout))
  print(f"# {rows[-1]['row']}: {rows[-1].get('skipped') or 'done'}", file=sys.stderr, flush=True)
  minutes = (time.time() - started) / 60
  table = (f"Device suite{' (--smoke)' if args.smoke else ''}: {steps} timed steps per row after 1 warm-up, "
           f"{minutes:.1f} min in all; load average {load} before, {common.load_average()} after.\n\n"
           + common.markdown_table(rows, COLUMNS))
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")
  if any(r.get("skipped") for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  main()
