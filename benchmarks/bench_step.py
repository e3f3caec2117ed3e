"""Speed and memory of one SiD distillation iteration (critic update + generator update + EMA).

    python benchmarks/bench_step.py --configs smoke --steps 5
    python benchmarks/bench_step.py --configs smoke,cifar10,edm2-xs --steps 10 --devices 1,2,4,8
    python benchmarks/bench_step.py --configs cifar10 --remat none,blocks,full --steps 3
    python benchmarks/bench_step.py --configs smoke,cifar10 --steps 5 --compare-torch \
        --torch_python PYTHON_WITH_TORCH --official-code SID_CODE_DIR

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
import statistics
import subprocess
import sys
import time
from typing import Optional

import jax
import numpy as np

import common
from sida_jax import compile_cache, host_memory
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
  host_memory.release()   # as the training loop does after building the state
  compiled, compile_s, flops = common.compile_timed(train_step, state, teacher, batch)
  rss_after_compile = common.peak_rss_bytes()
  host_memory.release()   # as the training step does between compiling and its first run
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


def serve_steps(name: str, dtype: str = "float32", batch_size: Optional[int] = None, method: str = "sid") -> None:
  """The JAX side of --compare-torch: compiles the step, prints {"ready": ...}, then runs one step per "step"
  line on stdin (printing {"seconds": s}) until "quit" (printing the peak RSS)."""
  config = common.bench_config(name, dtype, batch_size, method)
  run = run_lib.build_run(config)
  train_step = step_lib.make_train_step(run.spec, step_lib.make_mesh(1))
  state, teacher, batch = train_step.place(run_lib.initial_state(run), run.teacher.variables,
                                           next(loop.Batches(run).iterate(0)))
  host_memory.release()   # as the training loop does after building the state
  compiled, compile_s, _ = common.compile_timed(train_step, state, teacher, batch)
  host_memory.release()   # as the training step does between compiling and its first run
  start = time.perf_counter()
  state, _ = common.block(compiled(state, teacher, batch))
  say = lambda obj: print(json.dumps(obj), flush=True)
  say({"ready": True, "compile_s": compile_s, "warmup_s": time.perf_counter() - start,
       "params_m": convert.count_params(run.teacher.variables) / 1e6})
  for line in sys.stdin:
    if line.strip() == "quit":
      break
    start = time.perf_counter()
    state, _ = common.block(compiled(state, teacher, batch))
    say({"seconds": time.perf_counter() - start})
  say({"peak_rss_gib": common.peak_rss_bytes() / common.GIB})


def torch_spec(name: str, batch_size: Optional[int] = None, method: str = "sid") -> dict:
  """What benchmarks/torch_step.py needs to build the same SiD iteration with the official code."""
  if name not in ("smoke", "cifar10", "ddpmpp-tiny"):
    raise common.Skip(f"--compare-torch: config {name!r} has no official SiD (EDM) counterpart here; "
                      "use smoke, cifar10 or ddpmpp-tiny")
  config = common.bench_config(name, "float32", batch_size)
  network = dict(config.network.kwargs)
  network = {k: list(v) if isinstance(v, tuple) else v for k, v in network.items()}
  network["dropout"] = 0.0
  spec = dict(network=network, batch=config.batch_size, alpha=config.loss.alpha, tmax=config.loss.tmax,
              init_sigma=config.init_sigma, lr=config.optim.generator_lr)
  if method == "sida":
    loss = common.bench_config(name, "float32", batch_size, "sida").loss
    spec.update(alpha=loss.alpha, lsd=loss.discriminator_scale, lsg_gan=loss.adversarial_scale)
  return spec


class _Worker:
  """A step-serving process speaking the one-JSON-object-per-line protocol."""

  def __init__(self, command, env=None, timeout=3600):
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
    self.timeout = timeout
    self.ready = self.read()

  def read(self) -> dict:
    for line in self.process.stdout:
      line = line.strip()
      if line.startswith("{"):
        return json.loads(line)
    err = self.process.stderr.read().strip().splitlines()
    raise common.Skip(err[-1] if err else f"worker exited with {self.process.wait()}")

  def ask(self, command: str) -> dict:
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return self.read()

  def close(self) -> dict:
    out = self.ask("quit")
    self.process.wait(self.timeout)
    return out


def compare_torch(args: argparse.Namespace, name: str) -> dict:
  """The JAX step and the official PyTorch step on the same config, run alternately in two processes
  (JAX, PyTorch, JAX, ...): a change of machine load hits both. Returns the row, or raises Skip."""
  torch_python = args.torch_python or os.environ.get("SIDA_TORCH_PYTHON", "")
  official = args.official_code or os.environ.get("SIDA_OFFICIAL_CODE", "")
  if not torch_python:
    raise common.Skip("--compare-torch needs --torch_python (or $SIDA_TORCH_PYTHON): a Python with torch")
  if not official:
    raise common.Skip("--compare-torch needs --official-code DIR (or $SIDA_OFFICIAL_CODE): the official SiD code")
  check = subprocess.run([torch_python, "-c", "import torch"], capture_output=True, text=True)
  if check.returncode:
    raise common.Skip(f"--compare-torch: {torch_python} cannot import torch")
  method = args.method
  spec = torch_spec(name, args.batch or None, method)
  here = os.path.dirname(os.path.abspath(__file__))
  jax_command = [sys.executable, os.path.abspath(__file__), "--serve", "--method", method, "--configs", name,
                 "--dtype", "float32",
                 "--matmul_precision", args.matmul_precision] + (["--batch", str(args.batch)] if args.batch else [])
  load_before = common.load_average()
  jax_side = _Worker(jax_command, _worker_env(1), args.timeout)   # compiled before PyTorch starts
  torch_side = _Worker([torch_python, os.path.join(here, "torch_step.py"), "--official-code", official,
                        "--method", method, "--spec", json.dumps(spec)], timeout=args.timeout)
  jax_times, torch_times, loads = [], [], []
  for r in range(args.steps):
    jax_times.append(jax_side.ask("step")["seconds"])
    torch_times.append(torch_side.ask("step")["seconds"])
    loads.append(os.getloadavg()[0])
    print(f"# {name} round {r}: jax {jax_times[-1]:.4f} s, torch {torch_times[-1]:.4f} s, load {loads[-1]:.2f}",
          file=sys.stderr, flush=True)
  jax_rss, torch_rss = jax_side.close()["peak_rss_gib"], torch_side.close()["peak_rss_gib"]
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  return dict(config=name if method == "sid" else f"{name} {method}", method=method, batch=spec["batch"],
              params_m=jax_side.ready["params_m"],
              torch_params_m=torch_side.ready["params_m"], torch_version=torch_side.ready["torch"],
              compile_s=jax_side.ready["compile_s"], jax_s=jax_s, torch_s=torch_s, ratio=jax_s / torch_s,
              jax_rss_gib=jax_rss, torch_rss_gib=torch_rss, rss_ratio=jax_rss / torch_rss,
              torch_threads=torch_side.ready["threads"], rounds=args.steps, load_before=load_before,
              load_max=max(loads), jax_times=jax_times, torch_times=torch_times)


COMPARE_COLUMNS = (("config", "config", ""), ("params", "params_m", ".2f"), ("batch", "batch", "d"),
                   ("rounds", "rounds", "d"), ("JAX compile s", "compile_s", ".1f"), ("JAX s/step", "jax_s", ".4f"),
                   ("PyTorch s/step", "torch_s", ".4f"), ("ratio JAX/PyTorch", "ratio", ".3f"),
                   ("JAX peak RSS GiB", "jax_rss_gib", ".2f"), ("PyTorch peak RSS GiB", "torch_rss_gib", ".2f"),
                   ("RSS ratio", "rss_ratio", ".2f"), ("torch threads", "torch_threads", "d"),
                   ("load before", "load_before", ""), ("max load 1m", "load_max", ".2f"))


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
             "--matmul_precision", args.matmul_precision, "--remat", remat, "--fsdp", str(args.fsdp),
             "--compile_cache", getattr(args, "compile_cache", "off")]
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
  parser.add_argument("--compare-torch", action="store_true",
                      help="also run the official PyTorch step (needs --torch_python and --official-code), "
                           "alternating with ours; prints the ratio")
  parser.add_argument("--torch_python", default="", help="a Python with torch ($SIDA_TORCH_PYTHON)")
  parser.add_argument("--official-code", dest="official_code", default="",
                      help="the official SiD code, a checkout or git directory ($SIDA_OFFICIAL_CODE)")
  parser.add_argument("--compile_cache", default="off",
                      help="JAX's persistent compilation cache for the rows: 'off' (cold compiles, the default) "
                           "or a folder (a second run of the same row loads its step from there)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--method", default="sid", choices=("sid", "sida"),
                      help="--compare-torch: the SiD or the SiDA iteration (sida: 32×32×3 configs, e.g. cifar10)")
  parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  names = [n for n in args.configs.split(",") if n]
  device_counts = [int(d) for d in args.devices.split(",") if d]
  unknown = [n for n in names if n not in common.CONFIGS]
  if unknown:
    raise SystemExit(f"--configs: unknown config {unknown[0]!r}; expected {', '.join(common.CONFIGS)}")
  if args.serve:
    common.set_matmul_precision(args.matmul_precision)
    serve_steps(names[0], args.dtype, args.batch or None, args.method)
    return
  if args.compare_torch:
    rows = []
    for name in names:
      try:
        rows.append(compare_torch(args, name))
      except common.Skip as reason:
        rows.append(dict(config=name, skipped=str(reason)))
        print(f"# {name}: skipped: {reason}", file=sys.stderr, flush=True)
    print(f"{dict(sid='SiD', sida='SiDA')[args.method]} iteration, JAX (fp32, matmul precision "
          f"{args.matmul_precision}) vs the official PyTorch code, "
          f"{args.steps} alternating rounds after 1 warm-up each; ratio = median JAX / median PyTorch.\n")
    print(common.markdown_table(rows, COMPARE_COLUMNS))
    return
  if args.worker:
    common.set_matmul_precision(args.matmul_precision)
    compile_cache.enable(args.compile_cache)
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
