"""One-step generation with the weights passed as arguments (what sida_jax does) or baked into the program as
constants (what closing a jitted function over them does), each in its own process, the processes taking turns.

    python benchmarks/ab_sampling.py --config cifar10 --batch 8 --rounds 2

Per process: the first call (trace, compile, run; the persistent cache off) and the median of --repeats calls
after it, and the process's peak RSS. Prints one markdown row per process and the medians' ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("arguments", "constants")


def measure(config: str, mode: str, batch: int, repeats: int) -> dict:
  """One process's numbers (run in a child: the peak RSS is the process's)."""
  import jax  # pylint: disable=import-outside-toplevel
  import bench_sampling  # pylint: disable=import-outside-toplevel
  import common  # pylint: disable=import-outside-toplevel
  from sida_jax import sampling  # pylint: disable=import-outside-toplevel
  run, z, labels, _, _ = bench_sampling.samplers(config, batch, heun_steps=1)
  variables, generator, sigma = run.teacher.variables, run.nets.generator, run.spec.init_sigma
  if mode == "constants":
    baked = jax.jit(lambda z, y: sampling.generate(generator, variables, z, y, sigma))
    call = lambda: baked(z, labels)  # noqa: E731
  else:
    fn = sampling.with_weights(lambda v, z, y: sampling.generate(generator, v, z, y, sigma), variables)
    call = lambda: fn(z, labels)  # noqa: E731
  start = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - start
  median, _ = common.median_seconds(call, repeats, warmup=0)
  return {"mode": mode, "first_s": first, "call_s": median, "peak_rss_gib": common.peak_rss_bytes() / 2 ** 30,
          "load": os.getloadavg()[0]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="smoke")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.config, args.child, args.batch, args.repeats)))
    return
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
  rows = []
  print("| round | weights | first call s | s/call | peak RSS GiB | load |\n|---|---|---|---|---|---|")
  for r in range(args.rounds):
    for mode in MODES:
      out = subprocess.run([sys.executable, __file__, "--child", mode, "--config", args.config, "--batch",
                            str(args.batch), "--repeats", str(args.repeats)], env=env, check=True,
                           capture_output=True, text=True).stdout
      row = json.loads(out.strip().splitlines()[-1])
      rows.append(row)
      print(f"| {r} | {mode} | {row['first_s']:.2f} | {row['call_s']:.4f} | {row['peak_rss_gib']:.2f} | "
            f"{row['load']:.1f} |", flush=True)
  medians = {m: statistics.median(r["call_s"] for r in rows if r["mode"] == m) for m in MODES}
  print(f"\ns/call constants / arguments: {medians['constants'] / medians['arguments']:.3f}")


if __name__ == "__main__":
  main()
