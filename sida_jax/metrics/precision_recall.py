"""Improved precision and recall (Kynkäänniemi et al. 2019) on feature vectors, in JAX.

As stylegan2-ada's `pr50k3_full` (used by EDM/SiD for ImageNet 64): every point of a set gets a ball
whose radius is the distance to its k-th nearest neighbour in the same set (k = 3, the point itself not
counted); precision is the fraction of generated points inside at least one real ball, recall the
fraction of real points inside at least one generated ball. Distances are computed in row batches so
memory stays at batch × set size, whatever the set sizes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _squared_distances(rows: jnp.ndarray, cols: jnp.ndarray) -> jnp.ndarray:
  """Pairwise squared Euclidean distances [R, C] via |a|² + |b|² - 2ab (clamped at 0)."""
  dots = jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(rows**2, 1)[:, None] + jnp.sum(cols**2, 1)[None, :] - 2.0 * dots
  return jnp.maximum(sq, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_sq_distance(rows: jnp.ndarray, cols: jnp.ndarray, k: int) -> jnp.ndarray:
  # The (k + 1)-th smallest distance skips the row's own zero distance to itself.
  return -jax.lax.top_k(-_squared_distances(rows, cols), k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(rows: jnp.ndarray, centres: jnp.ndarray, sq_radii: jnp.ndarray) -> jnp.ndarray:
  return jnp.any(_squared_distances(rows, centres) <= sq_radii[None, :], axis=1)


def _check_features(name: str, features) -> jnp.ndarray:
  features = jnp.asarray(features, jnp.float32)
  if features.ndim != 2:
    raise ValueError(f"precision_recall: {name} features must be [N, D], got shape {features.shape}")
  return features


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> np.ndarray:
  """Distance of each point of features [N, D] to its k-th nearest other point, [N] float32."""
  features = _check_features("the", features)
  if not 1 <= k < features.shape[0]:
    raise ValueError(f"knn_radii: k={k} must be in [1, N - 1] for N={features.shape[0]} points")
  sq = [_kth_neighbour_sq_distance(features[i:i + batch_size], features, k)
        for i in range(0, features.shape[0], batch_size)]
  return np.sqrt(np.asarray(jnp.concatenate(sq)))


def manifold_coverage(queries, manifold, radii, batch_size: int = 1024) -> float:
  """Fraction of query points inside at least one ball (centre manifold[i], radius radii[i])."""
  queries, manifold = _check_features("query", queries), _check_features("manifold", manifold)
  if queries.shape[1] != manifold.shape[1] or np.shape(radii) != manifold.shape[:1]:
    raise ValueError(f"manifold_coverage: queries {queries.shape}, manifold {manifold.shape} and radii "
                     f"{np.shape(radii)} do not fit together")
  sq_radii = jnp.square(jnp.asarray(radii, jnp.float32))
  inside = [_inside_any_ball(queries[i:i + batch_size], manifold, sq_radii)
            for i in range(0, queries.shape[0], batch_size)]
  return float(np.mean(np.asarray(jnp.concatenate(inside))))


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
  """(precision, recall) of generated features [M, D] against real features [N, D]."""
  real = _check_features("real", real_features)
  fake = _check_features("fake", fake_features)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall: real {real.shape} and fake {fake.shape} differ in feature size")
  precision = manifold_coverage(fake, real, knn_radii(real, k, batch_size), batch_size)
  recall = manifold_coverage(real, fake, knn_radii(fake, k, batch_size), batch_size)
  return precision, recall
