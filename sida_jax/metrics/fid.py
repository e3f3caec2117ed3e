"""Fréchet distance, feature statistics, reference-stat readers and the Inception Score.

Follows the official protocol (EDM `fid.py`, EDM2 `calculate_metrics.py`, stylegan2-ada `metrics/`):

* generated images are quantised as `uint8(clip(127.5 x + 128, 0, 255))` before the detector;
* feature statistics are accumulated in float64 with the unbiased (N - 1) covariance;
* FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with `scipy.linalg.sqrtm`, real part;
* the Inception Score uses 10 splits of the softmax probabilities.

Everything here runs on the host in numpy float64: the statistics are tiny compared with the detector
forward pass, and float64 is what the reference numbers were computed with.
"""
import pathlib
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from sida_jax.formats import pickle as pickle_lib


def quantize_images(images: jnp.ndarray) -> jnp.ndarray:
  """Generator output in [-1, 1] → uint8 the way EDM saves its PNGs (+128, then truncate)."""
  return jnp.clip(images * 127.5 + 128.0, 0.0, 255.0).astype(jnp.uint8)


class FeatureMoments(NamedTuple):
  """Running float64 sums of features: an accumulator that batches can be added to in any order."""
  count: int
  total: np.ndarray  # [D] sum of f
  total_outer: np.ndarray  # [D, D] sum of f f^T

  @classmethod
  def zeros(cls, feature_dim: int) -> "FeatureMoments":
    return cls(0, np.zeros([feature_dim], np.float64), np.zeros([feature_dim, feature_dim], np.float64))

  def update(self, features) -> "FeatureMoments":
    """Adds a batch of features [N, D] (any float dtype; summed in float64)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != self.total.shape[0]:
      raise ValueError(f"FeatureMoments.update: expected features [N, {self.total.shape[0]}], "
                       f"got shape {features.shape}")
    return FeatureMoments(self.count + features.shape[0], self.total + features.sum(0),
                          self.total_outer + features.T @ features)

  def merge(self, other: "FeatureMoments") -> "FeatureMoments":
    """Sum of two accumulators (e.g. from different hosts)."""
    return FeatureMoments(self.count + other.count, self.total + other.total,
                          self.total_outer + other.total_outer)

  def mean_and_covariance(self, unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma); unbiased divides by N - 1 (EDM/EDM2), biased by N (stylegan2-ada's generated side)."""
    if self.count < 2:
      raise ValueError(f"FeatureMoments: need at least 2 samples for a covariance, got {self.count}")
    mu = self.total / self.count
    sigma = (self.total_outer - self.count * np.outer(mu, mu)) / (self.count - int(unbiased))
    return mu, sigma


def feature_statistics(features, unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of features [N, D] in float64."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"feature_statistics: expected features [N, D], got shape {features.shape}")
  return FeatureMoments.zeros(features.shape[1]).update(features).mean_and_covariance(unbiased)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"frechet_distance: means must be vectors of one shape, got {mu1.shape} and {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"frechet_distance: covariances must be {mu1.shape * 2}, got {sigma1.shape} and "
                     f"{sigma2.shape}")
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A singular product (too few samples) can make sqrtm fail; pytorch-fid's remedy is a tiny ridge.
    offset = np.eye(mu1.shape[0]) * 1e-6
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  # Numerical noise gives sqrtm a small imaginary part; EDM keeps the real part of the result.
  distance = np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2.0 * covmean)
  return float(np.real(distance))


def fid_from_features(features, ref_mu, ref_sigma) -> float:
  """FID of a feature set [N, D] against reference statistics (unbiased covariance, as EDM)."""
  mu, sigma = feature_statistics(features)
  return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def load_reference_stats(path, metric: str = "fid") -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) float64 from an EDM reference `.npz` or an EDM2 reference `.pkl`.

  EDM's `.npz` holds `mu`, `sigma` (FID only); EDM2's `.pkl` holds {metric: {'mu', 'sigma'}, ...,
  'num_images'} for metric in ('fid', 'fd_dinov2'). Pickles go through the project's allow-listed
  reader (plain values and numeric numpy arrays only); a refused file raises UnsafePickleError.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix == ".npz":
    if metric != "fid":
      raise ValueError(f"load_reference_stats: {path} is an EDM .npz, which holds only 'fid', not '{metric}'")
    with np.load(path, allow_pickle=False) as data:
      missing = {"mu", "sigma"} - set(data.files)
      if missing:
        raise ValueError(f"load_reference_stats: {path} lacks keys {sorted(missing)}")
      stats = {"mu": data["mu"], "sigma": data["sigma"]}
  elif suffix == ".pkl":
    stats_by_metric = pickle_lib.read_pickle(path, "reference statistics")
    if not isinstance(stats_by_metric, dict):
      raise ValueError(f"load_reference_stats: {path} does not hold a dict")
    if metric not in stats_by_metric:
      known = sorted((k for k in stats_by_metric if k != "num_images"), key=str)
      raise ValueError(f"load_reference_stats: {path} has no '{metric}' stats (has {known})")
    stats = stats_by_metric[metric]
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), np.ndarray) for k in ("mu", "sigma")):
      raise ValueError(f"load_reference_stats: {path}['{metric}'] does not hold 'mu' and 'sigma' arrays")
  else:
    raise ValueError(f"load_reference_stats: unknown file type '{path.suffix}' (expected .npz or .pkl)")
  mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f"load_reference_stats: {path} has mu {mu.shape} and sigma {sigma.shape}")
  return mu, sigma


def save_reference_stats(path, mu, sigma) -> None:
  """Writes (mu, sigma) as an EDM-style `.npz` that EDM's `fid.py calc --ref` accepts."""
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), from classifier logits [N, C].

  Splits are contiguous slices `[i N // s, (i + 1) N // s)` as in stylegan2-ada's `metric_is`.
  Computed in float64 from log-softmax, so p log p stays finite for saturated probabilities.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"inception_score: expected logits [N, C], got shape {logits.shape}")
  num = logits.shape[0]
  if not 1 <= num_splits <= num:
    raise ValueError(f"inception_score: num_splits={num_splits} must be in [1, N={num}]")
  log_probs = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for i in range(num_splits):
    part = log_probs[i * num // num_splits:(i + 1) * num // num_splits]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))
