"""Orbax checkpoints of a distillation run, and converted networks stored as Orbax + JSON.

Layout of a workdir:
  checkpoints/<step>/{state,meta}   the whole DistillState (atomic: Orbax writes to a temporary folder and
                                    renames it on success) and a JSON with step, kimg, image count and batch
  checkpoints-unreadable/<step>     checkpoints found unreadable on a resume, set aside (never deleted)
  best/<step>/...                   the EMA generator with the best evaluation metric so far
  network.json                      class name and constructor kwargs of the generator's architecture
A converted network (`main.py --mode convert`) is a folder with `network.json` and `params/` (Orbax).
Resume order: a workdir checkpoint, else the configured teacher / generator init (`load_network`).

Restores read the newest checkpoint that can be read: an unreadable one (a truncated or missing file, a
structure that does not match) is named in one warning and the previous one is tried; only when none can be
read is it an error (`CheckpointError`). Arrays are always restored with shardings built on the current
devices (never the ones recorded at save time), so a checkpoint written on 8 devices restores on 1.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sida_jax.formats import snapshot
from sida_jax.models import registry

NETWORK_JSON = "network.json"
UNREADABLE = "-unreadable"   # suffix of the folder next to `checkpoints` holding set-aside checkpoints
TMP_MARK = ".orbax-checkpoint-tmp"   # in the name of Orbax's folder for a save in progress


class CheckpointError(ValueError):
  """No checkpoint of a folder can be read."""


# Replica-parallel writing lets the hosts holding copies of a replicated array write a slice each. It compiles
# one small slicing program per (array shape, device) on a process's first save: 960 compiles and 40 s
# for 120 replicated arrays on 8 devices. In one process there is one writer anyway, so it is off; over
# several hosts it is kept for slices of at least this size, where splitting the write pays for the compile.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 4 << 20


_configured_for: Optional[int] = None   # the process count the registered jax.Array handler was made for


def configure_array_writes() -> None:
  """Registers (once per process, for every Orbax save in it) how `jax.Array`s are written. Called by each
  writer of this module, after JAX knows its process count."""
  global _configured_for  # pylint: disable=global-statement
  if _configured_for == jax.process_count():
    return
  multi_host = jax.process_count() > 1
  try:   # Orbax's default handler keeps per-host array metadata; its module is not part of the public API
    from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=import-outside-toplevel
    from orbax.checkpoint._src.serialization import type_handler_registry  # pylint: disable=import-outside-toplevel
    store, registry = array_metadata_store.Store(), type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY
  except ImportError:
    store, registry = None, None
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=store, use_replica_parallel=multi_host,
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES if multi_host else None)
  if registry is not None:   # without Orbax's warning that a handler is replaced (runs promise one-line warnings)
    registry.add(jax.Array, handler, override=True, ignore_warnings=True)
  else:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  _configured_for = jax.process_count()


def _handlers() -> dict:
  configure_array_writes()
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def remove_interrupted_saves(directory: str) -> list:
  """Deletes the temporary folders (`<step>.orbax-checkpoint-tmp-*`) of saves that never finished."""
  names = sorted(n for n in os.listdir(directory) if TMP_MARK in n) if os.path.isdir(directory) else []
  for name in names:
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    logging.info("removed %s, left by an interrupted save", os.path.join(directory, name))
  return names


def manager(directory: str, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
  """The writer's manager; opening it removes what interrupted saves left behind (first process only)."""
  if jax.process_index() == 0:
    remove_interrupted_saves(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=_handlers())


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def _reason(error: BaseException) -> str:
  """The first line of the error's root cause (TensorStore wraps the useful part), short enough for one line."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = (lines[0] if lines else "").split(" [tensorstore_spec=")[0]
  return f"{type(error).__name__}: {text[:200]}{'…' if len(text) > 200 else ''}"


def _newest_readable(mngr: ocp.CheckpointManager, read: Callable[[int], Any], step: Optional[int]) -> Any:
  """read(step) of `step`, or of the newest step that can be read (one warning per unreadable one)."""
  directory = str(mngr.directory)
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  failures = []
  for s in steps:
    try:
      return read(s)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read means: try the previous one)
      failures.append(f"{os.path.join(directory, str(s))} ({_reason(e)})")
      if s != steps[-1]:
        logging.warning("checkpoint %s cannot be read (%s); falling back to the previous one",
                        os.path.join(directory, str(s)), _reason(e))
  raise CheckpointError(f"no readable checkpoint in {directory}: {failures[0]}"
                        + (f" and {len(failures) - 1} older" if len(failures) > 1 else ""))


def restore(mngr: ocp.CheckpointManager, target: Any, step: Optional[int] = None) -> tuple:
  """(state, meta) of `step` (default: the newest readable), laid out like `target` (concrete or abstract
  arrays; their shardings are the ones restored into)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)

  def read(s):
    out = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                  meta=ocp.args.JsonRestore()))
    return out.state, out.meta
  return _newest_readable(mngr, read, step)


def set_aside_newer(mngr: ocp.CheckpointManager, step: int) -> list:
  """Moves the checkpoints after `step` (found unreadable) to `<directory>-unreadable/`, so that training
  from `step` can write those steps again. Returns the steps moved."""
  directory = str(mngr.directory)
  newer = sorted(s for s in mngr.all_steps() if s > step)
  for s in newer:
    target = os.path.join(directory + UNREADABLE, str(s))
    if os.path.exists(target):
      shutil.rmtree(target)
    os.makedirs(directory + UNREADABLE, exist_ok=True)
    os.replace(os.path.join(directory, str(s)), target)
    logging.warning("set aside unreadable checkpoint %s in %s", s, directory + UNREADABLE)
  if newer:
    mngr.reload()
  return newer


def restore_raw(directory: str, step: Optional[int] = None, sharding: Optional[jax.sharding.Sharding] = None
                ) -> tuple:
  """(state as nested dicts, meta) of the newest readable checkpoint (or `step`) without knowing the state's
  structure — for sampling and evaluation. Arrays land on `sharding` (default: this process's first device)
  whatever the device count they were saved from."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint folder not found: {directory}")
  mngr = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False),
                               item_handlers=_handlers())
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def read(s):
    saved = mngr.item_metadata(s)["state"]
    if saved is None:
      raise FileNotFoundError(f"no state metadata in {os.path.join(directory, str(s))}")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved.tree)
    out = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                  meta=ocp.args.JsonRestore()))
    return out.state, out.meta
  return _newest_readable(mngr, read, step)


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
  configure_array_writes()
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


def load_network(source: str, key: str = "ema", dtype=jnp.float32,
                 like: Optional[registry.Network] = None) -> registry.Network:
  """A network from a snapshot `.pkl`, an official SiD `training-state-*.pt`, a folder written by
  `--mode convert`, or a sida_jax workdir (its latest EMA generator).

  `like` (the teacher) gives the architecture of training states that store only a state_dict.
  """
  if not source:
    raise ValueError("no network source given")
  if os.path.isfile(source):
    return snapshot.load_snapshot(source, key=key, dtype=dtype, like=like)
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
  raise FileNotFoundError(f"network source not found (expected a .pkl or .pt, a converted folder or a workdir): "
                          f"{source}")
