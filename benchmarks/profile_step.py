"""Where the time of one SiD iteration goes, by kind of operation, from a `jax.profiler` trace.

    python benchmarks/profile_step.py --config cifar10 --steps 1
    python benchmarks/profile_step.py --config smoke --steps 3 --top 20

Compiles the benchmark step (benchmarks/common.py configs, random weights), runs one warm-up, traces
--steps steps, and sums the duration of every executed XLA operation (the CPU runtime's thunks, the GPU's
kernels' ops) by category. Each operation is classified from the optimised HLO: what its fusion contains
(convolution, dot, reduce, transpose/copy) and the JAX name stack of its metadata (the Flax module, so
GroupNorm and attention are recognised; `transpose(jvp(...))` marks the backward pass).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

import common
from sida_jax.train import loop
from sida_jax.train import run as run_lib
from sida_jax.train import step as step_lib

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?\s([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^=]*\{\s*$")


def parse_hlo(text: str) -> dict:
  """{instruction name: (opcode, op_name, opcodes inside its called computations)} of an HLO module."""
  computations, current, instructions = collections.defaultdict(list), None, {}
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    op_name = _OP_NAME.search(line)
    calls = _CALLS.findall(line)
    op_name = op_name.group(1) if op_name else ""
    computations[current].append((opcode, op_name))
    instructions[name] = (opcode, op_name, calls)

  def described(opcode, op_name, calls):
    inside = [entry for c in calls for entry in computations.get(c, ())]
    # A library fusion (e.g. XNNPACK's) carries no metadata itself: take its instructions' name stack.
    names = [n for _, n in inside if n]
    return opcode, op_name or (names[-1] if names else ""), {o for o, _ in inside}
  return {name: described(*entry) for name, entry in instructions.items()}


def classify(opcode: str, op_name: str, inside: set) -> str:
  ops = inside | {opcode}
  backward = "transpose(" in op_name
  phase = " bwd" if backward else " fwd"
  path = op_name.lower()
  if "convolution" in ops:
    # XNNPACK's fused convolutions sometimes keep no name stack: their pass is unknown.
    return "conv" + (phase if op_name else " (pass unknown)")
  if "dot" in ops:
    # The attention's einsums name themselves by their spec ('nqhc,nkhc->nhqk').
    return ("attention dot" if re.search(r"\w+,\w+->\w+", path) else "dense dot") + phase
  if re.search(r"groupnorm|/norm\d|_norm/|out_norm", path):
    return "GroupNorm" + phase
  if "softmax" in path or ("exponential" in ops and "reduce" in ops):
    return "attention softmax" + phase
  if ops & {"transpose", "copy"} and not ops & {"add", "multiply", "subtract", "divide"}:
    return "transpose/copy"
  if re.search(r"adam|optax|scale_by|ema|clip|nan_to_num|isfinite", path):
    return "optimiser/EMA"
  if "reduce" in ops:
    return "other reduce" + phase
  if ops & {"rng-bit-generator", "threefry2x32"} or "threefry" in path or "random" in path:
    return "random numbers"
  if opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
    return "bookkeeping"
  return "elementwise" + phase


def trace_events(folder: str) -> list:
  paths = sorted(glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise SystemExit(f"no perfetto trace under {folder}")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def profile(name: str, steps: int, dtype: str, batch_size, top: int, dump: str = "") -> None:
  config = common.bench_config(name, dtype, batch_size)
  run = run_lib.build_run(config)
  train_step = step_lib.make_train_step(run.spec, step_lib.make_mesh(1))
  state, teacher, batch = train_step.place(run_lib.initial_state(run), run.teacher.variables,
                                           next(loop.Batches(run).iterate(0)))
  compiled, compile_s, flops = common.compile_timed(train_step, state, teacher, batch)
  text = compiled.as_text()
  hlo = parse_hlo(text)
  state, _ = common.block(compiled(state, teacher, batch))   # warm-up
  folder = tempfile.mkdtemp(prefix="profile_step_")
  load = common.load_average()
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = common.block(compiled(state, teacher, batch))
  totals, counts, ops = collections.Counter(), collections.Counter(), collections.Counter()
  wall = 0.0
  for event in trace_events(folder):
    if event.get("ph") != "X":
      continue
    if event["name"].startswith("PjitFunction("):
      wall += event.get("dur", 0) / 1e3
    if event["name"] not in hlo:
      continue
    opcode, op_name, inside = hlo[event["name"]]
    category = classify(opcode, op_name, inside)
    ms = event.get("dur", 0) / 1e3
    totals[category] += ms
    counts[category] += 1
    ops[(event["name"], category, op_name)] += ms
  busy = sum(totals.values())
  if dump:
    os.makedirs(dump, exist_ok=True)
    with open(os.path.join(dump, f"{name}_hlo.txt"), "w") as f:
      f.write(text)
    with open(os.path.join(dump, f"{name}_ops.json"), "w") as f:
      json.dump([dict(op=op, category=c, name_stack=n, ms=ms / steps) for (op, c, n), ms in ops.most_common()], f)
  print(f"{name}, batch {config.batch_size}, {dtype}: compile {compile_s:.1f} s, {flops / 1e9:.1f} GFLOP/step, "
        f"{steps} traced steps, wall {wall / steps / 1e3:.2f} s/step, operations {busy / steps / 1e3:.2f} "
        f"s/step; load {load} before, {common.load_average()} after\n")
  print("| category | s/step | % of op time | ops/step |\n|---|---|---|---|")
  for category, ms in totals.most_common():
    print(f"| {category} | {ms / steps / 1e3:.3f} | {100 * ms / busy:.1f} | {counts[category] // steps} |")
  print(f"\nTop {top} operations:\n\n| op | category | s/step | name stack |\n|---|---|---|---|")
  for (op, category, op_name), ms in ops.most_common(top):
    print(f"| {op} | {category} | {ms / steps / 1e3:.3f} | {op_name[-90:]} |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="cifar10", choices=[c for c in common.CONFIGS if c != "mnist"])
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--matmul_precision", default="highest")
  parser.add_argument("--dump", default="", help="folder for the optimised HLO and the per-op times (JSON)")
  args = parser.parse_args(argv)
  common.set_matmul_precision(args.matmul_precision)
  profile(args.config, args.steps, args.dtype, args.batch or None, args.top, args.dump)


if __name__ == "__main__":
  main()
