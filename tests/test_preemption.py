"""preemption: stop signals become a request, the second one acts as usual, handlers are restored."""
import os
import signal

import pytest

from sida_jax.train import preemption


def test_sigterm_sets_the_request_and_handlers_are_restored():
  before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  with preemption.stop_signals() as stop:
    assert not stop.requested and preemption.agree(stop, True) == (False, True)
    os.kill(os.getpid(), signal.SIGTERM)      # delivered to this (main) thread before kill returns
    assert stop.requested and stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
    assert preemption.agree(stop, False) == (True, False)
    with preemption.stop_signals() as inner:  # nested uses share the outer request
      assert inner is stop
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_a_second_ctrl_c_interrupts_at_once():
  with preemption.stop_signals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):    # the handler from before (Python's default) is back
      os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_carries_the_shell_exit_code():
  error = preemption.Interrupted(signal.SIGTERM, "stopped")
  assert error.exit_code == 143 and str(error) == "stopped"
  assert preemption.Interrupted(signal.SIGINT, "").exit_code == 130
