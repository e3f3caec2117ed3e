"""benchmarks/device_suite.sh: the --smoke run works end to end on this machine (every row measured, none
skipped, the derived columns follow from the measured ones), and the peak table picks the right device."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import device_suite  # noqa: E402


def test_peak_table_matches_device_kinds_most_specific_first():
  assert device_suite.device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert device_suite.device_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert device_suite.device_peak_tflops("NVIDIA H100 PCIe", "float32") == 51.2
  assert device_suite.device_peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 19.5
  assert device_suite.device_peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert device_suite.device_peak_tflops("TPU v5", "bfloat16") == 459.0
  assert device_suite.device_peak_tflops("cpu", "float32") is None


def test_mfu_is_flops_over_the_datasheet_peak_or_the_measured_matmul():
  gpu = device_suite.with_mfu(dict(device_kind="NVIDIA H200", dtype="bfloat16", gflop=3000.0, step_s=0.01,
                                   device_peak_gib=40.0))
  assert gpu["tflops"] == pytest.approx(300.0) and gpu["mfu"] == pytest.approx(100 * 300 / 989.4)
  assert gpu["peak_source"] == "datasheet 989.4" and gpu["memory_gib"] == 40.0
  cpu = device_suite.with_mfu(dict(device_kind="cpu", dtype="float32", gflop=10.0, step_s=1.0, peak_gflops=50.0,
                                   peak_rss_gib=1.5))
  assert cpu["mfu"] == pytest.approx(20.0) and cpu["peak_source"] == "matmul" and cpu["memory_gib"] == 1.5


def _cells(line):
  return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_smoke_suite_runs_every_row(tmp_path):
  out = tmp_path / "table.md"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  done = subprocess.run(["bash", str(REPO / "benchmarks" / "device_suite.sh"), "--smoke", "--out", str(out)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  lines = [l for l in out.read_text().splitlines() if l.startswith("|")]
  header = _cells(lines[0])
  rows = [dict(zip(header, _cells(l))) for l in lines[2:]]
  expected = len(device_suite.SMOKE_STEPS) + 1
  assert len(rows) == expected and not any("skipped" in l for l in lines)
  for row, (name, batch, dtype) in zip(rows, device_suite.SMOKE_STEPS):
    assert row["row"] == f"SiD step {name}" and int(row["batch"]) == batch and row["dtype"] == dtype
    step_s, gflop = float(row["s/step or s/call"]), float(row["GFLOP/step"])
    assert step_s > 0 and gflop > 0 and float(row["compile s"]) > 0 and float(row["peak memory GiB"]) > 0
    assert float(row["images/s"]) == pytest.approx(batch / step_s, rel=2e-3)
    assert row["peak source"] == "matmul" and float(row["MFU %"]) > 0
  sampling = rows[-1]
  name, images, batch, _ = device_suite.SMOKE_SAMPLING
  assert re.match(rf"one-step sampling {name}, {images} images", sampling["row"])
  assert float(sampling["images/s"]) == pytest.approx(images / float(sampling["s/step or s/call"]), rel=2e-3)
