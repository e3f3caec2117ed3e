"""train_and_evaluate: exact resumes after SIGKILL and SIGTERM, fallback from an unreadable checkpoint, a new
batch size continuing by images, a changed config refused before any write, data plumbing."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sida_jax import checkpoint
from sida_jax.train import loop
from sida_jax.train import preemption
from sida_jax.train import run as run_lib
from sida_jax.train import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import smoke  # noqa: E402

# TensorStore reports each failed read of a damaged checkpoint once more, from a callback into Orbax's closed
# event loop, as an unraisable "Event loop is closed" (main.py keeps it off stderr).
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")

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


STRAIGHT_STEPS = 8


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """(workdir, final state) of an uninterrupted 8-step run, checkpoints every 2 steps (2 kept)."""
  workdir = tmp_path_factory.mktemp("straight")
  config = _config(total_kimg=STRAIGHT_STEPS * 8 / 1000, checkpoint_every_kimg=2 * 8 / 1000)
  return workdir, loop.train_and_evaluate(config, str(workdir))


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_in_process_resume_matches(tmp_path, straight):
  config = _config(total_kimg=STRAIGHT_STEPS * 8 / 1000, checkpoint_every_kimg=2 * 8 / 1000)
  loop.train_and_evaluate(config, str(tmp_path / "b"), stop_after_steps=4)
  resumed = loop.train_and_evaluate(config, str(tmp_path / "b"))
  assert int(resumed.step) == int(straight[1].step) == STRAIGHT_STEPS
  _assert_same_state(resumed, straight[1])


def test_sigterm_saves_the_step_in_progress_and_the_resume_is_exact(tmp_path, straight):
  """SIGTERM arrives during step 1's evaluation: step 2 finishes, is saved (with its evaluation still due) and
  the run ends with Interrupted; the same call continues, evaluates step 2 first, and ends bit-identical."""
  config = _config(total_kimg=STRAIGHT_STEPS * 8 / 1000, checkpoint_every_kimg=2 * 8 / 1000,
                   eval_every_kimg=8 / 1000)
  calls = []

  def evaluate_fn(run, ema_variables):
    calls.append(1)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"fid": 100.0 - len(calls)}

  workdir = tmp_path / "w"
  with pytest.raises(preemption.Interrupted) as info:
    loop.train_and_evaluate(config, str(workdir), evaluate_fn=evaluate_fn)
  assert info.value.exit_code == 128 + signal.SIGTERM
  assert "stopped by SIGTERM at 0.016 kimg (step 2)" in str(info.value) and "run the same command" in str(info.value)
  _, meta = checkpoint.restore_raw(str(workdir / "checkpoints"))
  assert meta["step"] == 2 and meta["evaluation_due"] and meta["best_fid"] == 99.0
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL            # handlers are restored
  resumed = loop.train_and_evaluate(config, str(workdir), evaluate_fn=evaluate_fn)
  _assert_same_state(resumed, straight[1])
  history = [json.loads(line) for line in (workdir / loop.EVAL_HISTORY).read_text().splitlines()]
  assert [h["step"] for h in history] == list(range(1, STRAIGHT_STEPS + 1))


def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_run_retrains_from_the_previous(tmp_path, straight):
  workdir = tmp_path / "w"
  shutil.copytree(straight[0], workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6", "8"]
  (workdir / "checkpoints" / "8" / "state" / "manifest.ocdbt").unlink()
  leftover = workdir / "checkpoints" / "10.orbax-checkpoint-tmp-1795899451"
  leftover.mkdir()
  config = _config(total_kimg=STRAIGHT_STEPS * 8 / 1000, checkpoint_every_kimg=2 * 8 / 1000)
  resumed = loop.train_and_evaluate(config, str(workdir))
  _assert_same_state(resumed, straight[1])                            # steps 7 and 8 again, exactly
  assert (workdir / "checkpoints-unreadable" / "8").is_dir() and not leftover.exists()
  _, meta = checkpoint.restore_raw(str(workdir / "checkpoints"))
  assert meta["step"] == 8


@pytest.mark.parametrize("minutes,kept", [(0.0, ["4"]), (1e-9, ["3", "4"])])
def test_checkpoints_by_wall_clock_minutes(tmp_path, minutes, kept):
  config = _config(total_kimg=4 * 8 / 1000, checkpoint_every_kimg=1.0, checkpoint_every_minutes=minutes)
  loop.train_and_evaluate(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == kept   # max_to_keep 2


def test_a_new_batch_size_continues_from_the_same_image_count(tmp_path):
  """4 steps of 8 images, then 16 per step: 32 images in, EMA ramp-up and totals follow the image count."""
  workdir = str(tmp_path / "w")
  loop.train_and_evaluate(_config(total_kimg=0.032), workdir)
  before, _ = checkpoint.restore_raw(os.path.join(workdir, "checkpoints"))
  config = _config(total_kimg=0.064, batch_size=16)
  one = loop.train_and_evaluate(config, workdir, stop_after_steps=1)
  assert int(one.step) == 5 and int(one.step_base) == 4 and int(one.nimg_base) == 32
  # EMA: ema' = p + β (ema - p), β = 0.5^(16 / min(half-life, 0.05 · 32 images)) (EDM's ramp-up); counting
  # 5 steps of 16 images instead would give 0.5^(16 / (0.05 · 64)), 32 times larger.
  beta = 0.5 ** (16 / min(config.ema.halflife_mimg * 1e6, config.ema.rampup_ratio * 32))
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
  ema, old, p = flat(one.generator_ema), flat(before["generator_ema"]), flat(one.generator.params)
  moved = np.abs(old - p) > 1e-5
  assert moved.sum() > 1000
  np.testing.assert_allclose(np.median((ema - p)[moved] / (old - p)[moved]), beta, rtol=1e-3)
  final = loop.train_and_evaluate(config, workdir)
  _, meta = checkpoint.restore_raw(os.path.join(workdir, "checkpoints"))
  assert int(final.step) == 6 and float(final.nimg(16)) == 64.0
  assert (meta["step"], meta["nimg"], meta["kimg"], meta["batch_size"]) == (6, 64, 0.064, 16)


def test_a_changed_network_is_refused_before_any_file_is_touched(tmp_path, straight):
  workdir = tmp_path / "w"
  shutil.copytree(straight[0], workdir)
  files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file()}
  config = _config(total_kimg=1.0)
  config.network.kwargs.features = [16, 16]
  config.loss.alpha = 1.0
  with pytest.raises(workdir_lib.ConfigMismatch, match=r"loss.alpha 1.2 → 1.0, network.kwargs.features \[32, 32\] "
                                                        r"→ \[16, 16\]; use a new --workdir"):
    loop.train_and_evaluate(config, str(workdir))
  assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file()} == files


def test_batches_after_a_batch_size_change_continue_the_sample_stream():
  config = _config(batch_size=16)
  config.network.kwargs.img_resolution = 32
  config.network.kwargs.img_channels = 1
  config.network.kwargs.label_dim = 10
  config.data.source = "mnist5k"
  config.data.resolution = 32
  run = run_lib.build_run(config)
  # 4 iterations of 8 (2 batches each: samples 0..63), then iteration 4 at 16 (64..95): iteration 5 reads
  # samples 96..127 — the loader's batches 12..15 at size 8.
  batches = next(loop.Batches(run).iterate(5, step_base=4, nimg_base=32))
  loader = run.dataset.iterate(8, config.seed, position=12)
  np.testing.assert_array_equal(batches["critic"]["labels"], np.concatenate([next(loader)["labels"] for _ in "ab"]))
  np.testing.assert_array_equal(batches["generator"]["labels"],
                                np.concatenate([next(loader)["labels"] for _ in "ab"]))


def test_data_labels_and_real_images_reach_the_step(tmp_path):
  config = _config()
  config.method = "sida"
  config.network.kwargs.img_resolution = 16
  config.network.kwargs.img_channels = 1
  config.network.kwargs.label_dim = 10
  config.data.source = "mnist5k"
  config.data.resolution = 28
  with pytest.raises(ValueError, match="images are"):
    run_lib.build_run(config)
  config.network.kwargs.img_resolution = 32
  config.data.resolution = 32
  run = run_lib.build_run(config)
  batches = next(loop.Batches(run).iterate(0))
  assert batches["critic"]["images"].shape == (8, 32, 32, 1)
  assert batches["generator"]["labels"].shape == (8, 10)
  again = next(loop.Batches(run).iterate(0))
  np.testing.assert_array_equal(batches["critic"]["images"], again["critic"]["images"])


def test_data_free_sid_takes_the_loaders_labels_without_images():
  config = _config()
  config.network.kwargs.img_resolution = 32
  config.network.kwargs.img_channels = 1
  config.network.kwargs.label_dim = 10
  config.data.source = "mnist5k"
  config.data.resolution = 32
  run = run_lib.build_run(config)
  batches = next(loop.Batches(run).iterate(3))           # step 3 = loader batches 6 and 7
  loader = run.dataset.iterate(config.batch_size, config.seed, position=6)
  assert set(batches["critic"]) == {"labels"}
  np.testing.assert_array_equal(batches["critic"]["labels"], next(loader)["labels"])
  np.testing.assert_array_equal(batches["generator"]["labels"], next(loader)["labels"])
