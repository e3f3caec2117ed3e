"""train_and_evaluate: exact resume after SIGKILL, start-up validation, data plumbing."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sida_jax import checkpoint
from sida_jax.models import convert
from sida_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import smoke  # noqa: E402

STEPS = 400         # batch 8 → 3.2 kimg (the toy network: long enough to be killed mid-run)
EVERY_KIMG = 0.32   # a checkpoint every 40 steps


def _config(network="toy", **overrides):
  c = smoke.get_config(network)
  c.total_kimg = STEPS * c.batch_size / 1000
  c.checkpoint_every_kimg = EVERY_KIMG
  c.log_every_kimg = EVERY_KIMG
  c.grid_every_kimg = 0.0
  for k, v in overrides.items():
    c[k] = v
  return c


def _flat_params(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state["generator"]["params"]
                                                                  if isinstance(state, dict) else
                                                                  state.generator.params)))]


def _cli(workdir):
  kimg = STEPS * 8 / 1000
  return [sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs" / "smoke.py") + ":toy",
          "--workdir", str(workdir), f"--config.total_kimg={kimg}",
          f"--config.checkpoint_every_kimg={EVERY_KIMG}", f"--config.log_every_kimg={EVERY_KIMG}",
          "--config.grid_every_kimg=0"]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
  env.pop("XLA_FLAGS", None)  # one CPU device in the subprocess, like a plain user run
  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(_cli(killed_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = killed_dir / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    done = [p for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
    if any(int(p.name) >= 40 for p in done):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  _, meta = checkpoint.restore_raw(str(ckpts))
  assert meta["step"] < STEPS
  # Same command again: resumes from the last complete checkpoint and runs to the end.
  subprocess.run(_cli(killed_dir), cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  resumed, meta = checkpoint.restore_raw(str(ckpts))
  assert meta["step"] == STEPS
  straight_dir = tmp_path / "straight"
  subprocess.run(_cli(straight_dir), cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  straight, _ = checkpoint.restore_raw(str(straight_dir / "checkpoints"))
  for a, b in zip(_flat_params(resumed), _flat_params(straight)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(resumed["generator_ema"]), jax.tree.leaves(straight["generator_ema"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_in_process_resume_matches(tmp_path):
  config = _config(total_kimg=8 * 8 / 1000)
  straight = loop.train_and_evaluate(config, str(tmp_path / "a"))
  loop.train_and_evaluate(config, str(tmp_path / "b"), stop_after_steps=4)
  resumed = loop.train_and_evaluate(config, str(tmp_path / "b"))
  assert int(resumed.step) == int(straight.step) == 8
  for a, b in zip(_flat_params(resumed), _flat_params(straight)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides,message", [
    (dict(teacher="/nonexistent/teacher.pkl"), "file not found"),
    (dict(batch_size=12), "not divisible"),
    (dict(method="nope"), "not one of"),
    (dict(dtype="float16"), "not one of"),
    (dict(method="sida"), "needs real data"),
])
def test_bad_config_fails_at_start_up_with_one_clear_line(tmp_path, overrides, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    loop.build_run(_config(**overrides))


def test_unknown_config_key_is_rejected_by_main(tmp_path):
  out = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs/smoke.py"),
                        "--workdir", str(tmp_path), "--config.loss.alpah=1.0"],
                       cwd=REPO, capture_output=True, text=True)
  assert out.returncode != 0
  assert "alpah" in out.stderr


def test_data_labels_and_real_images_reach_the_step(tmp_path):
  config = _config()
  config.method = "sida"
  config.network.kwargs.img_resolution = 16
  config.network.kwargs.img_channels = 1
  config.network.kwargs.label_dim = 10
  config.data.source = "mnist5k"
  config.data.resolution = 28
  with pytest.raises(ValueError, match="images are"):
    loop.build_run(config)
  config.network.kwargs.img_resolution = 32
  config.data.resolution = 32
  run = loop.build_run(config)
  batches = next(loop.Batches(run).iterate(0))
  assert batches["critic"]["images"].shape == (8, 32, 32, 1)
  assert batches["generator"]["labels"].shape == (8, 10)
  again = next(loop.Batches(run).iterate(0))
  np.testing.assert_array_equal(batches["critic"]["images"], again["critic"]["images"])


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
  run = loop.build_run(config)
  state = loop.initial_state(run)
  for a, b in zip(jax.tree.leaves(state.generator.params), jax.tree.leaves(first.generator_ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.critic.params), jax.tree.leaves(run.teacher.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _max_diff_trees(state.generator.params, run.teacher.params) > 0


def test_generator_init_from_an_official_sida_training_state():
  """A SiDA `training-state-*.pt` holds only state_dicts: G_ema is built with the teacher's architecture."""
  states = REPO / "tests" / "data" / "official_states"
  info = json.loads((states / "sida_edm_state.json").read_text())
  config = smoke.get_config("ddpmpp")
  config.network.class_name = info["class_name"]
  config.network.kwargs = info["init_kwargs"]
  config.generator_init = str(states / "sida_edm_state.pt")
  run = loop.build_run(config)
  state = loop.initial_state(run)
  reference = dict(np.load(states / "sida_edm_state_reference.npz"))  # torch's G_ema.state_dict()
  expected = convert.variables_from_state_dict(run.teacher.module, reference)["params"]
  jax.tree.map(np.testing.assert_array_equal, state.generator.params, expected)
  assert _max_diff_trees(state.critic.params, expected) > 0  # the critic starts from the teacher


def _max_diff_trees(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


def test_data_free_sid_takes_the_loaders_labels_without_images():
  config = _config()
  config.network.kwargs.img_resolution = 32
  config.network.kwargs.img_channels = 1
  config.network.kwargs.label_dim = 10
  config.data.source = "mnist5k"
  config.data.resolution = 32
  run = loop.build_run(config)
  batches = next(loop.Batches(run).iterate(3))           # step 3 = loader batches 6 and 7
  loader = run.dataset.iterate(config.batch_size, config.seed, position=6)
  assert set(batches["critic"]) == {"labels"}
  np.testing.assert_array_equal(batches["critic"]["labels"], next(loader)["labels"])
  np.testing.assert_array_equal(batches["generator"]["labels"], next(loader)["labels"])
