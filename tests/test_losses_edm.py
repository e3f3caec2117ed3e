"""EDM's denoising loss (teacher training) against a direct numpy computation."""
import jax
import jax.numpy as jnp
import numpy as np

from sida_jax.losses import edm
from sida_jax.models import toy


def test_edm_loss_matches_the_formula_with_the_same_draws():
  denoiser = toy.toy_denoiser((16,))
  variables = toy.init_toy(denoiser, jax.random.key(0), (2, 2, 1))
  images = jnp.asarray(np.random.RandomState(0).randn(5, 2, 2, 1).astype(np.float32))
  rng = jax.random.key(3)
  loss = edm.edm_loss(denoiser, variables["params"], {}, images, None, rng, -1.2, 1.2, 0.5)
  # Re-derive with the same key splits.
  k_sigma, k_noise, _ = jax.random.split(rng, 3)
  sigma = np.exp(np.asarray(jax.random.normal(k_sigma, (5,))) * 1.2 - 1.2)
  noise = np.asarray(jax.random.normal(k_noise, images.shape)) * sigma[:, None, None, None]
  denoised = np.asarray(denoiser.module.apply(variables, images + noise, sigma))
  weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
  expected = np.sum(weight[:, None, None, None] * (denoised - np.asarray(images)) ** 2) / 5
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
