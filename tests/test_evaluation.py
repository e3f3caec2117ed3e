"""evaluation: batch-size-independent generation, detector statistics, FID ordering with the MNIST proxy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax import evaluation, sampling
from sida_jax.metrics import fid
from sida_jax.metrics import mnist_features


def _fake_generator(calls):
  """A deterministic conditional 'generator' that records the batch shapes it is called with."""
  def generate(z, labels):
    calls.append(z.shape[0])
    shift = 0.0 if labels is None else jnp.argmax(labels, axis=1).reshape(-1, 1, 1, 1) * 0.1
    return jnp.tanh(z * 0.7 + shift)
  return generate


@pytest.mark.parametrize("label_dim", [0, 5])
def test_generated_batches_do_not_depend_on_batch_size(label_dim):
  seeds, shape = [4, 0, 9, 2, 13, 7, 1], (3, 3, 2)
  z, labels = sampling.seed_noise(seeds, shape, label_dim)
  expected = sampling.to_uint8(_fake_generator([])(jnp.asarray(z), None if labels is None else jnp.asarray(labels)))
  for batch_size in (1, 3, 8):
    calls = []
    batches = list(evaluation.generated_batches(_fake_generator(calls), seeds, shape, label_dim, batch_size))
    assert calls == [batch_size] * -(-len(seeds) // batch_size)   # padded: one shape, one compilation
    assert [len(b) for b in batches][-1] == len(seeds) - batch_size * (len(batches) - 1)
    out = np.concatenate(batches)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_detector_statistics_equal_feature_statistics():
  rng = np.random.default_rng(0)
  proj = rng.normal(size=(12, 6))

  def features(images):
    flat = images.reshape(len(images), -1).astype(np.float64)
    return flat @ proj, flat[:, :3]
  detector = evaluation.Detector("linear", features)
  batches = [rng.integers(0, 256, size=(n, 2, 2, 3), dtype=np.uint8) for n in (5, 1, 7)]
  mu, sigma, logits, feats = detector.statistics(iter(batches), keep_features=True)
  all_feats = np.concatenate([features(b)[0] for b in batches])
  ref_mu, ref_sigma = fid.feature_statistics(all_feats)
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10, atol=1e-9)
  np.testing.assert_allclose(sigma, np.cov(all_feats, rowvar=False), rtol=1e-10, atol=1e-9)
  np.testing.assert_array_equal(feats, all_feats)
  np.testing.assert_array_equal(logits, np.concatenate([features(b)[1] for b in batches]))
  _, _, _, none = detector.statistics(iter(batches))
  assert none is None
  with pytest.raises(ValueError, match="no images"):
    detector.statistics(iter([]))


def _real_digits(n):
  train_x, _, _, _ = mnist_features.mnist_5k_split()
  return train_x[:n]


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (16, 16, 3)])
def test_mnist_fid_ranks_real_digits_above_noise(image_shape):
  res, _, ch = image_shape
  digits = _real_digits(256)
  if res != 28:   # the shape of the smoke network: the detector resizes to its own input size
    digits = np.asarray(jax.image.resize(digits, (len(digits), res, res, 1), "bilinear"))
  digits = np.repeat(digits, ch, axis=3)
  position = []

  def real(z, labels):   # hands out the digits in order, whatever z is
    start = sum(position)
    position.append(z.shape[0])
    batch = digits[start:start + z.shape[0]]
    return jnp.asarray(np.concatenate([batch, np.zeros((z.shape[0] - len(batch), *image_shape))]))

  detector = evaluation.make_detector("mnist")
  reference = evaluation.reference_statistics(detector, "", res)
  np.testing.assert_allclose(reference[0], mnist_features.mnist_reference_stats(
      evaluation.mnist_resolution(res))[0])
  results_real = evaluation.evaluate(real, image_shape, 0, detector, reference, 256, 100)
  results_noise = evaluation.evaluate(lambda z, y: jnp.clip(z, -1, 1), image_shape, 0, detector, reference,
                                      256, 100)
  assert set(results_real) == {"fid"}
  assert np.isfinite(results_real["fid"]) and results_real["fid"] >= 0
  margin = 5 if res == 28 else 2   # resized digits are blurrier than the reference, but far from noise
  assert results_noise["fid"] > margin * results_real["fid"], (results_real, results_noise)


def test_detector_and_reference_errors():
  with pytest.raises(ValueError, match="config.eval.detector='nope'"):
    evaluation.make_detector("nope")
  with pytest.raises(ValueError, match="detector_path"):
    evaluation.make_detector("inception")
  with pytest.raises(ValueError, match="ref_stats"):
    evaluation.reference_statistics(evaluation.Detector("inception", lambda x: x), "", 32)
