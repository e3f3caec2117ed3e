"""`--mode plan`: the memory one device needs for a config and mesh, without running the model.

State (exact): the parameters of generator and critic, both Adam states, the EMA and the frozen teacher, from
`jax.eval_shape` of the run's initial state and the sharding rules of `train/sharding.py` (the ones the step
runs with): what one device holds (`state_bytes_per_device`) and the unsharded whole (`state_bytes_total`).
Nothing is allocated and no weight file is read when the architecture is known without it (a converted
folder's network.json, the published EDM2 teacher names, `config.network`, or a text-to-image pipeline folder,
whose config.json files are enough). Text-to-image runs also hold the frozen text encoder (placed by the same
rules, in the compute dtype) and the VAE (float32, whole on the device that decodes): both are counted.

Step scratch (activations, gathered weights, gradients), one of:
  compiled  `config.plan.compile=True`: XLA's count for the compiled step on this machine's devices,
            `memory_analysis().temp_size_in_bytes` (per device). Compiling EDM2-XS on CPU takes minutes.
  estimate  the default: what JAX's autodiff keeps for the backward pass of each phase (the residuals of
            `jax.vjp` of the phase's objective, traced with `jax.eval_shape`, no compile) for the per-device
            micro-batch m — activations and the weights and weight transforms the backward pass reads (with
            fsdp > 1 the gathered copies) — for the larger phase, plus the trained network's gradient share
            (and the accumulator with grad_accum > 1). Tracing at 2m as well splits them into bytes per
            sample and a batch-independent part (plan.json), to size other micro-batches.
            It leaves out XLA's buffer reuse and the transient peak inside one layer; docs/scaling.md
            compares it with compiled numbers. Tracing EDM2-XXL twice takes ~20 s on a CPU.
  none      `config.plan.estimate=False`: the state alone (EDM2-XXL in about a second).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from sida_jax import checkpoint, text_to_image
from sida_jax.models import convert, registry
from sida_jax.models.edm2 import networks as edm2
from sida_jax.train import run as run_lib
from sida_jax.train import sharding
from sida_jax.train import step as step_lib
from sida_jax.train import t2i

GIB = 1 << 30
PLAN_JSON = "plan.json"
# The published EDM2 snapshots are named edm2-img512-SIZE-KIMG-EMA.pkl (configs/edm2.py).
EDM2_SNAPSHOT = re.compile(r"edm2-img\d+-(xs|s|m|l|xl|xxl)-\d+-[\d.]+\.pkl$")


def abstract_teacher(config: ml_collections.ConfigDict) -> registry.Network:
  """The teacher's module with ShapeDtypeStruct variables, from its architecture alone where possible."""
  source, dtype = config.teacher, run_lib.compute_dtype(config.dtype)
  match = EDM2_SNAPSHOT.search(os.path.basename(source)) if source else None
  if not source:
    class_name, kwargs = config.network.class_name, config.network.kwargs.to_dict()
  elif os.path.isfile(os.path.join(source, checkpoint.NETWORK_JSON)):
    info = checkpoint.read_json(os.path.join(source, checkpoint.NETWORK_JSON))
    class_name, kwargs = info["class_name"], info["init_kwargs"]
  elif match:
    class_name, kwargs = "Precond", edm2.preset_config(match.group(1))
  elif os.path.isfile(source):
    logging.info("plan: reading %s for its architecture", source)
    net = checkpoint.load_network(source, key=config.teacher_key, dtype=dtype)
    class_name, kwargs = net.class_name, net.init_kwargs
  else:
    raise FileNotFoundError(f"config.teacher: file not found: {source}")
  module = registry.build_network(class_name, kwargs, dtype)
  variables = convert.variables_template(module)
  return registry.Network(module, variables, class_name, dict(kwargs))


def abstract_run(config: ml_collections.ConfigDict) -> run_lib.Run:
  """The run of `config` built from shapes alone (no weights read, no data opened)."""
  if t2i.is_pipeline_folder(config.teacher):
    pipeline = text_to_image.read_pipeline(config.teacher, run_lib.compute_dtype(config.dtype), denoiser=True,
                                           weights=False)
    return t2i.build_run(config, pipeline=pipeline, with_data=False)
  return run_lib.build_run(config, teacher=abstract_teacher(config), with_data=False)


def _with_teacher(run: run_lib.Run, variables: Any) -> run_lib.Run:
  return dataclasses.replace(run, teacher=dataclasses.replace(run.teacher, variables=variables))


def state_shapes(run: run_lib.Run):
  """The DistillState of `run` as ShapeDtypeStructs (SiD²A's generator has the teacher's architecture)."""
  run = dataclasses.replace(run, generator_init="")
  return jax.eval_shape(lambda t: run_lib.initial_state(_with_teacher(run, t)), run.teacher.variables)


def batch_shapes(run: run_lib.Run, batch_size: int) -> dict:
  """ShapeDtypeStructs of one iteration's host batch (what `loop.Batches` yields)."""
  phase = {}
  if run.method.uses_real_images:
    phase["images"] = jax.ShapeDtypeStruct((batch_size, *run.image_shape), jnp.float32)
  if run.text is not None:   # text-to-image: the text encoder's condition (after `Run.device_batch`)
    phase["labels"] = run.text.condition_shapes(batch_size)
  elif run.nets.generator.label_dim:
    phase["labels"] = jax.ShapeDtypeStruct((batch_size, run.nets.generator.label_dim), jnp.float32)
  return {"critic": phase, "generator": dict(phase)}


def _nbytes(tree: Any) -> int:
  """Bytes of a tree of arrays or shapes; PRNG keys (dropout keys among a vjp's residuals) count as their data."""
  is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return sharding.total_bytes([jax.eval_shape(jax.random.key_data, x) if is_key(x) else x
                               for x in jax.tree.leaves(tree)])


def residual_bytes(run: run_lib.Run, state, samples: int) -> dict:
  """Bytes of the residuals autodiff keeps between forward and backward, per phase, for `samples` samples."""
  # remat='full' (jax.checkpoint around the generator objective) keeps nothing between the passes, but the
  # backward pass recomputes the objective and then keeps all of it: the same peak as without it.
  spec = dataclasses.replace(run.spec, batch_size=samples, grad_accum=1, checkpoint_generator_objective=False)
  found = {}

  def probe(state, teacher, batch, draws):
    key = jax.random.key(0)
    critic = step_lib.critic_objective(spec, state, teacher, (batch["critic"], draws["critic"]), key)
    _, critic_vjp, _ = jax.vjp(critic, state.critic.params, has_aux=True)
    generator = step_lib.generator_objective(spec, state, state.critic.variables, teacher,
                                             (batch["generator"], draws["generator"]), key)
    _, generator_vjp, _ = jax.vjp(generator, state.generator.params, has_aux=True)
    found["critic"], found["generator"] = _nbytes(critic_vjp), _nbytes(generator_vjp)
    return jnp.zeros(())

  draws = jax.eval_shape(lambda: step_lib.sample_draws(spec, jax.random.key(0)))
  jax.eval_shape(probe, state, run.teacher.variables, batch_shapes(run, samples), draws)
  return found


def residual_model(run: run_lib.Run, state, micro_batch: int) -> dict:
  """Per phase: the residual bytes at micro-batch m and, from a second trace at 2m, their split into bytes
  per sample and a batch-independent part (weights and weight transforms the backward pass reads)."""
  at_m, at_2m = residual_bytes(run, state, micro_batch), residual_bytes(run, state, 2 * micro_batch)
  phases = {}
  for phase in at_m:
    per_sample = (at_2m[phase] - at_m[phase]) // micro_batch
    phases[phase] = {"residual_bytes_per_sample": per_sample,
                     "batch_independent_bytes": at_m[phase] - per_sample * micro_batch}
  return phases


def gradient_bytes(state, layout: sharding.Layout, grad_accum: int) -> int:
  """The trained network's gradient share (two with accumulation: the sum and one round's gradient)."""
  share = max(sharding.bytes_per_device(p, layout) for p in (state.generator.params, state.critic.params))
  return share * (2 if grad_accum > 1 else 1)


def estimated_scratch(model: dict, micro_batch: int, gradients: int) -> dict:
  """The scratch estimate at a per-device micro-batch from `residual_model`'s split."""
  phases = {name: dict(p, bytes=p["batch_independent_bytes"] + p["residual_bytes_per_sample"] * micro_batch)
            for name, p in model.items()}
  largest = max(phases, key=lambda p: phases[p]["bytes"])
  return {"source": "estimate: autodiff residuals (jax.eval_shape of jax.vjp), not compiled",
          "phases": phases, "largest_phase": largest, "gradient_bytes": gradients,
          "bytes": phases[largest]["bytes"] + gradients}


def state_bytes(state, teacher_variables, layout: sharding.Layout, text: Any = None) -> tuple:
  """(bytes per device, bytes in total, replicated bytes per device) of parameters (with buffers), optimizer
  states, EMA and teacher, and with a text side (`text_to_image.TextConditioning`) its text encoder (placed by
  the layout's rules) and VAE (whole, on the device that decodes)."""
  parts = {"teacher": teacher_variables,
           "parameters": (state.generator.params, state.generator.buffers, state.critic.params,
                          state.critic.buffers),
           "optimizer": (state.generator.opt_state, state.critic.opt_state),
           "ema": state.generator_ema}
  if text is not None:
    parts["text_encoder"] = text.text_encoder.variables
  per_device = {k: sharding.bytes_per_device(v, layout) for k, v in parts.items()}
  totals = {k: sharding.total_bytes(v) for k, v in parts.items()}
  replicated = sum(_nbytes(x) for x in jax.tree.leaves(parts) if layout.spec(x.shape) == jax.sharding.PartitionSpec())
  if text is not None:
    per_device["vae"] = totals["vae"] = _nbytes(text.vae.variables)
    replicated += per_device["vae"]
  return per_device, totals, int(replicated)


def compiled_scratch(run: run_lib.Run, state, layout: sharding.Layout) -> dict:
  """XLA's temp bytes per device of the whole compiled step (minutes on CPU)."""
  train_step = step_lib.make_train_step(run.spec, layout.mesh, layout.min_shard_size)

  def placed(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)
  batch = batch_shapes(run, run.batch_size)
  args = (placed(state, layout.shardings(state)),
          placed(run.teacher.variables, layout.shardings(run.teacher.variables)),
          placed(batch, jax.tree.map(lambda _: layout.batch, batch)))
  memory = train_step.jitted.lower(*args).compile().memory_analysis()
  return {"source": "compiled: XLA memory_analysis temp_size_in_bytes",
          "bytes": int(memory.temp_size_in_bytes),
          "argument_bytes": int(memory.argument_size_in_bytes), "output_bytes": int(memory.output_size_in_bytes),
          "alias_bytes": int(memory.alias_size_in_bytes),
          "generated_code_bytes": int(memory.generated_code_size_in_bytes)}


def make_plan(config: ml_collections.ConfigDict, scratch: bool = True) -> dict:
  """The memory plan of `config` on this machine's device count (fake devices are fine without compiling).
  `scratch=False` sizes the held arrays only (the step scratch is then marked not estimated, 0 bytes)."""
  run = abstract_run(config)
  layout = run.layout()
  state = state_shapes(run)
  per_device, totals, replicated = state_bytes(state, run.teacher.variables, layout, run.text)
  micro_batch = run.batch_size // (layout.batch_shards * run.spec.grad_accum)
  if not scratch:
    scratch = {"source": "not estimated", "bytes": 0}
  elif config.plan.compile:
    scratch = compiled_scratch(run, state, layout)
  elif not config.plan.estimate:
    scratch = {"source": "left out (config.plan.estimate=False): the verdict is on the state alone", "bytes": 0}
  else:
    scratch = estimated_scratch(residual_model(run, state, micro_batch), micro_batch,
                                gradient_bytes(state, layout, run.spec.grad_accum))
  held = sum(per_device.values())
  total = held + scratch["bytes"]
  data, fsdp = layout.mesh.shape[sharding.DATA], layout.mesh.shape[sharding.FSDP]
  counts = {"teacher": convert.count_params(run.teacher.variables),
            "generator": convert.count_params({"params": state.generator.params}),
            "critic": convert.count_params({"params": state.critic.params})}
  if run.text is not None:
    counts.update(text_encoder=convert.count_params(run.text.text_encoder.variables),
                  vae=convert.count_params(run.text.vae.variables))
  return {
      "recipe": config.get("recipe", ""), "method": config.method, "teacher_class": run.class_name,
      "parameter_count": counts,
      "devices": int(layout.mesh.devices.size), "mesh": {"data": int(data), "fsdp": int(fsdp)},
      "min_shard_size": layout.min_shard_size, "dtype": config.dtype, "remat": config.remat,
      "batch_size": run.batch_size, "grad_accum": run.spec.grad_accum,
      "per_device_batch": run.batch_size // layout.batch_shards, "per_device_micro_batch": micro_batch,
      "bytes_per_device": per_device, "bytes_total": totals,
      "state_bytes_per_device": int(held), "state_bytes_total": int(sum(totals.values())),
      "replicated_bytes_per_device": int(replicated),
      "scratch": scratch, "scratch_bytes_per_device": int(scratch["bytes"]),
      "total_bytes_per_device": int(total), "device_gib": float(config.plan.device_gib),
      "fits": bool(total <= config.plan.device_gib * GIB),
  }


def human(nbytes: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if nbytes >= size:
      return f"{nbytes / size:.2f} {unit}"
  return f"{int(nbytes)} B"


def table(plan: dict) -> str:
  """The plan as a small text table (per device and in total)."""
  rows = [f"{'':22s}{'per device':>12s}{'total':>12s}"]
  row = lambda name, device, total="": rows.append(f"{name:22s}{device:>12s}{total:>12s}")
  for name in ("parameters", "optimizer", "ema", "teacher", "text_encoder", "vae"):
    if name in plan["bytes_per_device"]:
      row(name.replace("_", " "), human(plan["bytes_per_device"][name]), human(plan["bytes_total"][name]))
  row("state", human(plan["state_bytes_per_device"]), human(plan["state_bytes_total"]))
  row("  of which replicated", human(plan["replicated_bytes_per_device"]))
  row("step scratch", human(plan["scratch_bytes_per_device"]))
  rows[-1] += f"   {plan['scratch']['source']}"
  row("total", human(plan["total_bytes_per_device"]))
  mesh = plan["mesh"]
  rows.append(f"{plan['recipe'] or plan['method']} on {plan['devices']} devices, mesh data={mesh['data']} × "
              f"fsdp={mesh['fsdp']}, batch {plan['batch_size']} = {plan['per_device_batch']} per device "
              f"({plan['grad_accum']} rounds of {plan['per_device_micro_batch']}), remat {plan['remat']}: "
              f"{'fits' if plan['fits'] else 'does NOT fit'} in {plan['device_gib']:g} GiB")
  return "\n".join(rows)


def plan(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode plan`: writes workdir/plan.json and prints the table."""
  result = make_plan(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, PLAN_JSON), result)
  print(table(result), flush=True)
  return result
