"""EDM's denoising loss, for training a teacher (the MNIST demo) — not a distillation method.

    ℓ = λ(σ)·(D(y + σn; σ, c) − y)²,  ln σ ~ N(P_mean, P_std²),  λ(σ) = (σ² + σ_d²)/(σ σ_d)²
summed per sample and averaged over the batch (EDM's `loss.sum() / batch`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sida_jax.losses import common
from sida_jax.models.denoiser import Denoiser

Array = jax.Array


def edm_loss(denoiser: Denoiser, params, buffers: dict, images: Array, labels, rng: Array,
             p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
             augment_labels=None) -> Array:
  k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
  n = images.shape[0]
  sigma = common.lognormal_sigma(jax.random.normal(k_sigma, (n,)), p_mean, p_std)
  noise = jax.random.normal(k_noise, images.shape) * common.per_sample(sigma)
  if augment_labels is None:
    augment_labels = denoiser.zero_augment_labels(n)
  out = denoiser({"params": params, **buffers}, images + noise, sigma, labels, augment_labels, train=True,
                 rng=k_drop)
  weight = common.per_sample(common.edm_weight(sigma, sigma_data))
  return jnp.sum(weight * (out.denoised - images) ** 2) / n
