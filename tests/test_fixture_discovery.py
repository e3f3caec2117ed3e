"""The fixture tests' discovery (tests/conftest.py): cases come from listing files, and a missing fixture
folder skips them with the reason, or fails them under SIDA_REQUIRE_FIXTURES=1."""
import os
import pathlib
import subprocess
import sys

import pytest

import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cases_are_the_listed_files(tmp_path, monkeypatch):
  monkeypatch.setenv("SIDA_FIXTURES", str(tmp_path))
  (tmp_path / "edm").mkdir()
  for name in ("zeta_io.npz", "alpha_io.npz", "block_up_io.npz", "alpha_state.npz"):
    (tmp_path / "edm" / name).touch()
  cases = conftest.fixture_files("edm", "*_io.npz", exclude="block_*")
  assert [c.id for c in cases] == ["alpha_io.npz", "zeta_io.npz"]
  assert [c.values[0] for c in cases] == [tmp_path / "edm" / "alpha_io.npz", tmp_path / "edm" / "zeta_io.npz"]
  assert [c.id for c in conftest.fixture_files("edm", "block_*_io.npz")] == ["block_up_io.npz"]
  # A folder without such files is a failure whatever the setting; an absent folder skips unless required.
  (empty,) = conftest.fixture_files("edm", "*.pkl")
  (absent,) = conftest.fixture_files("sid", "*_step_io.npz")
  for case, required, reason in ((empty, True, "no fixture file matches '*.pkl'"),
                                 (absent, False, "official fixtures not found")):
    (marker,) = case.marks
    assert case.values == (None,) and marker.name == "fixtures_missing"
    assert marker.kwargs["required"] is required and reason in marker.args[0]


def _run_fixture_tests(folder, require):
  env = {k: v for k, v in os.environ.items() if k != "SIDA_REQUIRE_FIXTURES"}
  env["SIDA_FIXTURES"] = str(folder)
  if require:
    env["SIDA_REQUIRE_FIXTURES"] = "1"
  # One parametrised test (placeholder case) and one that looks its folder up in its body.
  tests = ["tests/test_snapshot.py::test_official_snapshot", "tests/test_safetensors.py::test_safetensors_round_trip"]
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", *tests],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_missing_folder_skips_unless_required(tmp_path):
  missing = tmp_path / "nowhere"   # 3 cases: the snapshot test's edm and edm2 placeholders, one body lookup
  code, out = _run_fixture_tests(missing, require=False)
  assert code == 0, out
  assert "3 skipped" in out and "failed" not in out and "passed" not in out, out
  for sub in ("edm", "edm2"):
    assert f"official fixtures not found at {missing / sub} (set SIDA_FIXTURES)" in out, out
  code, out = _run_fixture_tests(missing, require=True)
  assert code == 1, out
  assert "3 failed" in out and "passed" not in out and "skipped" not in out, out
  for sub in ("edm", "edm2"):
    assert f"official fixtures not found at {missing / sub} (set SIDA_FIXTURES) (SIDA_REQUIRE_FIXTURES is set)" in out
