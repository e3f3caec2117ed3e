"""Memory of one SiD step with config.remat = none | blocks | full, on one device at a tiny batch.

    python benchmarks/remat_memory.py                                   # smoke DDPM++ and a small EDM2, batch 2
    python benchmarks/remat_memory.py --configs cifar10,edm2-xs --timeout 3600

Each (config, remat) compiles in its own process, so its peak RSS is its own. Columns: XLA temp = the compiled
step's `memory_analysis().temp_size_in_bytes` (the activation scratch: what remat changes); peak RSS = the
process's high-water mark after compiling and one step; compile and step seconds (indicative only on a loaded
machine: `uptime` is printed with them). Networks have random weights (benchmarks/common.py).
'edm2-small' is the EDM2-XS architecture (channel_mult 1-2-3-4, attention at 16 and 8) at 32×32×4 with 64
channels, 2 blocks per level and 10 classes: compiles in a fraction of XS's time on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
from sida_jax.models.edm2 import networks as edm2  # noqa: E402
from sida_jax.train import loop  # noqa: E402
from sida_jax.train import run as run_lib  # noqa: E402
from sida_jax.train import step as step_lib  # noqa: E402

CONFIGS = ("smoke", "cifar10", "edm2-small", "edm2-xs")


def config_for(name: str, batch: int):
  if name == "edm2-small":
    config = common.bench_config("edm2-xs", batch_size=batch)
    config.network.kwargs = dict(edm2.preset_config("xs"), img_resolution=32, model_channels=64, num_blocks=2,
                                 label_dim=10)
    return config
  return common.bench_config(name, batch_size=batch)


def measure(name: str, remat: str, batch: int) -> dict:
  config = config_for(name, batch)
  config.remat = remat
  run = run_lib.build_run(config)
  mesh = step_lib.make_mesh(1)
  train_step = step_lib.make_train_step(run.spec, mesh)
  args = train_step.place(run_lib.initial_state(run), run.teacher.variables, next(loop.Batches(run).iterate(0)))
  start = time.perf_counter()
  compiled = train_step.jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  step_s = time.perf_counter() - start
  return dict(config=name, remat=remat, batch=batch, xla_temp_mib=memory.temp_size_in_bytes / 2**20,
              xla_argument_mib=memory.argument_size_in_bytes / 2**20,
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              compile_s=compile_s, step_s=step_s, load=os.getloadavg()[0])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="smoke,edm2-small")
  parser.add_argument("--remat", default="none,blocks,full")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per row")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(measure(args.configs, args.remat, args.batch)), flush=True)
    return
  print("| config | remat | batch | XLA temp MiB | arguments MiB | peak RSS MiB | compile s | step s | load (1 min) |")
  print("|---|---|---|---|---|---|---|---|---|", flush=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  for name in args.configs.split(","):
    for remat in args.remat.split(","):
      command = [sys.executable, __file__, "--worker", "--configs", name, "--remat", remat,
                 "--batch", str(args.batch)]
      try:
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, check=True)
      except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as error:
        print(f"| {name} | {remat} | {args.batch} | failed: {type(error).__name__} |", flush=True)
        continue
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"| {name} | {remat} | {r['batch']} | {r['xla_temp_mib']:.1f} | {r['xla_argument_mib']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['compile_s']:.1f} | {r['step_s']:.2f} | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
