"""checkpoint: Orbax round trips of a nested state, raw restores, atomic JSON, converted networks; falling back
from unreadable checkpoints, interrupted saves cleaned up, restores onto other device counts."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax import checkpoint

# TensorStore reports each failed read of a damaged checkpoint once more, from a callback into Orbax's closed
# event loop, as an unraisable "Event loop is closed" (main.py keeps it off stderr).
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return {"step": jnp.asarray(7, jnp.int32),
          "generator": {"params": {"conv": {"weight": jnp.asarray(rng.normal(size=(4, 3, 3, 3)), jnp.float32),
                                            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}},
                        "gain": jnp.asarray(rng.normal(), jnp.float32)},
          "rng": jnp.asarray(rng.integers(0, 2 ** 32, size=(2,), dtype=np.uint32)),
          "ema": [jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16), jnp.asarray(rng.normal(size=(2, 2)))]}


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype and np.shape(x) == np.shape(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip_is_exact(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=2)
  for step in (4, 8, 12):
    checkpoint.save(mngr, step, _state(step), {"step": step, "kimg": step * 0.008})
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [8, 12]   # max_to_keep
  state, meta = checkpoint.restore(mngr, _state(0))
  _assert_same(state, _state(12))
  assert meta == {"step": 12, "kimg": 12 * 0.008}
  state, meta = checkpoint.restore(mngr, jax.eval_shape(lambda: _state(0)), step=8)
  _assert_same(state, _state(8))
  assert meta["step"] == 8
  raw, raw_meta = checkpoint.restore_raw(str(tmp_path / "ckpt"))
  assert raw_meta["step"] == 12
  np.testing.assert_array_equal(raw["generator"]["params"]["conv"]["weight"],
                                _state(12)["generator"]["params"]["conv"]["weight"])
  np.testing.assert_array_equal(np.asarray(raw["ema"][0], np.float32),
                                np.asarray(_state(12)["ema"][0], np.float32))
  raw, _ = checkpoint.restore_raw(str(tmp_path / "ckpt"), step=8)
  np.testing.assert_array_equal(raw["generator"]["gain"], _state(8)["generator"]["gain"])


def test_restore_errors(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint.restore(mngr, _state())
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint.restore_raw(str(tmp_path / "empty"))
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoint.restore_raw(missing)


def test_write_json_is_atomic(tmp_path):
  path = str(tmp_path / "a.json")
  checkpoint.write_json(path, {"b": 1, "a": [1.5, "x"], "f": np.float32(2)})
  assert checkpoint.read_json(path) == {"a": [1.5, "x"], "b": 1, "f": "2.0"}
  circular = {"x": 1}
  circular["self"] = circular
  with pytest.raises(ValueError):
    checkpoint.write_json(path, circular)
  assert checkpoint.read_json(path)["b"] == 1          # the old file is untouched
  assert os.listdir(tmp_path) == ["a.json"]            # and no partial temporary file is left
  with pytest.raises(ValueError):
    checkpoint.write_json(str(tmp_path / "new.json"), circular)
  assert os.listdir(tmp_path) == ["a.json"]
  with pytest.raises(FileNotFoundError, match="missing file: .*missing.json"):
    checkpoint.read_json(str(tmp_path / "missing.json"))


def test_save_network_round_trip_and_missing_files(tmp_path):
  variables = {"params": _state(3)["generator"]["params"],
               "buffers": {"map_noise": {"freqs": jnp.arange(4, dtype=jnp.float32)}}}
  kwargs = {"img_resolution": 16, "channel_mult": [1, 2], "sigma_max": float("inf")}
  folder = str(tmp_path / "net")
  checkpoint.save_network(folder, "training.networks.EDMPrecond", kwargs, variables)
  checkpoint.save_network(folder, "training.networks.EDMPrecond", kwargs, variables)   # overwrites
  class_name, init_kwargs, restored = checkpoint.load_network_files(folder)
  assert class_name == "training.networks.EDMPrecond"
  assert init_kwargs == kwargs
  _assert_same(restored, variables)
  with open(os.path.join(folder, checkpoint.NETWORK_JSON)) as f:
    assert json.load(f)["class_name"] == class_name
  os.rename(os.path.join(folder, "params"), os.path.join(folder, "moved"))
  with pytest.raises(FileNotFoundError, match="missing folder: .*params"):
    checkpoint.load_network_files(folder)
  with pytest.raises(FileNotFoundError, match=f"missing file: .*{checkpoint.NETWORK_JSON}"):
    checkpoint.load_network_files(str(tmp_path / "empty"))


def _saved(tmp_path, steps=(4, 8)):
  directory = str(tmp_path / "ckpt")
  mngr = checkpoint.manager(directory, max_to_keep=3)
  for step in steps:
    checkpoint.save(mngr, step, _state(step), {"step": step})
  mngr.wait_until_finished()
  return directory, mngr


def _truncate_largest(folder):
  files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_an_unreadable_newest_checkpoint_falls_back_with_one_warning(tmp_path, caplog, damage):
  directory, mngr = _saved(tmp_path)
  if damage == "truncate":
    _truncate_largest(os.path.join(directory, "8", "state"))
  else:
    os.remove(os.path.join(directory, "8", "state", "manifest.ocdbt"))
  with caplog.at_level(logging.WARNING):
    state, meta = checkpoint.restore(mngr, _state(0))
  _assert_same(state, _state(4))
  assert meta == {"step": 4}
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "cannot be read" in
              r.getMessage()]
  assert len(warnings) == 1 and os.path.join(directory, "8") in warnings[0] and "\n" not in warnings[0]
  raw, meta = checkpoint.restore_raw(directory)                       # sampling and evaluation do the same
  assert meta["step"] == 4
  np.testing.assert_array_equal(raw["generator"]["gain"], _state(4)["generator"]["gain"])
  with pytest.raises(checkpoint.CheckpointError, match="/8 "):
    checkpoint.restore(mngr, _state(0), step=8)                       # a pinned step does not fall back
  assert checkpoint.set_aside_newer(mngr, 4) == [8]                   # training from 4 may write 8 again
  assert mngr.all_steps() == [4]
  assert os.path.isdir(directory + checkpoint.UNREADABLE + "/8")
  checkpoint.save(mngr, 8, _state(9), {"step": 8})
  mngr.wait_until_finished()
  _assert_same(checkpoint.restore(mngr, _state(0))[0], _state(9))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  directory, mngr = _saved(tmp_path)
  for step in ("4", "8"):
    os.remove(os.path.join(directory, step, "state", "manifest.ocdbt"))
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint in .*ckpt: .*/8 .* and 1 older"):
    checkpoint.restore(mngr, _state(0))
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.restore_raw(directory)


def test_opening_the_manager_removes_interrupted_saves(tmp_path):
  directory, _ = _saved(tmp_path, steps=(4,))
  leftover = os.path.join(directory, "8.orbax-checkpoint-tmp-1795899451")
  os.makedirs(os.path.join(leftover, "state"))
  checkpoint.restore_raw(directory)                                   # readers leave it alone
  assert os.path.isdir(leftover)
  mngr = checkpoint.manager(directory)
  assert not os.path.exists(leftover) and mngr.all_steps() == [4]


def test_restores_land_on_the_current_devices_whatever_the_saved_topology(tmp_path):
  devices = jax.devices()
  assert len(devices) >= 4, "the test process has 8 fake CPU devices (conftest)"
  mesh = jax.sharding.Mesh(np.asarray(devices[:4]), ("d",))
  values = np.arange(24, dtype=np.float32).reshape(8, 3)
  sharded = jax.device_put(values, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  checkpoint.save(mngr, 1, {"w": sharded, "s": jnp.asarray(3)}, {"step": 1})
  mngr.wait_until_finished()
  raw, _ = checkpoint.restore_raw(str(tmp_path / "ckpt"))
  assert raw["w"].sharding.device_set == {jax.local_devices()[0]}
  np.testing.assert_array_equal(raw["w"], values)
  two = jax.sharding.Mesh(np.asarray(devices[4:6]), ("d",))
  replicated = jax.sharding.NamedSharding(two, jax.sharding.PartitionSpec())
  target = {"w": jax.device_put(np.zeros((8, 3), np.float32), replicated), "s": jnp.asarray(0)}
  state, _ = checkpoint.restore(mngr, target)
  assert state["w"].sharding.device_set == set(devices[4:6])
  np.testing.assert_array_equal(state["w"], values)


def test_first_save_of_replicated_arrays_on_many_devices_compiles_nothing(tmp_path, compile_events):
  # Orbax's replica-parallel writing would compile a slicing program per (shape, device) here: 8 x 12.
  devices = jax.devices()
  assert len(devices) == 8, "the test process has 8 fake CPU devices (conftest)"
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(3)
  values = {f"w{i}": rng.normal(size=(8 * (1 + i % 3), 29 + i)).astype(np.float32) for i in range(12)}
  state = {k: jax.device_put(v, replicated) for k, v in values.items()}
  state["split"] = jax.device_put(values["w2"][:, :24], split)
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  checkpoint.save(mngr, 1, state, {"step": 1})
  mngr.wait_until_finished()
  assert compile_events == []
  restored, _ = checkpoint.restore(mngr, state)
  for k, v in values.items():
    np.testing.assert_array_equal(restored[k], v)
    assert restored[k].sharding == replicated
  np.testing.assert_array_equal(restored["split"], values["w2"][:, :24])
