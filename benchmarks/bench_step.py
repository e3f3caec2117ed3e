"""Speed and memory of one SiD distillation iteration (critic update + generator update + EMA).

    python benchmarks/bench_step.py --configs smoke --steps 5
    python benchmarks/bench_step.py --configs smoke,cifar10,edm2-xs --steps 10 --devices 1,2,4,8
    python benchmarks/bench_step.py --configs cifar10 --remat none,blocks,full --steps 3

Prints a markdown table, one row per (config, device count). Each row runs in its own process, so its peak
RSS is its own and XLA_FLAGS can give it exactly the requested number of fake CPU devices (set before
that process imports JAX; on GPU/TPU the real devices are used). Networks have random weights.
Columns: compile = lower + compile of the jitted step; step = median wall time of --steps calls after
one warm-up; images/s = batch / step (the images counted by the official kimg counter); GFLOP = XLA's
cost analysis of the step summed over devices; % peak = achieved FLOP/s over a float32 jnp.dot measured
in the same process at the same matmul precision.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

import jax
import numpy as np

import common
from sida_jax.models import convert
from sida_jax.train import loop
from sida_jax.train import run as run_lib
from sida_jax.train import step as step_lib

COLUMNS = (("config", "config", ""), ("device", "device_kind", ""), ("params", "params_m", ".2f"),
           ("batch", "batch", "d"), ("devices", "devices", "d"), ("fsdp", "fsdp", "d"), ("remat", "remat", ""),
           ("dtype", "dtype", ""),
           ("compile s", "compile_s", ".1f"), ("step s", "step_s", ".4f"), ("images/s", "images_per_s", ".3g"),
           ("peak RSS GiB", "peak_rss_gib", ".2f"), ("peak RSS to compile GiB", "peak_rss_compile_gib", ".2f"),
           ("RSS after steps GiB", "rss_steady_gib", ".2f"), ("XLA temp GiB", "xla_temp_gib", ".2f"),
           ("device peak GiB", "device_peak_gib", ".2f"),
           ("GFLOP/step", "gflop", ".2f"), ("GFLOP/s", "achieved_gflops", ".1f"),
           ("matmul peak GFLOP/s", "peak_gflops", ".1f"), ("% peak", "percent_of_peak", ".1f"),
           ("load 1m", "load_1m", ".2f"))


def measure_step(name: str, steps: int = 10, devices: int = 1, dtype: str = "float32",
                 batch_size: Optional[int] = None, remat: str = "none", fsdp: int = 1) -> dict:
  """Compiles and times the shared train step of one benchmark config on `devices` devices (`fsdp` of them
  sharding the state), with `remat` of the generator phase."""
  config = common.bench_config(name, dtype, batch_size)
  config.remat = remat
  if jax.device_count() < devices:
    raise common.Skip(f"{devices} devices requested, {jax.device_count()} available")
  if config.batch_size % devices:
    raise common.Skip(f"batch {config.batch_size} does not split over {devices} devices")
  load_1m = os.getloadavg()[0]
  run = run_lib.build_run(config)
  train_step = step_lib.make_train_step(run.spec, step_lib.make_mesh(devices, fsdp))
  state, teacher, batch = train_step.place(run_lib.initial_state(run), run.teacher.variables,
                                           next(loop.Batches(run).iterate(0)))
  compiled, compile_s, flops = common.compile_timed(train_step, state, teacher, batch)
  rss_after_compile = common.peak_rss_bytes()
  carried = {"state": state}

  def one_step():
    # The state is donated: each call consumes the previous call's output.
    carried["state"], carried["metrics"] = compiled(carried["state"], teacher, batch)
    return carried["state"], carried["metrics"]

  step_s, times = common.median_seconds(one_step, steps)
  metrics = jax.device_get(carried["metrics"])
  peak = common.matmul_peak_flops()
  total_flops = flops * devices   # the cost analysis counts one device's program
  device_peak = common.device_peak_bytes()
  scratch = common.temp_bytes(compiled)
  return dict(
      config=name, device_kind=jax.devices()[0].device_kind, platform=jax.default_backend(),
      params_m=convert.count_params(run.teacher.variables) / 1e6, batch=config.batch_size,
      devices=devices, fsdp=fsdp, remat=remat, dtype=dtype,
      matmul_precision=str(jax.config.jax_default_matmul_precision),
      compile_s=compile_s, step_s=step_s, step_times=times, images_per_s=config.batch_size / step_s,
      peak_rss_gib=common.peak_rss_bytes() / common.GIB,
      peak_rss_compile_gib=rss_after_compile / common.GIB,
      rss_steady_gib=common.current_rss_bytes() / common.GIB,
      xla_temp_gib=None if scratch is None else scratch / common.GIB,
      device_peak_gib=None if device_peak is None else device_peak / common.GIB,
      gflop=total_flops / 1e9, achieved_gflops=total_flops / step_s / 1e9, peak_gflops=peak / 1e9,
      percent_of_peak=100 * total_flops / step_s / peak, load_1m=load_1m,
      finite=bool(all(np.all(np.isfinite(v)) for v in metrics.values())),
      losses={k: float(v) for k, v in metrics.items() if k.startswith("loss")})


def _worker_env(devices: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def run_row(args: argparse.Namespace, name: str, devices: int, remat: str = "none") -> dict:
  """One row in a fresh process (own peak RSS, own fake device count); failures become skipped rows."""
  command = [sys.executable, os.path.abspath(__file__), "--worker", "--configs", name,
             "--devices", str(devices), "--steps", str(args.steps), "--dtype", args.dtype,
             "--matmul_precision", args.matmul_precision, "--remat", remat, "--fsdp", str(args.fsdp)]
  if args.batch:
    command += ["--batch", str(args.batch)]
  try:
    done = subprocess.run(command, env=_worker_env(devices), capture_output=True, text=True,
                          timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return dict(config=name, devices=devices, remat=remat, skipped=f"did not finish within {args.timeout} s")
  lines = done.stdout.strip().splitlines()
  if done.returncode == 0 and lines:
    return json.loads(lines[-1])
  if done.returncode in (-9, 137):
    return dict(config=name, devices=devices, remat=remat, skipped="killed (out of memory?)")
  errors = done.stderr.strip().splitlines()
  return dict(config=name, devices=devices, remat=remat,
              skipped=errors[-1] if errors else f"exit {done.returncode}")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="smoke,mnist,cifar10,edm2-xs",
                      help=f"comma-separated, from {', '.join(common.CONFIGS)}")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
  parser.add_argument("--devices", default="1", help="comma-separated device counts, e.g. 1,2,4,8")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: each config's default)")
  parser.add_argument("--matmul_precision", default="highest",
                      help="jax_default_matmul_precision (the fixtures need 'highest': fp32 math)")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds per row")
  parser.add_argument("--remat", default="none", help="comma-separated config.remat values: none,blocks,full")
  parser.add_argument("--fsdp", type=int, default=1, help="devices sharding the state (config.mesh.fsdp)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  names = [n for n in args.configs.split(",") if n]
  device_counts = [int(d) for d in args.devices.split(",") if d]
  unknown = [n for n in names if n not in common.CONFIGS]
  if unknown:
    raise SystemExit(f"--configs: unknown config {unknown[0]!r}; expected {', '.join(common.CONFIGS)}")
  if args.worker:
    common.set_matmul_precision(args.matmul_precision)
    try:
      row = measure_step(names[0], args.steps, device_counts[0], args.dtype, args.batch or None,
                         args.remat, args.fsdp)
    except common.Skip as reason:
      row = dict(config=names[0], devices=device_counts[0], remat=args.remat, skipped=str(reason))
    print(json.dumps(row))
    return
  rows = []
  load_before = common.load_average()
  for name in names:
    for devices in device_counts:
      for remat in [r for r in args.remat.split(",") if r]:
        rows.append(run_row(args, name, devices, remat))
        row = rows[-1]
        outcome = row.get("skipped") or f"{row['step_s']:.4f} s/step"
        print(f"# {name} x{devices} remat {remat}: {outcome}", file=sys.stderr, flush=True)
  print(f"SiD iteration, {args.steps} timed steps after 1 warm-up, matmul precision "
        f"{args.matmul_precision}; load average (1/5/15 min) {load_before} before, "
        f"{common.load_average()} after.\n")
  print(common.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
  main()
