"""Images/s of one-step generation (the distilled EMA generator) vs the teacher's Heun sampler.

    python benchmarks/bench_sampling.py --configs smoke --repeats 3
    python benchmarks/bench_sampling.py --configs smoke,cifar10 --heun_steps 18
    python benchmarks/bench_sampling.py --configs smoke --compare-torch --torch_python PYTHON_WITH_TORCH \
        --official-code SID_DIR --official-edm EDM_DIR --images 1000 --rounds 5

Both samplers are jitted whole, exactly as `main.py --mode sample` does (the Heun loop is unrolled: 2n−1
network calls in one program). Networks have random weights; the generator has the teacher's
architecture, so at initialisation the EMA generator's weights are the teacher's. Timing is the median
of --repeats calls after one warm-up; compile = lower + compile.

`--compare-torch` runs the official samplers instead (SiD's `sid_sampler` for one step, EDM's `edm_sampler` for
Heun; `torch_sampling.py`, in a torch environment) on the same network, batch and latents, in two processes
taking turns: one-step generation of --images images, then one Heun batch, on each side per round.
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

import bench_step
import common
from sida_jax import sampling
from sida_jax.models import convert
from sida_jax.train import run as run_lib

DEFAULT_BATCH = {"smoke": 64, "cifar10": 8, "edm2-xs": 2}
COLUMNS = (("config", "config", ""), ("sampler", "sampler", ""), ("device", "device_kind", ""),
           ("NFE", "nfe", "d"), ("batch", "batch", "d"), ("compile s", "compile_s", ".1f"),
           ("s/batch", "batch_s", ".4f"), ("images/s", "images_per_s", ".3g"),
           ("speed-up vs Heun", "speedup", ".1f"), ("GFLOP/batch", "gflop", ".2f"),
           ("load 1m", "load_1m", ".2f"))


def measure_sampling(name: str, batch_size: Optional[int] = None, heun_steps: int = 18,
                     repeats: int = 3, dtype: str = "float32") -> list:
  """Two rows (one-step generator, Heun teacher) for one benchmark config."""
  config = common.bench_config(name, dtype)
  run = run_lib.build_run(config)
  batch = batch_size or DEFAULT_BATCH.get(name, 8)
  keys = jax.random.split(jax.random.key(0))
  z = jax.random.normal(keys[0], (batch, *run.image_shape))
  label_dim = run.nets.generator.label_dim
  labels = None
  if label_dim:
    labels = jax.nn.one_hot(jax.random.randint(keys[1], (batch,), 0, label_dim), label_dim)
  variables = run.teacher.variables
  samplers = (
      ("one-step generator", 1, jax.jit(lambda v, z, y: sampling.generate(
          run.nets.generator, v, z, y, run.spec.init_sigma))),
      (f"Heun {heun_steps} steps", 2 * heun_steps - 1, jax.jit(lambda v, z, y: sampling.heun_sample(
          run.nets.teacher, v, z, y, num_steps=heun_steps))),
  )
  rows = []
  for sampler, nfe, jitted in samplers:
    load_1m = os.getloadavg()[0]
    compiled, compile_s, flops = common.compile_timed(jitted, variables, z, labels)
    batch_s, _ = common.median_seconds(lambda: compiled(variables, z, labels), repeats)
    images = np.asarray(compiled(variables, z, labels))
    rows.append(dict(config=name, sampler=sampler, device_kind=jax.devices()[0].device_kind, nfe=nfe,
                     batch=batch, compile_s=compile_s, batch_s=batch_s, images_per_s=batch / batch_s,
                     gflop=flops / 1e9, load_1m=load_1m, finite=bool(np.all(np.isfinite(images))),
                     image_shape=images.shape))
  # XLA's cost analysis counts the body of Heun's fori_loop once: count every network call instead
  # (teacher and generator share the architecture).
  rows[1]["gflop"] = rows[0]["gflop"] * rows[1]["nfe"]
  rows[0]["speedup"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
  return rows


def samplers(name: str, batch: int, heun_steps: int):
  """(variables, z, labels, one-step fn, Heun fn) of one config: jitted, on fixed latents."""
  run = run_lib.build_run(common.bench_config(name, "float32"))
  z = jax.random.normal(jax.random.key(0), (batch, *run.image_shape))
  label_dim = run.nets.generator.label_dim
  labels = jax.nn.one_hot(jax.numpy.zeros((batch,), int), label_dim) if label_dim else None   # class 0, as torch
  one_step = jax.jit(lambda v, z, y: sampling.generate(run.nets.generator, v, z, y, run.spec.init_sigma))
  heun = jax.jit(lambda v, z, y: sampling.heun_sample(run.nets.teacher, v, z, y, num_steps=heun_steps))
  return run, z, labels, one_step, heun


def serve_sampling(name: str, batch: int, images: int, heun_steps: int) -> None:
  """The JAX side of --compare-torch: compiles both samplers, prints {"ready": ...}, then answers "one_step"
  (`images` images in calls of `batch`) and "heun" (one batch) with {"seconds": s}, until "quit"."""
  run, z, labels, one_step, heun = samplers(name, batch, heun_steps)
  variables = run.teacher.variables
  compiled = {}
  for key, fn in (("one_step", one_step), ("heun", heun)):
    compiled[key], seconds, _ = common.compile_timed(fn, variables, z, labels)
    compiled[key + "_compile_s"] = seconds
  calls = -(-images // batch)

  def run_one_step():
    for _ in range(calls):
      out = compiled["one_step"](variables, z, labels)
    return common.block(out)

  run_heun = lambda: common.block(compiled["heun"](variables, z, labels))
  finite = bool(np.all(np.isfinite(np.asarray(run_one_step())))) and bool(np.all(np.isfinite(np.asarray(run_heun()))))
  say = lambda obj: print(json.dumps(obj), flush=True)
  say({"ready": True, "finite": finite, "params_m": convert.count_params(variables) / 1e6,
       "one_step_compile_s": compiled["one_step_compile_s"],
       "heun_compile_s": compiled["heun_compile_s"]})
  for line in sys.stdin:
    command = line.strip()
    if command in ("one_step", "heun"):
      start = time.perf_counter()
      (run_one_step if command == "one_step" else run_heun)()
      say({"seconds": time.perf_counter() - start})
    elif command == "quit":
      break
  say({"peak_rss_gib": common.peak_rss_bytes() / common.GIB})


def compare_torch(args: argparse.Namespace, name: str) -> list:
  """Our samplers and the official ones on one config, alternating; two rows (one step, Heun)."""
  torch_python = args.torch_python or os.environ.get("SIDA_TORCH_PYTHON", "")
  official = args.official_code or os.environ.get("SIDA_OFFICIAL_CODE", "")
  official_edm = args.official_edm or os.environ.get("SIDA_OFFICIAL_EDM", "")
  if not torch_python:
    raise common.Skip("--compare-torch needs --torch_python (or $SIDA_TORCH_PYTHON): a Python with torch")
  if not official or not official_edm:
    raise common.Skip("--compare-torch needs --official-code SID_DIR and --official-edm EDM_DIR "
                      "($SIDA_OFFICIAL_CODE, $SIDA_OFFICIAL_EDM): the official SiD and EDM code")
  if subprocess.run([torch_python, "-c", "import torch"], capture_output=True).returncode:
    raise common.Skip(f"--compare-torch: {torch_python} cannot import torch")
  batch = args.batch or DEFAULT_BATCH.get(name, 8)
  spec = dict(bench_step.torch_spec(name), batch=batch, images=args.images, heun_steps=args.heun_steps)
  here = os.path.dirname(os.path.abspath(__file__))
  load_before = common.load_average()
  jax_side = bench_step._Worker(   # pylint: disable=protected-access
      [sys.executable, os.path.abspath(__file__), "--serve", "--configs", name, "--batch", str(batch),
       "--images", str(args.images), "--heun_steps", str(args.heun_steps), "--matmul_precision",
       args.matmul_precision], bench_step._worker_env(1))   # pylint: disable=protected-access
  torch_side = bench_step._Worker(   # pylint: disable=protected-access
      [torch_python, os.path.join(here, "torch_sampling.py"), "--official-code", official, "--official-edm",
       official_edm, "--spec", json.dumps(spec)])
  times = {(side, kind): [] for side in ("jax", "torch") for kind in ("one_step", "heun")}
  loads = []
  for r in range(args.rounds):
    for kind in ("one_step", "heun"):
      times["jax", kind].append(jax_side.ask(kind)["seconds"])
      times["torch", kind].append(torch_side.ask(kind)["seconds"])
    loads.append(os.getloadavg()[0])
    print(f"# {name} round {r}: " + ", ".join(f"{side} {kind} {t[-1]:.4f} s" for (side, kind), t in times.items())
          + f"; load {loads[-1]:.2f}", file=sys.stderr, flush=True)
  jax_rss, torch_rss = jax_side.close()["peak_rss_gib"], torch_side.close()["peak_rss_gib"]
  rows = []
  for kind, images, sampler in (("one_step", -(-args.images // batch) * batch, "one-step (SiD sid_sampler)"),
                                ("heun", batch, f"Heun {args.heun_steps} steps (EDM edm_sampler)")):
    jax_s, torch_s = statistics.median(times["jax", kind]), statistics.median(times["torch", kind])
    rows.append(dict(config=name, sampler=sampler, nfe=1 if kind == "one_step" else 2 * args.heun_steps - 1,
                     batch=batch, images=images, rounds=args.rounds, compile_s=jax_side.ready[kind + "_compile_s"],
                     jax_images_per_s=images / jax_s, torch_images_per_s=images / torch_s, ratio=jax_s / torch_s,
                     jax_rss_gib=jax_rss, torch_rss_gib=torch_rss, load_before=load_before, load_max=max(loads),
                     finite=jax_side.ready["finite"] and torch_side.ready["finite"],
                     params_m=jax_side.ready["params_m"], torch_params_m=torch_side.ready["params_m"],
                     jax_times=times["jax", kind], torch_times=times["torch", kind]))
  return rows


COMPARE_COLUMNS = (("config", "config", ""), ("sampler", "sampler", ""), ("NFE", "nfe", "d"),
                   ("batch", "batch", "d"), ("images", "images", "d"), ("rounds", "rounds", "d"),
                   ("JAX compile s", "compile_s", ".1f"), ("JAX images/s", "jax_images_per_s", ".4g"),
                   ("PyTorch images/s", "torch_images_per_s", ".4g"), ("time ratio JAX/PyTorch", "ratio", ".3f"),
                   ("JAX peak RSS GiB", "jax_rss_gib", ".2f"), ("PyTorch peak RSS GiB", "torch_rss_gib", ".2f"),
                   ("load before", "load_before", ""), ("max load 1m", "load_max", ".2f"))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="smoke,cifar10", help=f"comma-separated, from {', '.join(common.CONFIGS)}")
  parser.add_argument("--batch", type=int, default=0, help="images per call (0: each config's default)")
  parser.add_argument("--heun_steps", type=int, default=18, help="Heun steps (NFE = 2n−1)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per sampler (median reported)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--matmul_precision", default="highest",
                      help="jax_default_matmul_precision (the fixtures need 'highest': fp32 math)")
  parser.add_argument("--compare-torch", action="store_true",
                      help="time the official samplers (SiD one-step, EDM Heun) against ours, alternating")
  parser.add_argument("--torch_python", default="", help="a Python with torch ($SIDA_TORCH_PYTHON)")
  parser.add_argument("--official-code", dest="official_code", default="",
                      help="the official SiD code, a checkout or git directory ($SIDA_OFFICIAL_CODE)")
  parser.add_argument("--official-edm", dest="official_edm", default="",
                      help="the official EDM code, a checkout or git directory ($SIDA_OFFICIAL_EDM)")
  parser.add_argument("--images", type=int, default=1000, help="--compare-torch: images of the one-step row")
  parser.add_argument("--rounds", type=int, default=3, help="--compare-torch: alternating rounds")
  parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  common.set_matmul_precision(args.matmul_precision)
  if args.serve:
    name = args.configs.split(",")[0]
    serve_sampling(name, args.batch or DEFAULT_BATCH.get(name, 8), args.images, args.heun_steps)
    return
  if args.compare_torch:
    rows, load_before = [], common.load_average()
    for name in [n for n in args.configs.split(",") if n]:
      try:
        rows += compare_torch(args, name)
      except common.Skip as reason:
        rows.append(dict(config=name, sampler="", skipped=str(reason)))
    print(f"Sampling, JAX (fp32, matmul precision {args.matmul_precision}) vs the official PyTorch samplers, "
          f"{args.rounds} alternating rounds after 1 warm-up each; ratio = median JAX time / median PyTorch time; "
          f"load {load_before} before, {common.load_average()} after.\n")
    print(common.markdown_table(rows, COMPARE_COLUMNS))
    return
  rows = []
  load_before = common.load_average()
  for name in [n for n in args.configs.split(",") if n]:
    try:
      rows += measure_sampling(name, args.batch or None, args.heun_steps, args.repeats, args.dtype)
    except common.Skip as reason:
      rows.append(dict(config=name, sampler="", skipped=str(reason)))
    print(f"# {name} done", file=sys.stderr, flush=True)
  print(f"Sampling on {common.device_description()}, matmul precision {args.matmul_precision}, "
        f"{args.repeats} timed calls after 1 warm-up; load average (1/5/15 min) {load_before} before, "
        f"{common.load_average()} after.\n")
  print(common.markdown_table(rows, COLUMNS))


if __name__ == "__main__":
  main()
