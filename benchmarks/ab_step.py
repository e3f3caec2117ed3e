"""A/B of one implementation choice on the SiD step, both programs in one process, timed alternately.

    python benchmarks/ab_step.py --config cifar10 --variant group_norm --rounds 3
    python benchmarks/ab_step.py --config smoke --variant attention --rounds 10

Each option of the variant is compiled (compile seconds, XLA scratch bytes, FLOPs recorded), then the
options' steps run in turn, A B A B ..., each on its own state, so a change of machine load between
rounds hits both alike; the load average is printed per round. The ratio is B's median over A's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax

import common
from sida_jax.models.edm import layers
from sida_jax.train import loop
from sida_jax.train import run as run_lib
from sida_jax.train import step as step_lib


def _set(module, name):
  def apply(value):
    setattr(module, name, value)
  return apply


# variant -> (setter, {option name: value}); the first option is the current default.
VARIANTS = {
    "group_norm": (_set(layers, "group_norm"), {"two_pass": layers.group_norm_two_pass,
                                               "one_pass": layers.group_norm_one_pass}),
}
# XLA:CPU's LLVM optimisation level for the fusions it generates (convolutions and dots are library calls
# either way): compile time against the speed of the elementwise code.
VARIANTS["xla_opt_level"] = (None, {"default": {}, "O1": {"xla_backend_optimization_level": 1},
                                    "O0": {"xla_backend_optimization_level": 0}})
# Which library runs XLA:CPU's convolutions: XNNPACK/YNNPACK fusions (the default) or XLA's own (Eigen).
VARIANTS["conv_library"] = (None, {"default": {}, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
                                    "onednn": {"xla_cpu_use_onednn": True,
                                               "xla_cpu_experimental_onednn_custom_call": True},
                                    "xnn_graph": {"xla_cpu_experimental_xnn_graph_fusion_mode":
                                                  "XNN_GRAPH_FUSION_MODE_GREEDY"}})
# XLA:CPU's runtime and scheduling: per-operation dispatch overhead matters for small networks.
VARIANTS["xla_runtime"] = (None, {"default": {}, "concurrency_scheduler": {
    "xla_cpu_enable_concurrency_optimized_scheduler": True}, "no_multi_output_fusion": {
    "xla_cpu_use_multi_output_fusion": False}})
if hasattr(layers, "attention_einsum"):
  VARIANTS["attention"] = (_set(layers, "attention"), {"einsum": layers.attention_einsum,
                                                      "fused": layers.attention_fused})


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="smoke", choices=[c for c in common.CONFIGS if c != "mnist"])
  parser.add_argument("--variant", default="group_norm", choices=sorted(VARIANTS))
  parser.add_argument("--options", default="", help="comma-separated subset (default: all, A first)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--matmul_precision", default="highest")
  args = parser.parse_args(argv)
  common.set_matmul_precision(args.matmul_precision)
  setter, options = VARIANTS[args.variant]
  names = [o for o in args.options.split(",") if o] or list(options)
  config = common.bench_config(args.config, args.dtype, args.batch or None)
  run = run_lib.build_run(config)
  batch0 = next(loop.Batches(run).iterate(0))
  programs = {}
  for name in names:
    compiler_options = options[name] if setter is None else None
    if setter is not None:
      setter(options[name])
    train_step = step_lib.make_train_step(run.spec, step_lib.make_mesh(1))
    state, teacher, batch = train_step.place(run_lib.initial_state(run), run.teacher.variables, batch0)
    load = common.load_average()
    start = time.perf_counter()
    compiled = train_step.jitted.lower(state, teacher, batch).compile(compiler_options=compiler_options)
    seconds, flops = time.perf_counter() - start, common.counted_flops(compiled)
    state, _ = common.block(compiled(state, teacher, batch))    # warm-up
    programs[name] = dict(compiled=compiled, state=state, teacher=teacher, batch=batch, times=[])
    print(f"{name}: compile {seconds:.1f} s (load {load}), XLA temp {common.temp_bytes(compiled) / common.GIB:.3f} "
          f"GiB, {flops / 1e9:.2f} GFLOP", flush=True)
  if setter is not None:
    setter(options[names[0]])
  for r in range(args.rounds):
    cells = []
    for name in names:
      p = programs[name]
      start = time.perf_counter()
      p["state"], _ = common.block(p["compiled"](p["state"], p["teacher"], p["batch"]))
      p["times"].append(time.perf_counter() - start)
      cells.append(f"{name} {p['times'][-1]:.4f} s")
    print(f"round {r}: " + ", ".join(cells) + f"; load {common.load_average()}", flush=True)
  medians = {name: statistics.median(programs[name]["times"]) for name in names}
  a = names[0]
  print(f"{args.config} {args.variant}: " + ", ".join(
      f"{name} median {m:.4f} s ({m / medians[a]:.3f}× {a})" for name, m in medians.items()))


if __name__ == "__main__":
  main()
