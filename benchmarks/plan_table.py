"""Which mesh, micro-batch and remat make each EDM2 recipe fit on 8 devices of 16, 40 or 80 GiB.

    python benchmarks/plan_table.py                      # every preset, SiD and SiDA, markdown tables
    python benchmarks/plan_table.py --presets xs,xxl --methods sida

For each recipe (configs/edm2.py, batch 2048) and remat setting, the memory plan's pieces (sida_jax/plan.py)
are computed once — the exact state share per device for fsdp = 1, 2, 4, 8 and the traced residuals split into
bytes per sample and a batch-independent part — and every per-device micro-batch m (a divisor of the 256
samples per device, SiDA's pool dividing the round) is sized from them. A cell gives the smallest fsdp with the
largest micro-batch that fits at that fsdp, the accumulation rounds k = 256 / m, and the per-device total.
Activations are the plan's estimate (not compiled): see docs/scaling.md for its error.
"""
from __future__ import annotations

import argparse
import os
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + [f"--xla_force_host_platform_device_count={DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
from configs import edm2 as edm2_configs  # noqa: E402
from sida_jax import plan as plan_lib  # noqa: E402
from sida_jax.train import run as run_lib  # noqa: E402
from sida_jax.train import sharding  # noqa: E402

GIB = plan_lib.GIB


def pieces(preset: str, method: str, remat: str) -> dict:
  """State shares per fsdp and the residual model of one recipe."""
  config = edm2_configs.get_config(f"{preset},{method}")
  config.remat = remat
  run = run_lib.build_run(config, teacher=plan_lib.abstract_teacher(config), with_data=False)
  state = plan_lib.state_shapes(run)
  pool = int(config.loss.adv_pool_size) if method != "sid" else 0
  model = plan_lib.residual_model(run, state, max(pool, 1))
  layouts = {f: sharding.Layout(sharding.make_mesh(DEVICES // f, f)) for f in (1, 2, 4, 8)}
  shares = {f: sum(plan_lib.state_bytes(state, run.teacher.variables, layout)[0].values())
            for f, layout in layouts.items()}
  total = sum(plan_lib.state_bytes(state, run.teacher.variables, layouts[1])[1].values())
  return dict(state=state, model=model, layouts=layouts, shares=shares, total=total, pool=pool,
              batch=run.batch_size, params=sum(int(x.size) for x in jax.tree.leaves(state.generator.params)))


def need(p: dict, fsdp: int, micro_batch: int) -> int:
  rounds = p["batch"] // (DEVICES * micro_batch)
  scratch = plan_lib.estimated_scratch(p["model"], micro_batch,
                                       plan_lib.gradient_bytes(p["state"], p["layouts"][fsdp], rounds))
  return p["shares"][fsdp] + scratch["bytes"]


def best(p: dict, gib: float) -> str:
  per_device = p["batch"] // DEVICES
  sizes = [m for m in range(per_device, 0, -1)
           if per_device % m == 0 and (not p["pool"] or (DEVICES * m) % p["pool"] == 0)]
  for fsdp in (1, 2, 4, 8):
    for m in sizes:
      total = need(p, fsdp, m)
      if total <= gib * GIB:
        return f"fsdp {fsdp} · m {m} (k {per_device // m}) · {total / GIB:.1f}"
  m = sizes[-1]
  return f"no: {need(p, 8, m) / GIB:.1f} at fsdp 8, m {m}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="xs,s,m,l,xl,xxl")
  parser.add_argument("--methods", default="sid,sida")
  parser.add_argument("--remat", default="none,blocks")
  parser.add_argument("--gib", default="16,40,80")
  args = parser.parse_args(argv)
  sizes = [float(g) for g in args.gib.split(",")]
  for remat in args.remat.split(","):
    print(f"\nremat = {remat}: smallest fsdp, largest per-device micro-batch m that fits, rounds k, GiB per "
          f"device (estimate)\n")
    print("| preset | method | params | state total GiB | state/device fsdp 1 · 8 GiB | GiB/sample (larger phase) | "
          + " | ".join(f"8 × {g:g} GiB" for g in sizes) + " |")
    print("|" + "---|" * (6 + len(sizes)))
    for preset in args.presets.split(","):
      for method in args.methods.split(","):
        p = pieces(preset, method, remat)
        per_sample = max(ph["residual_bytes_per_sample"] for ph in p["model"].values())
        cells = [best(p, g) for g in sizes]
        print(f"| {preset} | {method} | {p['params'] / 1e6:.0f} M | {p['total'] / GIB:.1f} | "
              f"{p['shares'][1] / GIB:.1f} · {p['shares'][8] / GIB:.2f} | {per_sample / GIB:.2f} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
