"""main.py's command line (sida_jax/command.py), run as a user runs it: --help, --mode keys, one-line errors with
exit code 2, SIGTERM with a second run refused meanwhile, and a checkpoint from 4 devices sampled on 1."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sida_jax import checkpoint, sampling

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import base  # noqa: E402

TOY = ["--config", str(REPO / "configs" / "smoke.py") + ":toy"]


def _env(devices=None):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)   # one CPU device, like a plain user run
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _main(*args, devices=None, **kwargs):
  return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=_env(devices),
                        capture_output=True, text=True, **kwargs)


def test_help_exits_0_with_the_modes_recipes_and_variants():
  out = _main("--help")
  assert out.returncode == 0 and out.stderr == ""
  for mode in ("train", "teacher", "pipeline", "sample", "eval", "convert", "ref", "keys"):
    assert re.search(rf"^  {mode} +\S", out.stdout, re.M), mode
  assert re.search(r"^  cifar10_uncond .*\n +sid sida sid2a sim gdd gddi$", out.stdout, re.M)
  assert re.search(r"^  smoke .*\n +ddpmpp toy$", out.stdout, re.M)
  assert "--debug" in out.stdout and "--workdir" in out.stdout


def test_a_misspelt_key_fails_in_one_line_naming_it():
  out = _main(*TOY, "--workdir", "unused", "--config.loss.alpah=1.0")
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.splitlines() == ["main.py: error: --config.loss.alpah: unknown config key loss.alpah (did you "
                                     "mean loss.alpha?); `--mode keys` lists them"]
  assert not (REPO / "unused").exists()


@pytest.mark.parametrize("args,message", [
    (["--config.batch_size=abc"], "main.py: error: flag --config.batch_size=abc: invalid literal for int()"),
    (["--config", "configs/nope.py"], "main.py: error: --config: file not found: configs/nope.py"),
    (["--mode", "sample"], "main.py: error: --workdir is required"),
])
def test_command_line_mistakes_fail_in_one_line(args, message):
  out = _main(*TOY, *args)
  assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and out.stderr.startswith(message)


def test_user_errors_in_a_run_are_one_line_and_debug_adds_the_traceback(tmp_path):
  evil = tmp_path / "evil.pkl"
  evil.write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")      # protocol 0: os.system('echo hacked')
  out = _main(*TOY, "--workdir", str(tmp_path / "w"), f"--config.teacher={evil}")
  assert out.returncode == 2 and "hacked" not in out.stdout
  lines = out.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("main.py: error: ") and "os.system" in lines[0]
  debug = _main(*TOY, "--workdir", str(tmp_path / "w"), "--config.teacher=/nonexistent/teacher.pkl", "--debug")
  assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
  assert "main.py: error: config.teacher: file not found: /nonexistent/teacher.pkl" in debug.stderr.splitlines()


def _base_comments() -> dict:
  """Trailing comments of `c.KEY = VALUE  # comment` lines in configs/base.py, read with a regex."""
  text = (REPO / "configs" / "base.py").read_text()
  return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*c\.([\w.]+) = [^#\n]*#(.*)$", text, re.M)}


def test_mode_keys_lists_every_key_with_its_default_and_comment():
  out = _main("--mode", "keys")
  assert out.returncode == 0
  listed = {}
  for line in out.stdout.splitlines():
    m = re.match(r"^([\w.]+) = (.*?)(?:\s+# (.*))?$", line)
    if m:
      listed[m.group(1)] = (m.group(2), m.group(3) or "")
  leaves = {}

  def walk(config, prefix=""):
    for key, value in config.items():
      if hasattr(value, "items") and hasattr(value, "to_dict"):
        walk(value, f"{prefix}{key}.")
      else:
        leaves[prefix + key] = value
  walk(base.get_config())
  assert set(listed) == set(leaves)
  for key, value in leaves.items():
    assert listed[key][0] == repr(value), key
  comments = _base_comments()
  assert len(comments) > 30
  for key, comment in comments.items():
    assert listed[key][1] == comment, key


def test_sigterm_saves_and_exits_while_a_second_run_is_refused(tmp_path):
  workdir = tmp_path / "w"
  args = [*TOY, "--workdir", str(workdir), "--config.total_kimg=3.2", "--config.checkpoint_every_kimg=0.32",
          "--config.log_every_kimg=0.32", "--config.grid_every_kimg=0"]
  first = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lock = workdir / "lock"
  deadline = time.time() + 300
  while time.time() < deadline and not (lock.exists() and lock.read_text()):
    time.sleep(0.05)
  second = _main(*args)   # while the first one compiles or trains
  assert second.returncode == 2
  assert second.stderr.splitlines() == [second.stderr.strip()]
  assert f"is in use by pid {first.pid} on {socket.gethostname()}" in second.stderr
  while time.time() < deadline and not (workdir / "checkpoints" / "40").exists():
    time.sleep(0.02)
  first.send_signal(signal.SIGTERM)
  sent = time.time()
  _, stderr = first.communicate(timeout=120)
  assert time.time() - sent < 30
  assert first.returncode == 128 + signal.SIGTERM, stderr
  last = stderr.strip().splitlines()[-1]
  m = re.fullmatch(r"main\.py: stopped by SIGTERM at [\d.]+ kimg \(step (\d+)\): checkpoint (\S+) saved; "
                   r"run the same command to continue", last)
  assert m, last
  step = int(m.group(1))
  assert 40 <= step < 400 and m.group(2) == str(workdir / "checkpoints" / str(step))
  _, meta = checkpoint.restore_raw(str(workdir / "checkpoints"))
  assert meta["step"] == step
  assert not list((workdir / "checkpoints").glob("*tmp*"))
  assert lock.read_text() == ""                     # released
  again = _main(*args)
  assert again.returncode == 0, again.stderr
  assert f"resumed from {workdir / 'checkpoints'}/{step}" in again.stderr
  _, meta = checkpoint.restore_raw(str(workdir / "checkpoints"))
  assert meta["step"] == 400


def test_a_checkpoint_written_on_4_devices_samples_on_1(tmp_path):
  workdir = tmp_path / "w"
  train = _main(*TOY, "--workdir", str(workdir), "--config.total_kimg=0.016", devices=4)
  assert train.returncode == 0, train.stderr
  saved = json.loads((workdir / "checkpoints" / "2" / "state" / "_sharding").read_text())
  assert {len(json.loads(v)["device_mesh"]["mesh"]) for v in saved.values()} == {4}   # recorded: 4 devices
  sample = _main(*TOY, "--workdir", str(workdir), "--mode", "sample", "--config.sample.seeds=0-3", devices=1)
  assert sample.returncode == 0, sample.stderr
  images = np.load(workdir / "samples" / "samples.npz")["images"]
  # Independent reference: the EMA generator at σ_init on each seed's noise, restored in this process (8 devices).
  net = checkpoint.load_network(str(workdir))
  init_sigma = json.loads((workdir / "network.json").read_text())["init_sigma"]
  z, _ = sampling.seed_noise([0, 1, 2, 3], (16, 16, 3))
  direct = net(init_sigma * z, np.full((4,), init_sigma, np.float32))
  np.testing.assert_array_equal(sampling.to_uint8(direct), images)
  assert len(jax.devices()) == 8
