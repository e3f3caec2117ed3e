"""A workdir's guards: one run at a time, and a resumed run checked against the config it was trained with.

`lock(workdir)` holds WORKDIR/lock while a run writes there: an flock (released by the kernel when the
process ends, however it ends) plus a record of the holder (host, pid, start time) that a refused second run
names. A record left behind by a process that is gone is taken over with one warning. On filesystems without
flock the record alone decides: a holder on this host whose pid is not running is gone.

`check_resume(workdir, config)` runs before anything is loaded or written: when the workdir has checkpoints,
the new config may differ from WORKDIR/config.json only in keys that do not change what was trained
(`RESUMABLE`: length, bookkeeping, evaluation, sampling, the batch size — progress is counted in images) or in
where a file now lives (`MOVABLE`, same file name). Anything else is refused in one line listing the keys.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Iterator, Sequence

from absl import logging

LOCK_FILE = "lock"
CONFIG_JSON = "config.json"
NETWORK_JSON = "network.json"   # = checkpoint.NETWORK_JSON (not imported: this module stays light for main.py)

# Keys (or sections, ending in '.') a resumed run may change.
RESUMABLE = ("total_kimg", "batch_size", "log_every_kimg", "checkpoint_every_kimg", "checkpoint_every_minutes",
             "grid_every_kimg", "eval_every_kimg", "max_to_keep", "sample.", "eval.", "convert.",
             "compile_cache")
# Paths that may move: accepted when the file name stays the same.
MOVABLE = ("teacher", "generator_init", "data.path", "data.data_dir")


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir's lock."""


class ConfigMismatch(ValueError):
  """A resumed run's config changes what the workdir was trained with."""


# --- the lock ---------------------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _read_record(fd: int) -> dict:
  data = os.pread(fd, 4096, 0)
  try:
    record = json.loads(data.decode()) if data.strip() else {}
  except (ValueError, UnicodeDecodeError):
    return {}
  return record if isinstance(record, dict) else {}


def _write_record(fd: int, record: dict) -> None:
  data = json.dumps(record).encode() if record else b""
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)


def _holder(record: dict) -> str:
  return (f"pid {record.get('pid', '?')} on {record.get('host', '?')}"
          f"{' since ' + record['started'] if record.get('started') else ''}")


def _alive(record: dict) -> bool:
  """Whether the recorded holder may still run (a holder on another host cannot be checked: assume so)."""
  if record.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(record.get("pid", -1)), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, OverflowError):
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True, quiet: bool = False) -> Iterator[None]:
  """Holds WORKDIR/lock for the body, or raises WorkdirInUse naming the live holder. `enabled=False` (every
  process but the first of a multi-process run) does nothing; `quiet` leaves a stale record as it is."""
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirInUse(f"{workdir} is in use by {_holder(_read_record(fd))} (lock file {path}); wait for "
                           "that run to end, or stop it (SIGTERM saves a checkpoint)") from None
      # No flock on this filesystem: the record alone decides.
      record = _read_record(fd)
      if record and _alive(record):
        raise WorkdirInUse(f"{workdir} is in use by {_holder(record)} (lock file {path}, this filesystem has "
                           "no flock); if that run is gone, delete the lock file") from None
    previous = _read_record(fd)
    if quiet:
      yield
      return
    if previous:
      logging.warning("%s: taking over the lock left by %s, which is no longer running", workdir,
                      _holder(previous))
    _write_record(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.datetime.now().isoformat(timespec="seconds")})
    try:
      yield
    finally:
      _write_record(fd, {})
  finally:
    os.close(fd)   # releases the flock


def multi_process_environment() -> bool:
  """Whether the environment configures a multi-process JAX run (then process 0 alone holds the lock)."""
  env = os.environ
  return ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def check_free(workdir: str) -> None:
  """Raises WorkdirInUse when a live run holds the workdir now (a quick look for the command line, before the
  slow imports; the run itself takes the lock with `lock`)."""
  if os.path.isfile(os.path.join(workdir, LOCK_FILE)):
    with lock(workdir, quiet=True):
      pass


# --- resuming with a config ------------------------------------------------------------------------------

def flatten(tree: Any, prefix: str = "") -> dict:
  """{'a.b': leaf} of nested dicts (config.to_dict(), JSON)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def as_json(tree: Any) -> Any:
  """The value as it reads back from config.json / network.json (tuples as lists, odd types as str)."""
  return json.loads(json.dumps(tree, default=str))


def _resumable(key: str, allowed: Sequence[str]) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in allowed)


def _show(value: Any) -> str:
  text = json.dumps(value) if value is not None else "(absent)"
  return text if len(text) <= 40 else text[:37] + "..."


def describe(changes: Sequence[tuple], limit: int = 6) -> str:
  """'a.b 1 → 2, c "x" → "y"' (the first `limit`, then how many more)."""
  shown = ", ".join(f"{k} {_show(a)} → {_show(b)}" for k, a, b in changes[:limit])
  return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def config_changes(old: dict, new: dict, fixed: Sequence[str] = ()) -> tuple:
  """(accepted, refused) changes [(key, old, new)] from one flattened config to another. `fixed` removes
  keys from RESUMABLE (e.g. the batch size where progress is counted in steps)."""
  allowed = [k for k in RESUMABLE if k not in fixed]
  accepted, refused = [], []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if a == b:
      continue
    moved = (key in MOVABLE and isinstance(a, str) and isinstance(b, str) and a and b
             and os.path.basename(os.path.normpath(a)) == os.path.basename(os.path.normpath(b)))
    (accepted if moved or _resumable(key, allowed) else refused).append((key, a, b))
  return accepted, refused


def has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_resume(workdir: str, config, fixed: Sequence[str] = ()) -> None:
  """Refuses (ConfigMismatch) a config that changes what the workdir's checkpoints were trained with; logs
  the accepted changes. Reads only; call it before anything is written."""
  path = os.path.join(workdir, CONFIG_JSON)
  if not has_checkpoints(workdir) or not os.path.isfile(path):
    return
  try:
    old = flatten(_read_json(path))
  except ValueError as e:
    raise ConfigMismatch(f"{path} cannot be read ({e}); it records what this workdir was trained with") from e
  accepted, refused = config_changes(old, flatten(as_json(config.to_dict())), fixed)
  if refused:
    raise ConfigMismatch(f"{workdir} was trained with another config ({path}): {describe(refused)}; use a new "
                         "--workdir, or the recorded values")
  if accepted:
    logging.info("resuming %s with config changes: %s", workdir, describe(accepted, limit=20))


def check_network(workdir: str, network: dict) -> None:
  """Refuses a resumed run whose networks (built from the teacher) differ from the ones in WORKDIR/network.json."""
  path = os.path.join(workdir, NETWORK_JSON)
  if not has_checkpoints(workdir) or not os.path.isfile(path):
    return
  _, refused = config_changes(flatten(_read_json(path)), flatten(as_json(network)))
  if refused:
    raise ConfigMismatch(f"the teacher now gives other networks than the ones trained in {workdir} ({path}): "
                         f"{describe(refused)}")


def record(workdir: str, config, network: dict | None = None) -> None:
  """Writes WORKDIR/config.json (and network.json): what the checkpoints are trained with."""
  from sida_jax import checkpoint  # pylint: disable=import-outside-toplevel  (Orbax: only where a run writes)
  checkpoint.write_json(os.path.join(workdir, CONFIG_JSON), config.to_dict())
  if network is not None:
    checkpoint.write_json(os.path.join(workdir, NETWORK_JSON), network)
