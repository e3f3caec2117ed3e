"""Where a test run's time goes: tracing, lowering, XLA compiling, persistent-cache loads, and the rest.

As a pytest plugin it listens to JAX's own monitoring events during every test call and appends one JSON line
per test to $SIDA_COMPILE_SPLIT_OUT (default compile_split.jsonl); as a script it sums such a file:

    rm -rf .jax_cache && PYTHONPATH=benchmarks python -m pytest -q -n 2 -p compile_split tests
    python benchmarks/compile_split.py compile_split.jsonl --top 10

Seconds are summed over tests (with two workers they add up to about twice the wall time). A jit traced inside
another jit's trace is part of the outer trace event, not counted again.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from typing import Iterable

import jax

OUT_ENV = "SIDA_COMPILE_SPLIT_OUT"
# record field -> the JAX monitoring event whose durations it sums
DURATIONS = {
    "trace_s": "/jax/core/compile/jaxpr_trace_duration",
    "lower_s": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "compile_s": "/jax/core/compile/backend_compile_duration",
    "cache_load_s": "/jax/compilation_cache/cache_retrieval_time_sec",
}
COUNTS = {"cache_hits": "/jax/compilation_cache/cache_hits", "cache_misses": "/jax/compilation_cache/cache_misses"}
PARTS = (("compile_s", "XLA compiling"), ("trace_s", "tracing"), ("lower_s", "lowering to StableHLO"),
         ("cache_load_s", "loading programs from the persistent cache"))


class Recorder:
  """Sums JAX's compile-related monitoring events between `start()` and `stop()`."""

  def __init__(self):
    self.seconds, self.counts = collections.Counter(), collections.Counter()
    self._by_event = {event: field for field, event in DURATIONS.items()}
    self._counted = {event: field for field, event in COUNTS.items()}
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, seconds: float, **_):
    field = self._by_event.get(event)
    if field is not None:
      self.seconds[field] += seconds
      if field == "compile_s":
        self.counts["compiles"] += 1

  def _on_event(self, event: str, **_):
    field = self._counted.get(event)
    if field is not None:
      self.counts[field] += 1

  def start(self):
    self.seconds.clear()
    self.counts.clear()
    self._t0 = time.perf_counter()

  def stop(self, test: str) -> dict:
    record = {"test": test, "wall_s": time.perf_counter() - self._t0}
    record.update({field: self.seconds[field] for field in DURATIONS})
    record.update({field: self.counts[field] for field in ("compiles", *COUNTS)})
    return record


def summarize(records: Iterable[dict], top: int = 10) -> str:
  """A markdown table of the parts' summed seconds and shares, then the `top` test files by time."""
  records = list(records)
  if not records:
    raise ValueError("compile_split: no test records to sum")
  total = sum(r["wall_s"] for r in records)
  sums = {field: sum(r[field] for r in records) for field, _ in PARTS}
  counts = {field: sum(r[field] for r in records) for field in ("compiles", *COUNTS)}
  share = lambda s: f"{100 * s / total:.1f} %" if total > 0 else "–"
  rows = ["| part | seconds (sum over tests) | share |", "|---|---|---|"]
  for field, name in PARTS:
    if field == "compile_s":
      name += (f" ({counts['compiles']:,} programs; {counts['cache_misses']:,} persistent-cache misses, "
               f"{counts['cache_hits']:,} hits)")
    rows.append(f"| {name} | {sums[field]:,.1f} | {share(sums[field])} |")
  rest = total - sum(sums.values())
  rows.append(f"| everything else (running, Python, I/O, subprocesses) | {rest:,.1f} | {share(rest)} |")
  rows.append(f"| all {len(records)} test calls | {total:,.1f} | |")
  by_file = collections.defaultdict(lambda: collections.Counter())
  for r in records:
    counter = by_file[r["test"].split("::")[0]]
    counter["wall_s"] += r["wall_s"]
    counter["compile_s"] += r["compile_s"]
    counter["tests"] += 1
  rows += ["", "| test file | tests | seconds | of which compiling |", "|---|---|---|---|"]
  for name, c in sorted(by_file.items(), key=lambda kv: -kv[1]["wall_s"])[:top]:
    rows.append(f"| {name} | {c['tests']} | {c['wall_s']:,.1f} | {c['compile_s']:,.1f} |")
  return "\n".join(rows)


def read_records(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# --- pytest plugin (`-p compile_split`) ----------------------------------------------------------------------
try:
  import pytest
except ImportError:   # the summary works without pytest
  pytest = None

if pytest is not None:
  _recorder = None

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_call(item):
    global _recorder
    if _recorder is None:
      _recorder = Recorder()
    _recorder.start()
    yield
    record = _recorder.stop(item.nodeid)
    with open(os.environ.get(OUT_ENV, "compile_split.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("records", help="the JSON-lines file the plugin wrote")
  parser.add_argument("--top", type=int, default=10, help="test files listed, slowest first")
  args = parser.parse_args(argv)
  print(summarize(read_records(args.records), args.top))


if __name__ == "__main__":
  main()
