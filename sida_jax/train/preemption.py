"""Stopping a run cleanly. Preemptible machines send SIGTERM, users press Ctrl-C (SIGINT): while
`stop_signals()` is active either one only sets a flag; the training loops then finish the current step,
save it and raise `Interrupted`, and the same command continues exactly. A second signal of the same kind acts
as usual (Ctrl-C twice ends at once, without a checkpoint).

All processes of a multi-process run must stop at the same step: `agree` all-gathers the flags every step.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

from absl import logging
import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """The run stopped on a signal after saving its progress; `exit_code` is the shell's 128 + signal."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


class StopRequest:
  """`signum` of the first stop signal received (None: none yet)."""

  def __init__(self):
    self.signum: Optional[int] = None

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""


_active: list = []   # the StopRequest of the outermost active stop_signals() (nested uses share it)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
  """Catches SIGTERM and SIGINT into the yielded StopRequest (outside the main thread: a request that is never
  set, as signals reach only the main thread)."""
  if _active:
    yield _active[0]
    return
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}

  def handler(signum, frame):
    del frame
    if request.signum is None:
      request.signum = signum
    signal.signal(signum, previous[signum])   # the same signal again acts as it would without us
    again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    logging.warning("%s received: finishing the current step and saving a checkpoint (%s again stops at once, "
                    "without one)", signal.Signals(signum).name, again)

  for s in SIGNALS:
    signal.signal(s, handler)
  _active.append(request)
  try:
    yield request
  finally:
    _active.remove(request)
    for s in SIGNALS:
      signal.signal(s, previous[s])


def agree(stop: StopRequest, save_due: bool) -> tuple:
  """(stop now, save now), the same on every process: any process's stop request stops all; the first
  process's clock decides a timed save. Single process: the flags as they are."""
  if jax.process_count() == 1:
    return stop.requested, save_due
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([stop.signum or 0, save_due], np.int32)))
  flags = flags.reshape(jax.process_count(), 2)
  signums = flags[:, 0][flags[:, 0] > 0]
  if signums.size and stop.signum is None:
    stop.signum = int(signums[0])
  return bool(signums.size), bool(flags[0, 1])
