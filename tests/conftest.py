"""Test-wide settings: 8 fake CPU devices, full-precision matmuls, a persistent compile cache; and the
discovery of the official fixture files ($SIDA_FIXTURES) for the tests marked `fixtures`.

Everything here must happen before JAX is first imported, so it lives at module top level.
"""
import fnmatch
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def fixtures_root() -> pathlib.Path:
  """The folder of official PyTorch outputs: $SIDA_FIXTURES, or ../shared/fixtures next to the repo."""
  return pathlib.Path(os.environ.get("SIDA_FIXTURES", REPO.parent / "shared" / "fixtures"))


def fixtures_required() -> bool:
  """SIDA_REQUIRE_FIXTURES=1 (CI): a missing fixture folder fails the fixture tests instead of skipping them."""
  return os.environ.get("SIDA_REQUIRE_FIXTURES", "") not in ("", "0")


def _missing(reason: str):
  """Skip, or fail when the fixtures are required, with the reason."""
  if fixtures_required():
    pytest.fail(f"{reason} (SIDA_REQUIRE_FIXTURES is set)", pytrace=False)
  pytest.skip(reason)


def fixtures_dir(sub: str) -> pathlib.Path:
  """One sub-folder of the fixtures; skips (fails under SIDA_REQUIRE_FIXTURES) when it is absent."""
  folder = fixtures_root() / sub
  if not folder.is_dir():
    _missing(f"official fixtures not found at {folder} (set SIDA_FIXTURES)")
  return folder


def fixture_files(sub: str, pattern: str, exclude: str = "") -> list:
  """Fixture cases for `pytest.mark.parametrize`, discovered by listing `sub/pattern` (minus `exclude`).

  Nothing about a fixture set is assumed beyond its file format: any set of official outputs is checked
  the same way. When the folder is absent, or nothing matches, the list holds one placeholder case that
  skips with the reason (fails under SIDA_REQUIRE_FIXTURES; fails anyway when the folder exists but holds
  no such file), so a test never passes, or vanishes, without checking anything.
  """
  folder = fixtures_root() / sub
  if not folder.is_dir():
    reason, required = f"official fixtures not found at {folder} (set SIDA_FIXTURES)", False
  else:
    files = [f for f in sorted(folder.glob(pattern)) if not (exclude and fnmatch.fnmatch(f.name, exclude))]
    if files:
      return [pytest.param(f, id=f.name) for f in files]
    reason, required = f"no fixture file matches {pattern!r} in {folder}", True
  return [pytest.param(None, id=f"missing-{sub}", marks=pytest.mark.fixtures_missing(reason, required=required))]


def pytest_configure(config):
  config.addinivalue_line("markers", "fixtures_missing(reason, required): placeholder case of an absent fixture")


def pytest_collection_modifyitems(config, items):
  """The `slow` tests run first (otherwise in collection order), so that pytest-xdist's work stealing
  (pytest.ini) ends the run with short tests on both workers instead of one long test on one."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
  marker = item.get_closest_marker("fixtures_missing")
  if marker is not None:
    if marker.kwargs.get("required"):
      pytest.fail(marker.args[0], pytrace=False)
    _missing(marker.args[0])


COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits")


@pytest.fixture
def compile_events():
  """The names of XLA compiles and persistent-cache hits recorded during the test, in order (a list the test
  may also append its own markers to); the listeners are removed afterwards."""
  events = []
  on_duration = lambda name, _, **kw: events.append(name) if name in COMPILE_EVENTS else None  # noqa: E731
  on_event = lambda name, **kw: events.append(name) if name in COMPILE_EVENTS else None  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  yield events
  jax.monitoring.unregister_event_duration_listener(on_duration)
  jax.monitoring.unregister_event_listener(on_event)
