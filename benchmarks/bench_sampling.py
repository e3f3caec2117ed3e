"""Images/s of one-step generation (the distilled EMA generator) vs the teacher's Heun sampler.

    python benchmarks/bench_sampling.py --configs smoke --repeats 3
    python benchmarks/bench_sampling.py --configs smoke,cifar10 --heun_steps 18

Both samplers are jitted whole, exactly as `main.py --mode sample` does (the Heun loop is unrolled: 2n−1
network calls in one program). Networks have random weights; the generator has the teacher's
architecture, so at initialisation the EMA generator's weights are the teacher's. Timing is the median
of --repeats calls after one warm-up; compile = lower + compile.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import jax
import numpy as np

import common
from sida_jax import sampling
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


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="smoke,cifar10", help=f"comma-separated, from {', '.join(common.CONFIGS)}")
  parser.add_argument("--batch", type=int, default=0, help="images per call (0: each config's default)")
  parser.add_argument("--heun_steps", type=int, default=18, help="Heun steps (NFE = 2n−1)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per sampler (median reported)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--matmul_precision", default="highest",
                      help="jax_default_matmul_precision (the fixtures need 'highest': fp32 math)")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  common.set_matmul_precision(args.matmul_precision)
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
