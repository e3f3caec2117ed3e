"""Multi-process training through main.py: two processes on localhost (jax.distributed, gloo CPU collectives),
2 fake devices each, on a mesh data=2 × fsdp=2 whose data axis spans the processes, give the run of one process
with 4 devices (each process feeds its own rows of the real batch); the checkpoint the two processes write
together samples in one process on one device, as the single-process run's does."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from sida_jax import checkpoint, sampling
from sida_jax.models.registry import denoiser_for

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600
# SiDA on the toy denoiser with real digits (so the data slicing matters) and dropout (drawn for the global
# batch): 3 iterations of 8 samples, 2 per device.
TRAIN = ["--config=configs/smoke.py:toy", "--config.method=sida", "--config.network.kwargs.img_channels=1",
         "--config.data.source=digits", "--config.data.resolution=16", "--config.loss.adv_pool_size=2",
         "--config.loss.critic_only_kimg=0", "--config.loss.sid_only_kimg=0", "--config.dropout=0.1",
         "--config.total_kimg=0.024", "--config.mesh.data=2", "--config.mesh.fsdp=2",
         "--config.mesh.min_shard_size=0"]
SAMPLE = ["--config=configs/smoke.py:toy", "--config.network.kwargs.img_channels=1", "--mode=sample",
          "--config.sample.seeds=0-7", "--config.sample.write_png=False"]   # σ_init 2.5, torch_cpu seeds


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"))
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _main(args, devices):
  return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(processes):
  outputs = []
  try:
    for proc in processes:
      outputs.append(proc.communicate(timeout=TIMEOUT)[0])
  finally:
    for proc in processes:
      if proc.poll() is None:
        proc.kill()
  for proc, out in zip(processes, outputs):
    assert proc.returncode == 0, out[-4000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _state(workdir):
  state, meta = checkpoint.restore_raw(os.path.join(workdir, "checkpoints"))
  return jax.device_get(state), meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  multi, single = str(root / "two_processes"), str(root / "one_process")
  address = f"localhost:{_free_port()}"
  _finish([_main([*TRAIN, f"--workdir={multi}", f"--coordinator_address={address}", "--num_processes=2",
                  f"--process_id={i}"], devices=2) for i in range(2)]
          + [_main([*TRAIN, f"--workdir={single}"], devices=4)])
  return multi, single


def test_two_processes_train_as_one_process_with_four_devices(runs):
  multi, single = runs
  (s_multi, meta_multi), (s_single, meta_single) = _state(multi), _state(single)
  assert meta_multi["step"] == meta_single["step"] == 3
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x, np.float64) - y)))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for name in ("generator", "critic"):   # the tolerance of the 1-vs-8-device step test
    assert diff(s_multi[name]["params"], s_single[name]["params"]) < 1e-6
  assert diff(s_multi["generator_ema"], s_single["generator_ema"]) < 1e-6
  # Adam's moments hold the last raw gradients, whose cross-process all-reduce sums in another order.
  for name in ("generator", "critic"):
    for a, b in zip(jax.tree.leaves(s_multi[name]["opt_state"]), jax.tree.leaves(s_single[name]["opt_state"])):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * float(np.max(np.abs(b))))
  # Not vacuous: the networks took Adam steps (lr 1e-4: ~1e-4 each, 100× the tolerance above) on non-zero
  # gradients; the generator skips iteration 0 (SiDA's gate is nimg > 0 here).
  for name, steps in (("generator", 2), ("critic", 3)):
    adam = s_single[name]["opt_state"][-1]
    assert int(adam["count"]) == steps
    assert max(float(np.max(np.abs(m))) for m in jax.tree.leaves(adam["mu"])) > 1e-3


def test_checkpoint_of_two_processes_samples_in_one_process_on_one_device(runs):
  """`--mode sample` on one device from the two processes' workdir gives the images of the one-process run's
  EMA generator (generated here from seeds as the sample mode does)."""
  multi, single = runs
  _finish([_main([*SAMPLE, f"--workdir={multi}"], devices=1)])
  images = np.load(os.path.join(multi, "samples", "samples.npz"))["images"]
  net = checkpoint.load_network(single)
  z, _ = sampling.seed_noise(list(range(8)), (16, 16, 1), 0, "torch_cpu")
  denoiser = denoiser_for(net.module, net.class_name, net.init_kwargs)
  expected = sampling.to_uint8(sampling.generate(denoiser, net.variables, z, None, 2.5))
  assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
  # The same weights up to float rounding: identical up to a rounding step of the uint8 conversion.
  assert np.max(np.abs(images.astype(int) - expected.astype(int))) <= 1 and np.mean(images == expected) > 0.99
