"""Smoke checks of the benchmark scripts' core functions (no timing assertions)."""
import math
import os
import pathlib
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import ab_sampling  # noqa: E402
import bench_sampling  # noqa: E402
import bench_step  # noqa: E402
import common  # noqa: E402

from sida_jax.models import convert, registry  # noqa: E402


# The benchmark's smoke network: the conditional 16² DDPM++ that the public fixture README tabulates (not read
# from any fixture folder: this is about the benchmark's network, whatever fixture set a run checks).
SMOKE_NETWORK = dict(
    model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
    attn_resolutions=[8], augment_dim=9, dropout=0.0, use_fp16=False, img_resolution=16, img_channels=3,
    label_dim=10)
SMOKE_NETWORK_PARAMS = 318_019


def _smoke_param_count():
  network = registry.build_network("EDMPrecond", common.SMOKE_KWARGS)
  return convert.count_params(convert.variables_template(network))


def test_smoke_network_has_the_tabulated_layout_and_size():
  assert common.SMOKE_KWARGS.items() >= SMOKE_NETWORK.items()
  assert _smoke_param_count() == SMOKE_NETWORK_PARAMS


def test_counted_flops_of_a_matmul_is_2n3():
  n = 64
  a = jnp.ones((n, n))
  _, seconds, flops = common.compile_timed(jax.jit(jnp.dot), a, a)
  assert seconds > 0
  assert flops == 2 * n ** 3


def test_unknown_config_is_rejected():
  with pytest.raises(ValueError, match="unknown benchmark config 'cifar100'"):
    common.bench_config("cifar100")


def test_markdown_table_formats_and_marks_skipped_rows():
  columns = (("config", "config", ""), ("batch", "batch", "d"), ("step s", "step_s", ".2f"), ("x", "x", ".1f"))
  table = common.markdown_table([dict(config="a", batch=8, step_s=0.125, x=float("nan")),
                                 dict(config="b", batch=2, skipped="too big")], columns)
  assert table.splitlines() == ["| config | batch | step s | x |", "|---|---|---|---|",
                                "| a | 8 | 0.12 | – |", "| b | 2 | skipped: too big |  |"]


@pytest.mark.slow
def test_measure_step_smoke_reports_sane_fields():
  row = bench_step.measure_step("smoke", steps=2, devices=1)
  assert row["params_m"] * 1e6 == pytest.approx(_smoke_param_count())
  assert (row["batch"], row["devices"], row["dtype"]) == (8, 1, "float32")
  assert row["matmul_precision"] == "highest"
  assert row["finite"] and set(row["losses"]) >= {"loss_critic", "loss_generator"}
  assert len(row["step_times"]) == 2 and row["step_s"] == pytest.approx(sorted(row["step_times"])[1] / 2
                                                                        + sorted(row["step_times"])[0] / 2)
  assert row["images_per_s"] == pytest.approx(8 / row["step_s"])
  # An SiD iteration runs the U-Net forward and backward several times: far more FLOPs than one forward.
  assert row["gflop"] > 0.5
  assert row["achieved_gflops"] == pytest.approx(row["gflop"] / row["step_s"])
  assert 0 < row["percent_of_peak"] == pytest.approx(100 * row["achieved_gflops"] / row["peak_gflops"])
  assert row["peak_rss_gib"] > 0 and row["compile_s"] > 0


def test_measure_step_skips_impossible_splits():
  with pytest.raises(common.Skip, match="batch 8 does not split over 3 devices"):
    bench_step.measure_step("smoke", steps=1, devices=3)


def test_measure_sampling_smoke_rows():
  one_step, heun = bench_sampling.measure_sampling("smoke", batch_size=2, heun_steps=2, repeats=1)
  assert (one_step["nfe"], heun["nfe"]) == (1, 3)
  for row in (one_step, heun):
    assert row["finite"] and row["image_shape"] == (2, 16, 16, 3)
    assert row["images_per_s"] == pytest.approx(2 / row["batch_s"])
  assert one_step["speedup"] == pytest.approx(one_step["images_per_s"] / heun["images_per_s"])
  # Heun with 3 network calls counts about 3 times the FLOPs of one generator call.
  assert heun["gflop"] == pytest.approx(3 * one_step["gflop"], rel=0.05)
  assert math.isfinite(heun["compile_s"])


def _compare_args(**overrides):
  args = bench_step.parse_args(["--configs", "ddpmpp-tiny", "--steps", "2", "--compare-torch"])
  for key, value in overrides.items():
    setattr(args, key, value)
  return args


def test_compare_torch_skips_with_a_reason(monkeypatch):
  monkeypatch.delenv("SIDA_TORCH_PYTHON", raising=False)
  monkeypatch.delenv("SIDA_OFFICIAL_CODE", raising=False)
  with pytest.raises(common.Skip, match="needs --torch_python"):
    bench_step.compare_torch(_compare_args(), "ddpmpp-tiny")
  with pytest.raises(common.Skip, match="needs --official-code"):
    bench_step.compare_torch(_compare_args(torch_python=sys.executable), "ddpmpp-tiny")
  with pytest.raises(common.Skip, match="has no official SiD"):
    bench_step.torch_spec("edm2-xs")
  try:
    import torch  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError:
    with pytest.raises(common.Skip, match="cannot import torch"):
      bench_step.compare_torch(_compare_args(torch_python=sys.executable, official_code="x"), "ddpmpp-tiny")


def test_sida_rows_use_the_recipe_past_its_warm_up_with_a_real_batch():
  config = common.bench_config("cifar10", method="sida")
  recipe = __import__("configs.cifar10_uncond", fromlist=["get_config"]).get_config("sida")
  assert config.method == "sida" and config.data.source == "mnist5k" and (config.data.resolution, config.data.channels) == (32, 3)
  assert config.loss.sid_only_kimg == config.loss.critic_only_kimg == 0.0 and config.loss.adv_pool_size == config.batch_size
  assert config.loss.discriminator_scale == recipe.loss.discriminator_scale
  assert config.loss.adversarial_scale == recipe.loss.adversarial_scale and config.loss.alpha == recipe.loss.alpha
  spec = bench_step.torch_spec("cifar10", method="sida")
  assert (spec["lsd"], spec["lsg_gan"], spec["alpha"]) == (recipe.loss.discriminator_scale,
                                                            recipe.loss.adversarial_scale, recipe.loss.alpha)
  with pytest.raises(common.Skip, match="SiDA rows run on cifar10"):
    common.bench_config("smoke", method="sida")


def test_compare_torch_runs_the_official_step_alternately():
  """Needs $SIDA_TORCH_PYTHON (a Python with torch) and $SIDA_OFFICIAL_CODE (the official SiD code)."""
  import os  # pylint: disable=import-outside-toplevel
  if not (os.environ.get("SIDA_TORCH_PYTHON") and os.environ.get("SIDA_OFFICIAL_CODE")):
    pytest.skip("set SIDA_TORCH_PYTHON and SIDA_OFFICIAL_CODE to run the official PyTorch step")
  row = bench_step.compare_torch(_compare_args(timeout=900), "ddpmpp-tiny")
  # Both sides built the same network: the official EDMPrecond has exactly our parameter count.
  assert row["torch_params_m"] == pytest.approx(row["params_m"], abs=1e-6)
  assert len(row["jax_times"]) == len(row["torch_times"]) == 2
  assert row["ratio"] == pytest.approx(row["jax_s"] / row["torch_s"])
  assert row["jax_rss_gib"] > 0 and row["torch_rss_gib"] > 0 and row["torch_threads"] >= 1


def _sampling_compare_args(**overrides):
  args = bench_sampling.parse_args(["--configs", "ddpmpp-tiny", "--compare-torch", "--images", "8", "--batch", "4",
                                    "--heun_steps", "2", "--rounds", "2"])
  for key, value in overrides.items():
    setattr(args, key, value)
  return args


def test_sampling_compare_torch_skips_with_a_reason(monkeypatch):
  for name in ("SIDA_TORCH_PYTHON", "SIDA_OFFICIAL_CODE", "SIDA_OFFICIAL_EDM"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(common.Skip, match="needs --torch_python"):
    bench_sampling.compare_torch(_sampling_compare_args(), "ddpmpp-tiny")
  with pytest.raises(common.Skip, match="needs --official-code SID_DIR and --official-edm EDM_DIR"):
    bench_sampling.compare_torch(_sampling_compare_args(torch_python=sys.executable, official_code="x"), "ddpmpp-tiny")


def test_sampling_compare_torch_runs_the_official_samplers_alternately():
  """Needs $SIDA_TORCH_PYTHON, $SIDA_OFFICIAL_CODE (the official SiD code) and $SIDA_OFFICIAL_EDM (EDM's)."""
  import os  # pylint: disable=import-outside-toplevel
  if not all(os.environ.get(n) for n in ("SIDA_TORCH_PYTHON", "SIDA_OFFICIAL_CODE", "SIDA_OFFICIAL_EDM")):
    pytest.skip("set SIDA_TORCH_PYTHON, SIDA_OFFICIAL_CODE and SIDA_OFFICIAL_EDM to run the official samplers")
  one_step, heun = bench_sampling.compare_torch(_sampling_compare_args(), "ddpmpp-tiny")
  for row in (one_step, heun):
    assert row["torch_params_m"] == pytest.approx(row["params_m"], abs=1e-6) and row["finite"]
    assert len(row["jax_times"]) == len(row["torch_times"]) == 2
    assert row["ratio"] == pytest.approx(statistics.median(row["jax_times"]) / statistics.median(row["torch_times"]))
  assert (one_step["nfe"], one_step["images"], heun["nfe"], heun["images"]) == (1, 8, 3, 4)


def test_profile_classifies_operations_by_contents_and_name_stack():
  import profile_step  # pylint: disable=import-outside-toplevel
  fwd, bwd = "jit(step)/jvp(EDMPrecond)/model/enc.16x16_block0", "jit(step)/transpose(jvp(EDMPrecond))/model/dec.8x8_up"
  assert profile_step.classify("fusion", f"{fwd}/conv0/conv_general_dilated", {"convolution"}) == "conv fwd"
  assert profile_step.classify("fusion", f"{bwd}/conv1/conv_general_dilated", {"convolution"}) == "conv bwd"
  assert profile_step.classify("fusion", "", {"convolution"}) == "conv (pass unknown)"
  assert profile_step.classify("fusion", f"{bwd}/norm1/mul", {"multiply", "add"}) == "GroupNorm bwd"
  assert profile_step.classify("fusion", f"{fwd}/nqhc,nkhc->nhqk/dot_general", {"dot"}) == "attention dot fwd"
  assert profile_step.classify("copy", "", set()) == "transpose/copy"
  assert profile_step.classify("fusion", f"{fwd}/jit(silu)/div", {"divide", "exponential"}) == "elementwise fwd"
  # On a real optimised module: the convolution of a gradient program is found through its fusion.
  x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((4, 4, 3, 3))
  conv = lambda w: jnp.sum(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "OIHW", "NHWC")) ** 2)
  hlo = profile_step.parse_hlo(jax.jit(jax.grad(conv)).lower(w).compile().as_text())
  assert any(profile_step.classify(*entry).startswith("conv") for entry in hlo.values())


@pytest.mark.parametrize("mode", ab_sampling.MODES)
def test_ab_sampling_measures_either_way_of_passing_the_weights(mode):
  row = ab_sampling.measure("smoke", mode, batch=2, repeats=2)
  assert row["mode"] == mode
  assert 0 < row["call_s"] < row["first_s"]     # the first call compiles
  assert row["peak_rss_gib"] > 0.1 and row["load"] >= 0


def test_compile_split_sums_the_parts_and_their_shares():
  import compile_split  # pylint: disable=import-outside-toplevel
  record = lambda test, wall, compile_s, trace, lower, load, n, misses, hits: dict(
      test=test, wall_s=wall, compile_s=compile_s, trace_s=trace, lower_s=lower, cache_load_s=load, compiles=n,
      cache_misses=misses, cache_hits=hits)
  table = compile_split.summarize([record("tests/test_a.py::x", 10.0, 6.0, 1.0, 0.5, 0.5, 3, 1, 0),
                                   record("tests/test_a.py::y", 5.0, 1.5, 0.5, 0.0, 1.0, 2, 0, 1),
                                   record("tests/test_b.py::z", 5.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)])
  lines = table.splitlines()
  assert "| XLA compiling (5 programs; 1 persistent-cache misses, 1 hits) | 7.5 | 37.5 % |" in lines
  assert "| tracing | 1.5 | 7.5 % |" in lines and "| loading programs from the persistent cache | 1.5 | 7.5 % |" in lines
  assert "| everything else (running, Python, I/O, subprocesses) | 9.0 | 45.0 % |" in lines
  assert "| all 3 test calls | 20.0 | |" in lines
  assert lines.index("| tests/test_a.py | 2 | 15.0 | 7.5 |") < lines.index("| tests/test_b.py | 1 | 5.0 | 0.0 |")
  with pytest.raises(ValueError, match="no test records"):
    compile_split.summarize([])


def test_compile_split_plugin_records_compiles_and_persistent_cache_hits(tmp_path):
  """Two pytest runs of one test file with the plugin and a persistent cache: the first compiles (a miss),
  the second loads the same program (a hit, no miss); a test without JAX records nothing but its time."""
  import compile_split  # pylint: disable=import-outside-toplevel
  (tmp_path / "test_tiny.py").write_text(
      "import jax, jax.numpy as jnp\n\n"
      "def test_compiles():\n"
      "  assert float(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.float32(0.5))) > 1\n\n"
      "def test_no_jax():\n"
      "  assert sum(range(4)) == 6\n")
  benchmarks = pathlib.Path(compile_split.__file__).parent
  runs = []
  for run in range(2):
    out = tmp_path / f"run{run}.jsonl"
    env = dict(os.environ, PYTHONPATH=str(benchmarks), SIDA_COMPILE_SPLIT_OUT=str(out),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "compile_split", "-p", "no:cacheprovider",
                           "-p", "no:xdist", str(tmp_path / "test_tiny.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs.append({r["test"].split("::")[-1]: r for r in compile_split.read_records(str(out))})
  first, second = runs
  assert first["test_compiles"]["compiles"] >= 1 and first["test_compiles"]["compile_s"] > 0
  assert first["test_compiles"]["trace_s"] > 0 and first["test_compiles"]["lower_s"] > 0
  assert first["test_compiles"]["cache_misses"] >= 1 and first["test_compiles"]["cache_hits"] == 0
  assert second["test_compiles"]["cache_hits"] >= 1 and second["test_compiles"]["cache_misses"] == 0
  assert second["test_compiles"]["cache_load_s"] > 0
  for field in ("compiles", "compile_s", "trace_s", "lower_s", "cache_load_s", "cache_hits", "cache_misses"):
    assert first["test_no_jax"][field] == 0
  assert first["test_no_jax"]["wall_s"] >= 0
  assert "| all 2 test calls |" in compile_split.summarize(first.values())
