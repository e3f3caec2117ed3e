"""Orbax checkpoints of a distillation run, and converted networks stored as Orbax + JSON.

Layout of a workdir:
  checkpoints/<step>/{state,meta}   the whole DistillState (atomic: Orbax writes to a temporary folder and
                                    renames it on success) and a JSON with step, kimg and data position
  best/<step>/...                   the EMA generator with the best evaluation metric so far
  network.json                      class name and constructor kwargs of the generator's architecture
A converted network (`main.py --mode convert`) is a folder with `network.json` and `params/` (Orbax).
Resume order: a workdir checkpoint, else the configured teacher / generator init (`load_network`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sida_jax.formats import snapshot
from sida_jax.models import registry

NETWORK_JSON = "network.json"


def manager(directory: str, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, target: Any, step: Optional[int] = None) -> tuple:
  """(state, meta) of `step` (default: the latest), laid out like `target` (which may be abstract)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
  return out.state, out.meta


def restore_raw(directory: str, step: Optional[int] = None) -> tuple:
  """(state as nested dicts, meta) without knowing the state's structure — for sampling and evaluation.

  Every array comes back whole on this process's first device, whatever mesh and number of processes wrote it.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint folder not found: {directory}")
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          mngr.item_metadata(step)["state"])
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
  return out.state, out.meta


def write_json(path: str, data: dict) -> None:
  """Atomic JSON write (temporary file + rename), so a crash never leaves half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):   # only when dumping failed: no half-written leftovers
      os.remove(tmp)


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing file: {path}")
  with open(path) as f:
    return json.load(f)


def save_network(directory: str, class_name: str, init_kwargs: dict, variables: dict) -> None:
  """A converted network: `network.json` (architecture) + `params/` (Orbax, float32 variables)."""
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  target = os.path.join(os.path.abspath(directory), "params")
  ckptr.save(target, variables, force=True)
  ckptr.wait_until_finished()
  write_json(os.path.join(directory, NETWORK_JSON), {"class_name": class_name, "init_kwargs": init_kwargs})


def load_network_files(directory: str) -> tuple:
  """(class_name, init_kwargs, variables) of a folder written by `save_network`."""
  info = read_json(os.path.join(directory, NETWORK_JSON))
  params_dir = os.path.join(os.path.abspath(directory), "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"missing folder: {params_dir}")
  variables = ocp.StandardCheckpointer().restore(params_dir)
  return info["class_name"], info["init_kwargs"], variables


def load_network(source: str, key: str = "ema", dtype=jnp.float32) -> registry.Network:
  """A network from a snapshot `.pkl`, a folder written by `--mode convert`, or a sida_jax workdir
  (its latest EMA generator)."""
  if not source:
    raise ValueError("no network source given")
  if os.path.isfile(source):
    return snapshot.load_snapshot(source, key=key, dtype=dtype)
  if os.path.isfile(os.path.join(source, NETWORK_JSON)) and os.path.isdir(os.path.join(source, "params")):
    class_name, init_kwargs, variables = load_network_files(source)
    return registry.Network(registry.build_network(class_name, init_kwargs, dtype), variables, class_name,
                            init_kwargs)
  if os.path.isdir(os.path.join(source, "checkpoints")):
    info = read_json(os.path.join(source, NETWORK_JSON))
    state, _ = restore_raw(os.path.join(source, "checkpoints"))
    variables = {"params": state["generator_ema"], **state["generator"]["buffers"]}
    return registry.Network(registry.build_network(info["class_name"], info["init_kwargs"], dtype), variables,
                            info["class_name"], info["init_kwargs"])
  raise FileNotFoundError(f"network source not found (expected a .pkl, a converted folder or a workdir): {source}")
