"""Test-wide settings: 8 fake CPU devices, full-precision matmuls, a persistent compile cache.

Everything here must happen before JAX is first imported, so it lives at module top level.
"""
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


def fixtures_dir(sub: str) -> pathlib.Path:
  """One sub-folder of the fixtures; skips the calling test (with the reason) when it is absent."""
  folder = fixtures_root() / sub
  if not folder.is_dir():
    pytest.skip(f"official fixtures not found at {folder} (set SIDA_FIXTURES)")
  return folder


def fixture_files(sub: str, pattern: str) -> list:
  """Discover fixture cases by listing files, for `pytest.mark.parametrize`.

  When the folder is absent the list holds one skipped case whose reason says where it looked, so
  the test reports a clear skip instead of silently collecting nothing.
  """
  folder = fixtures_root() / sub
  if not folder.is_dir():
    return [pytest.param(None, marks=pytest.mark.skip(
        reason=f"official fixtures not found at {folder} (set SIDA_FIXTURES)"))]
  files = sorted(folder.glob(pattern))
  assert files, f"no fixture files match {pattern} in {folder}"
  return [pytest.param(f, id=f.name) for f in files]
