"""The device mesh ('data', 'fsdp') and where every array of a distillation run lives on it.

Mesh: `data` × `fsdp` devices (`config.mesh`; -1 on one axis takes the devices left over). The default,
all devices on 'data' and fsdp = 1, is plain data parallelism with every array of the state replicated.

  batch       split over both axes: every device trains on its own samples (the batch axes).
  parameters  generator, critic, their Adam moments, the EMA and the frozen teacher: each leaf is split
              along 'fsdp' on its largest axis whose size 'fsdp' divides (fully sharded data parallelism),
              and replicated along 'data'. Leaves under `min_shard_size` elements (biases, gains, scalars,
              counters, the key) and leaves without a divisible axis stay replicated: splitting them saves
              nothing and costs a collective each.

The rules look at shapes only, so they apply as well to abstract trees (`jax.eval_shape`): the memory plan
(`sida_jax/plan.py`) uses exactly the shardings the step runs with.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
MIN_SHARD_SIZE = 1 << 14     # elements; smaller leaves stay replicated


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple:
  """(data, fsdp) with a -1 resolved to the devices left over; a clear error when they do not fit."""
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data and fsdp may be -1")
  for name, size in (("data", data), ("fsdp", fsdp)):
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{name}={size}: expected a positive size or -1 (the remaining devices)")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices do not split into groups of {known}")
    return (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
  if data * fsdp != num_devices:
    raise ValueError(f"config.mesh: data × fsdp = {data} × {fsdp} = {data * fsdp} but there are "
                     f"{num_devices} devices")
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all, process by process so that each process owns
  a contiguous block of the batch)."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  shape = mesh_shape(data, fsdp, len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), BATCH_AXES)


def fsdp_axis(shape: Sequence[int], fsdp: int, min_shard_size: int = MIN_SHARD_SIZE) -> Optional[int]:
  """The axis a leaf of this shape is split along (its largest axis divisible by `fsdp`; the first of
  equals), or None when it stays replicated."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_shard_size:
    return None
  candidates = [a for a, n in enumerate(shape) if n % fsdp == 0]
  if not candidates:
    return None
  return max(candidates, key=lambda a: (shape[a], -a))


def param_spec(shape: Sequence[int], fsdp: int, min_shard_size: int = MIN_SHARD_SIZE) -> P:
  axis = fsdp_axis(shape, fsdp, min_shard_size)
  if axis is None:
    return P()
  return P(*([None] * axis), FSDP)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and the sharding rules of this module, for trees of arrays or of shapes."""
  mesh: Mesh
  min_shard_size: int = MIN_SHARD_SIZE

  @property
  def fsdp(self) -> int:
    return self.mesh.shape[FSDP]

  @property
  def batch_shards(self) -> int:
    """How many parts the batch is split into (every device of the mesh)."""
    return self.mesh.shape[DATA] * self.mesh.shape[FSDP]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch(self) -> NamedSharding:
    """Leading (sample) axis split over every device."""
    return NamedSharding(self.mesh, P(BATCH_AXES))

  @property
  def rounds(self) -> NamedSharding:
    """[rounds, samples, ...]: accumulation rounds one after the other, samples split over every device."""
    return NamedSharding(self.mesh, P(None, BATCH_AXES))

  def spec(self, shape: Sequence[int]) -> P:
    return param_spec(shape, self.fsdp, self.min_shard_size)

  def shardings(self, tree: Any) -> Any:
    """NamedShardings of a state, parameter or teacher tree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: NamedSharding(self.mesh, self.spec(np.shape(x))), tree)

  def place(self, tree: Any) -> Any:
    """Puts a tree (host values, equal on every process, or arrays already placed) where the rules say."""
    return jax.device_put(tree, self.shardings(tree))

  def constrain(self, tree: Any) -> Any:
    """Inside jit: pins a tree to its sharding (gradients: the reduce-scatter onto the parameter shards)."""
    return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

  def gather(self, tree: Any) -> Any:
    """Inside jit: the whole of every leaf on every device (the all-gather before a network uses it)."""
    if self.fsdp == 1:
      return tree
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: self.replicated, tree))

  def split_batch(self, tree: Any) -> Any:
    """Inside jit: pins leading sample axes to the batch sharding."""
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: self.batch, tree))


def bytes_per_device(tree: Any, layout: Layout) -> int:
  """Bytes one device holds of a tree (arrays or shapes) laid out by `layout`."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape, itemsize = np.shape(leaf), np.dtype(leaf.dtype).itemsize
    size = int(np.prod(shape, dtype=np.int64)) * itemsize
    total += size // layout.fsdp if layout.spec(shape) != P() else size
  return total


def total_bytes(tree: Any) -> int:
  return sum(int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
