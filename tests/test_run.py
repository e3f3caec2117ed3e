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
