"""Pieces shared by the distillation losses: noise-level distributions, weights and reductions.

Conventions (the official SiD code's, see shared/spec ALGORITHMS.md §12.1): every loss tensor is summed over
all its elements, multiplied by its constant and divided by the number of samples on the device; the step
then averages gradients across devices, which makes the whole a global mean over samples of per-sample sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def edm_weight(sigma: Array, sigma_data: float = 0.5) -> Array:
  """EDM's loss weight λ(σ) = (σ² + σ_d²) / (σ σ_d)²."""
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def lognormal_sigma(normal: Array, p_mean: float, p_std: float) -> Array:
  """EDM's training σ = exp(P_mean + P_std·r) from a standard-normal draw r."""
  return jnp.exp(normal * p_std + p_mean)


def karras_sigma(t: Array, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> Array:
  """σ(t) = (σ_max^{1/ρ} + (1−t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ: t=0 → σ_min, t=1 → σ_max."""
  hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
  return (hi + (1 - t) * (lo - hi)) ** rho


def tmax_sigma(uniform: Array, tmax: float, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> Array:
  """The generator-loss σ: t = u·tmax/1000 with u ~ U[0, 1), mapped through `karras_sigma`."""
  return karras_sigma(uniform * tmax / 1000.0, sigma_min, sigma_max, rho)


def per_sample(x: Array) -> Array:
  """Broadcasts a per-sample vector [N] against NHWC images."""
  return x.reshape((-1, 1, 1, 1))


def finite_samples(*arrays: Array) -> Array:
  """[N] mask of samples whose every array is finite (the official code drops the others)."""
  mask = None
  for a in arrays:
    m = jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1)
    mask = m if mask is None else mask & m
  return mask


def masked_sum(x: Array, mask: Array) -> Array:
  """Sum over samples kept by `mask` (dropped samples still count in the divisor)."""
  x = x.reshape(x.shape[0], -1).sum(axis=1)
  return jnp.sum(jnp.where(mask, x, 0.0))


def sid_weight_factor(x_g: Array, teacher_out: Array) -> Array:
  """SiD's per-sample normaliser w = sg(max(mean_{HWC} |x_g − f_φ|, 1e-5)), shape [N,1,1,1]."""
  w = jnp.mean(jnp.abs(x_g - teacher_out).astype(jnp.float32), axis=(1, 2, 3), keepdims=True)
  return jax.lax.stop_gradient(jnp.maximum(w, 1e-5))


def group_mean(x: Array, pool_size: int, keep: Array | None = None) -> Array:
  """Mean of per-sample arrays over consecutive pools of `pool_size` samples, broadcast back to [N].

  SiDA averages its BCE over one device's micro-batch (all samples and logit positions); making the pool
  explicit lets results be independent of the device count. Samples outside `keep` are left out of the mean.
  """
  n = x.shape[0]
  if pool_size <= 0 or n % pool_size:
    raise ValueError(f"adv_pool_size={pool_size} must be positive and divide the batch of {n} samples of one "
                     f"accumulation round (set config.loss.adv_pool_size or config.grad_accum)")
  flat = x.reshape(n, -1)
  if keep is None:
    keep = jnp.ones((n,), bool)
  flat = jnp.where(keep[:, None], flat, 0.0)
  sums = flat.reshape(n // pool_size, -1).sum(axis=1)
  counts = keep.reshape(n // pool_size, pool_size).sum(axis=1) * flat.shape[1]
  return jnp.repeat(sums / jnp.maximum(counts, 1), pool_size)


def softplus(x: Array) -> Array:
  """BCE-with-logits pieces: BCE(l, 1) = softplus(−l), BCE(l, 0) = softplus(l)."""
  return jax.nn.softplus(x)
