"""build_run / initial_state: start-up validation, SiD²A's generator init."""
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from sida_jax.models import convert
from sida_jax.train import loop
from sida_jax.train import run as run_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import smoke  # noqa: E402


def _config(**overrides):
  """The smoke config on the toy network (compiled in seconds)."""
  c = smoke.get_config("toy")
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.mark.parametrize("overrides,message", [
    (dict(teacher="/nonexistent/teacher.pkl"), "file not found"),
    (dict(batch_size=12), "not divisible"),
    (dict(method="nope"), "not one of"),
    (dict(dtype="float16"), "not one of"),
    (dict(method="sida"), "needs real data"),
])
def test_bad_config_fails_at_start_up_with_one_clear_line(tmp_path, overrides, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    run_lib.build_run(_config(**overrides))


def test_sid2a_generator_init_from_a_workdir(tmp_path):
  """SiD²A: the generator (and its EMA) start from a distilled generator, the critic from the teacher."""
  sid_config = _config(total_kimg=2 * 8 / 1000)
  sid_config.network.kwargs.img_channels = 1
  first = loop.train_and_evaluate(sid_config, str(tmp_path / "sid"))
  config = _config()
  config.network.kwargs.img_channels = 1
  config.method = "sida"
  config.generator_init = str(tmp_path / "sid")
  config.data.source = "digits"
  config.data.resolution = 16
  run = run_lib.build_run(config)
  state = run_lib.initial_state(run)
  for a, b in zip(jax.tree.leaves(state.generator.params), jax.tree.leaves(first.generator_ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.critic.params), jax.tree.leaves(run.teacher.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _max_diff_trees(state.generator.params, run.teacher.params) > 0


def test_generator_init_from_an_official_sida_training_state():
  """A SiDA `training-state-*.pt` holds only state_dicts: G_ema is built with the teacher's architecture."""
  states = pathlib.Path(__file__).resolve().parent / "data" / "official_states"
  info = json.loads((states / "sida_edm_state.json").read_text())
  config = smoke.get_config("ddpmpp")
  config.network.class_name = info["class_name"]
  config.network.kwargs = info["init_kwargs"]
  config.generator_init = str(states / "sida_edm_state.pt")
  run = run_lib.build_run(config)
  state = run_lib.initial_state(run)
  reference = dict(np.load(states / "sida_edm_state_reference.npz"))  # torch's G_ema.state_dict()
  expected = convert.variables_from_state_dict(run.teacher.module, reference)["params"]
  jax.tree.map(np.testing.assert_array_equal, state.generator.params, expected)
  assert _max_diff_trees(state.critic.params, expected) > 0  # the critic starts from the teacher


def _max_diff_trees(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


@pytest.mark.parametrize("key,value,message", [
    ("grad_accum", 4, "not divisible by the 8 devices × config.grad_accum=4"),
    ("grad_accum", 0, "positive number of rounds"),
    ("remat", "all", "config.remat='all' is not one of"),
    ("remat", "blocks", "needs an EDM or EDM2 U-Net, not ToyPrecond"),
    ("mesh.fsdp", 3, "8 devices do not split into groups of 3"),
    ("mesh.data", 4, r"data × fsdp = 4 × 1 = 4 but there are 8 devices"),
])
def test_bad_scaling_settings_fail_at_start_up(key, value, message):
  config = _config(batch_size=16)
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    run_lib.build_run(config)


def test_block_remat_applies_to_the_generator_phase_only():
  """remat='blocks': the generator phase's networks (the step's generator, the method's generator loss)
  recompute their U-Net blocks; the run's networks, used by the critic phase and sampling, do not."""
  config = smoke.get_config("ddpmpp")
  config.remat = "blocks"
  run = run_lib.build_run(config)
  assert run.spec.nets.generator.module.model.remat_blocks
  assert not run.nets.generator.module.model.remat_blocks and not run.nets.critic.module.model.remat_blocks
  assert run.layout().mesh.shape == {"data": 8, "fsdp": 1}
