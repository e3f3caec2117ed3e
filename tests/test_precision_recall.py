"""Tests for sida_jax.metrics.precision_recall on constructed point sets and a brute-force reference."""
import numpy as np
import pytest
import scipy.spatial

from sida_jax.metrics import precision_recall as pr

# Ten real points on a line at x = 0..9. With k = 3 the k-th neighbour (self excluded) is 3 away for the
# two end points and 2 away for all others, so the balls cover x in [-3, 12] on the line.
GRID = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
FAKE = np.array([[5.0, 0.5],     # inside the balls of 4, 5, 6
                 [11.0, 0.0],    # inside the end ball of 9 (radius 3)
                 [-2.0, 0.0],    # inside the end ball of 0
                 [12.5, 0.0],    # beyond 9 + 3
                 [5.0, 2.5]])    # 2.5 from (5, 0) > 2, √7.25 from (4, 0) and (6, 0) > 2


def test_knn_radii_on_grid():
  np.testing.assert_allclose(pr.knn_radii(GRID, k=3, batch_size=4), [3, 2, 2, 2, 2, 2, 2, 2, 2, 3], rtol=1e-6)


def test_constructed_precision_and_recall():
  precision, _ = pr.precision_recall(GRID, FAKE, k=3, batch_size=3)
  assert precision == pytest.approx(3 / 5)
  # Recall of (real=FAKE, fake=GRID) is the coverage of FAKE by GRID's balls: the same 3 of 5.
  _, recall = pr.precision_recall(FAKE, GRID, k=3, batch_size=3)
  assert recall == pytest.approx(3 / 5)


def test_identical_and_disjoint_sets():
  points = np.random.default_rng(0).normal(size=[40, 6])
  assert pr.precision_recall(points, points) == (1.0, 1.0)
  assert pr.precision_recall(points, points + 100.0) == (0.0, 0.0)


def _brute_force(real, fake, k):
  def radii(x):
    return np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[:, k]

  def coverage(queries, centres):
    return np.mean(np.any(scipy.spatial.distance.cdist(queries, centres) <= radii(centres)[None], axis=1))

  return coverage(fake, real), coverage(real, fake)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force(k):
  rng = np.random.default_rng(k)
  real = rng.normal(size=[90, 5])
  fake = 0.7 * rng.normal(size=[70, 5]) + 1.5
  got = pr.precision_recall(real, fake, k=k, batch_size=16)
  np.testing.assert_allclose(got, _brute_force(real, fake, k), atol=1e-12)
  assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_rejects_bad_input():
  with pytest.raises(ValueError, match="differ in feature size"):
    pr.precision_recall(np.zeros([5, 3]), np.zeros([5, 4]))
  with pytest.raises(ValueError, match="k=3"):
    pr.knn_radii(np.zeros([3, 2]), k=3)
  with pytest.raises(ValueError, match="must be \\[N, D\\]"):
    pr.precision_recall(np.zeros([5]), np.zeros([5, 4]))
