"""workdir: the lock (refusal naming the holder, stale records taken over, filesystems without flock) and the
resumed-config check (refused keys listed, safe keys accepted, moved files)."""
import errno
import json
import logging
import os
import socket
import subprocess
import sys

import ml_collections
import pytest

from sida_jax.train import workdir as workdir_lib


def _dead_pid() -> int:
  """The pid of a process that has ended (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_held_lock_refuses_a_second_holder_naming_it(tmp_path):
  with workdir_lib.lock(str(tmp_path)):
    record = json.loads((tmp_path / "lock").read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirInUse) as info:
      with workdir_lib.lock(str(tmp_path)):
        pass
    message = str(info.value)
    assert f"pid {os.getpid()} on {socket.gethostname()} since {record['started']}" in message
    assert "\n" not in message
    with pytest.raises(workdir_lib.WorkdirInUse):
      workdir_lib.check_free(str(tmp_path))
  assert (tmp_path / "lock").read_text() == ""      # released: the record is cleared, the file stays
  workdir_lib.check_free(str(tmp_path))
  with workdir_lib.lock(str(tmp_path)):
    pass


def test_a_stale_lock_is_taken_over_with_one_warning(tmp_path, caplog):
  stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2000-01-01T00:00:00"}
  (tmp_path / "lock").write_text(json.dumps(stale))
  workdir_lib.check_free(str(tmp_path))                        # the look before the imports leaves it alone
  assert json.loads((tmp_path / "lock").read_text()) == stale
  with caplog.at_level(logging.WARNING):
    with workdir_lib.lock(str(tmp_path)):
      assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and f"pid {stale['pid']}" in warnings[0] and "no longer running" in warnings[0]


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
  live = {"host": socket.gethostname(), "pid": os.getppid(), "started": "x"}
  (tmp_path / "lock").write_text(json.dumps(live))
  with pytest.raises(workdir_lib.WorkdirInUse, match=f"pid {os.getppid()} .*delete the lock file"):
    with workdir_lib.lock(str(tmp_path)):
      pass
  (tmp_path / "lock").write_text(json.dumps({**live, "host": "elsewhere"}))   # cannot be checked: refused
  with pytest.raises(workdir_lib.WorkdirInUse, match="on elsewhere"):
    with workdir_lib.lock(str(tmp_path)):
      pass
  (tmp_path / "lock").write_text(json.dumps({**live, "pid": _dead_pid()}))
  with workdir_lib.lock(str(tmp_path)):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


def test_disabled_lock_touches_nothing(tmp_path):
  with workdir_lib.lock(str(tmp_path / "w"), enabled=False):
    pass
  assert not (tmp_path / "w").exists()


def _config(**values):
  c = ml_collections.ConfigDict({"method": "sid", "total_kimg": 1.0, "batch_size": 8, "teacher": "/a/t.pkl",
                                 "loss": {"alpha": 1.2}, "eval": {"num_images": 10}, "data": {"path": ""}})
  for key, value in values.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def _workdir(tmp_path, config):
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  workdir_lib.record(str(tmp_path), config)
  return str(tmp_path)


def test_check_resume_refuses_training_changes_in_one_line(tmp_path):
  workdir = _workdir(tmp_path, _config())
  with pytest.raises(workdir_lib.ConfigMismatch) as info:
    workdir_lib.check_resume(workdir, _config(**{"loss.alpha": 1.0, "method": "sida", "total_kimg": 2.0}))
  message = str(info.value)
  assert "\n" not in message
  assert 'loss.alpha 1.2 → 1.0, method "sid" → "sida"' in message   # the refused keys, and only those
  assert "total_kimg" not in message
  with pytest.raises(workdir_lib.ConfigMismatch, match='teacher "/a/t.pkl" → "/a/other.pkl"'):
    workdir_lib.check_resume(workdir, _config(teacher="/a/other.pkl"))


def test_check_resume_accepts_safe_changes_and_moved_files(tmp_path, caplog):
  workdir = _workdir(tmp_path, _config())
  with caplog.at_level(logging.INFO):
    workdir_lib.check_resume(workdir, _config(**{"total_kimg": 2.0, "batch_size": 16, "eval.num_images": 5,
                                                 "teacher": "/elsewhere/t.pkl"}))
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert "batch_size 8 → 16" in logged and "total_kimg 1.0 → 2.0" in logged and "eval.num_images 10 → 5" in logged
  assert 'teacher "/a/t.pkl" → "/elsewhere/t.pkl"' in logged
  with pytest.raises(workdir_lib.ConfigMismatch, match="batch_size 8 → 16"):   # where progress is in steps
    workdir_lib.check_resume(workdir, _config(batch_size=16), fixed=("batch_size",))


def test_check_resume_without_checkpoints_accepts_anything(tmp_path):
  workdir_lib.record(str(tmp_path), _config())
  workdir_lib.check_resume(str(tmp_path), _config(method="gdd"))   # nothing to resume: a fresh start


def test_check_network(tmp_path):
  workdir = _workdir(tmp_path, _config())
  network = {"class_name": "ToyPrecond", "init_kwargs": {"features": [32, 32], "img_channels": 3}}
  workdir_lib.record(workdir, _config(), network)
  workdir_lib.check_network(workdir, network)
  with pytest.raises(workdir_lib.ConfigMismatch, match=r"init_kwargs.features \[32, 32\] → \[64, 64\]"):
    workdir_lib.check_network(workdir, {**network, "init_kwargs": {"features": (64, 64), "img_channels": 3}})


def test_config_changes_lists_absent_keys():
  accepted, refused = workdir_lib.config_changes({"a": 1, "eval.x": 1}, {"b": 2, "eval.x": 1, "eval.y": 3})
  assert accepted == [("eval.y", None, 3)]
  assert refused == [("a", 1, None), ("b", None, 2)]
  assert workdir_lib.describe(refused) == "a 1 → (absent), b (absent) → 2"
