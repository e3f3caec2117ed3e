"""The ('data', 'fsdp') mesh and the sharding rules: -1 resolution, clear errors, the largest divisible axis,
the size threshold, and per-device byte counts that equal what placed arrays really hold."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sida_jax.train import sharding


@pytest.mark.parametrize("data,fsdp,devices,expected", [(-1, 1, 8, (8, 1)), (2, -1, 8, (2, 4)),
                                                        (-1, 4, 8, (2, 4)), (1, 8, 8, (1, 8)), (-1, 1, 1, (1, 1))])
def test_mesh_shape_resolves_the_remaining_devices(data, fsdp, devices, expected):
  assert sharding.mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize("data,fsdp,message", [(3, -1, "do not split into groups of 3"),
                                               (2, 2, r"data × fsdp = 2 × 2 = 4 but there are 8 devices"),
                                               (-1, -1, "at most one"), (0, 8, "mesh.data=0")])
def test_mesh_shape_errors_name_the_problem(data, fsdp, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(data, fsdp, 8)


def test_make_mesh_puts_devices_process_by_process():
  mesh = sharding.make_mesh(2, -1)
  assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (2, 4)
  ids = [d.id for d in mesh.devices.reshape(-1)]
  assert ids == sorted(ids)


@pytest.mark.parametrize("shape,fsdp,threshold,expected", [
    ((3, 3, 64, 128), 4, 0, 3),       # the largest divisible axis
    ((128, 64), 4, 0, 0),
    ((64, 64), 4, 0, 0),              # ties: the first
    ((3, 5, 7), 4, 0, None),          # nothing divisible: replicated
    ((64, 64), 4, 64 * 64 + 1, None),  # under the threshold: replicated
    ((64, 64), 1, 0, None),           # no fsdp axis
    ((6, 8), 4, 0, 1),                # the largest axis (6) is not divisible; the next one is
])
def test_fsdp_axis(shape, fsdp, threshold, expected):
  assert sharding.fsdp_axis(shape, fsdp, threshold) == expected


def test_placed_shards_hold_what_the_byte_count_says():
  mesh = sharding.make_mesh(2, 4)
  layout = sharding.Layout(mesh, min_shard_size=100)
  tree = {"big": jnp.ones((6, 40), jnp.float32), "small": jnp.ones((3, 3), jnp.float32),
          "odd": jnp.ones((5, 27), jnp.bfloat16), "count": jnp.zeros((), jnp.int32)}
  placed = layout.place(tree)
  assert layout.spec((6, 40)) == P(None, "fsdp")
  assert placed["big"].addressable_shards[0].data.shape == (6, 10)
  for name in ("small", "odd", "count"):
    assert placed[name].addressable_shards[0].data.shape == tree[name].shape
  first = placed["big"].sharding.mesh.devices.reshape(-1)[0]
  on_first = sum(s.data.nbytes for x in jax.tree.leaves(placed) for s in x.addressable_shards if s.device == first)
  assert sharding.bytes_per_device(tree, layout) == on_first == 6 * 10 * 4 + 9 * 4 + 5 * 27 * 2 + 4
  assert sharding.total_bytes(tree) == 6 * 40 * 4 + 9 * 4 + 5 * 27 * 2 + 4
  # Shapes alone give the same numbers (the memory plan).
  shapes = jax.eval_shape(lambda: tree)
  assert sharding.bytes_per_device(shapes, layout) == on_first
  np.testing.assert_array_equal(np.asarray(placed["big"]), np.ones((6, 40)))
