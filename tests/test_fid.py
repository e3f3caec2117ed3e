"""Tests for sida_jax.metrics.fid: Fréchet distance, statistics, reference files, quantisation, IS."""
import os
import pickle

import numpy as np
import pytest
import scipy.special

from sida_jax.formats.pickle import UnsafePickleError
from sida_jax.metrics import fid


def _random_covariance(rng, dim):
  a = rng.normal(size=[dim, 2 * dim])
  return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


def _frechet_by_eigh(mu1, sigma1, mu2, sigma2):
  """Independent FD: tr sqrtm(S1 S2) = tr sqrt(S1^½ S2 S1^½), the latter symmetric PSD (eigh only)."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.maximum(w, 0))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  trace_sqrt = np.sqrt(np.maximum(inner, 0)).sum()
  return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt


def test_frechet_distance_matches_eigh_formula():
  rng = np.random.default_rng(0)
  dim = 24
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
  expected = _frechet_by_eigh(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, sigma1, mu2, sigma2), expected, rtol=1e-10)


def test_frechet_distance_identical_sets_is_zero():
  features = np.random.default_rng(1).normal(size=[500, 32])
  mu, sigma = fid.feature_statistics(features)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
  assert abs(fid.fid_from_features(features, mu, sigma)) < 1e-9


def test_frechet_distance_closed_form_for_commuting_gaussians():
  # With S1 = Q diag(a) Qᵀ and S2 = Q diag(b) Qᵀ: FD = |mu1 - mu2|² + Σ (√a - √b)².
  rng = np.random.default_rng(2)
  dim = 16
  q, _ = np.linalg.qr(rng.normal(size=[dim, dim]))
  a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="covariances"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_statistics_match_numpy_and_accumulate_in_any_order():
  rng = np.random.default_rng(3)
  features = rng.normal(size=[301, 10]).astype(np.float32) * 3 + 1
  mu, sigma = fid.feature_statistics(features)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
  _, biased = fid.feature_statistics(features, unbiased=False)
  np.testing.assert_allclose(biased, np.cov(features.astype(np.float64), rowvar=False, bias=True),
                             rtol=1e-10, atol=1e-12)

  moments = fid.FeatureMoments.zeros(10)
  for batch in np.array_split(features[::-1], 7):
    moments = moments.update(batch)
  halves = fid.FeatureMoments.zeros(10).update(features[:100]).merge(
      fid.FeatureMoments.zeros(10).update(features[100:]))
  for accumulated in (moments, halves):
    assert accumulated.count == 301
    acc_mu, acc_sigma = accumulated.mean_and_covariance()
    np.testing.assert_allclose(acc_mu, mu, rtol=1e-12)
    np.testing.assert_allclose(acc_sigma, sigma, rtol=1e-10, atol=1e-12)


def test_feature_moments_rejects_bad_input():
  with pytest.raises(ValueError, match="expected features"):
    fid.FeatureMoments.zeros(4).update(np.zeros([3, 5]))
  with pytest.raises(ValueError, match="at least 2"):
    fid.FeatureMoments.zeros(4).update(np.zeros([1, 4])).mean_and_covariance()


def test_quantize_images_matches_edm_formula():
  x = np.concatenate([np.array([-1.5, -1.0, -0.997, 0.0, 0.5, 0.999, 1.0, 2.0], np.float32),
                      np.random.default_rng(4).uniform(-1.1, 1.1, 1000).astype(np.float32)])
  got = np.asarray(fid.quantize_images(x))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got[:8], [0, 0, 0, 128, 191, 255, 255, 255])
  np.testing.assert_array_equal(got, np.floor(np.clip(x * np.float32(127.5) + 128, 0, 255)).astype(np.uint8))


def test_reference_stats_npz_and_pkl(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=8), _random_covariance(rng, 8)
  fid.save_reference_stats(tmp_path / "ref.npz", mu, sigma)
  got_mu, got_sigma = fid.load_reference_stats(tmp_path / "ref.npz")
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)

  # EDM2 layout: {metric: {'mu', 'sigma'}, 'num_images'}, pickled by plain pickle.dump.
  stats = dict(num_images=50000, fid=dict(mu=mu, sigma=sigma),
               fd_dinov2=dict(mu=mu[:4].astype(np.float32), sigma=sigma[:4, :4]))
  for protocol in (2, 4, pickle.HIGHEST_PROTOCOL):
    (tmp_path / "ref.pkl").write_bytes(pickle.dumps(stats, protocol=protocol))
    got_mu, got_sigma = fid.load_reference_stats(tmp_path / "ref.pkl")
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    dino_mu, _ = fid.load_reference_stats(tmp_path / "ref.pkl", metric="fd_dinov2")
    assert dino_mu.dtype == np.float64
    np.testing.assert_array_equal(dino_mu, mu[:4].astype(np.float32))
  with pytest.raises(ValueError, match="no 'kid' stats"):
    fid.load_reference_stats(tmp_path / "ref.pkl", metric="kid")
  with pytest.raises(ValueError, match="unknown file type"):
    fid.load_reference_stats(tmp_path / "ref.txt")


class _Exploit:
  def __reduce__(self):
    return (os.system, ("true",))


def test_reference_stats_pickle_refuses_foreign_globals(tmp_path):
  (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"fid": _Exploit()}))
  with pytest.raises(UnsafePickleError, match="refusing to load global 'posix.system'.*bad.pkl"):
    fid.load_reference_stats(tmp_path / "bad.pkl")


def test_inception_score_closed_forms():
  # Confident, class-balanced predictions: KL = log C in every split, so IS = C with zero spread.
  num_classes, per_split = 5, 20
  labels = np.tile(np.arange(num_classes), 10 * per_split // num_classes)
  confident = 200.0 * np.eye(num_classes)[labels]
  mean, std = fid.inception_score(confident, num_splits=10)
  np.testing.assert_allclose([mean, std], [num_classes, 0.0], atol=1e-9)
  # Identical predictions: p(y|x) = p(y), so IS = 1.
  mean, _ = fid.inception_score(np.tile([[0.3, -1.0, 2.0]], [30, 1]), num_splits=3)
  np.testing.assert_allclose(mean, 1.0, atol=1e-12)
  # Two splits with hand-computed KLs: split 1 holds p = (a, 1-a) and (1-a, a), marginal (½, ½).
  a = scipy.special.expit(1.5)
  kl = a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a))
  logits = np.array([[1.5, 0.0], [0.0, 1.5], [4.0, 4.0], [-2.0, -2.0]])
  mean, std = fid.inception_score(logits, num_splits=2)
  np.testing.assert_allclose([mean, std], [(np.exp(kl) + 1) / 2, (np.exp(kl) - 1) / 2], rtol=1e-12)


def test_inception_score_matches_probability_space_formula():
  logits = np.random.default_rng(6).normal(size=[103, 17]) * 3
  probs = scipy.special.softmax(logits, axis=1)
  scores = []
  for i in range(10):
    part = probs[i * 103 // 10:(i + 1) * 103 // 10]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  np.testing.assert_allclose(fid.inception_score(logits), [np.mean(scores), np.std(scores)], rtol=1e-10)
  with pytest.raises(ValueError, match="num_splits"):
    fid.inception_score(logits[:5])
