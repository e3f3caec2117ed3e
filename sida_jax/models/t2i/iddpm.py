"""PixArt-α's transformer as an EDM denoiser D(x; σ, c), with EDM's iDDPM+DDIM preconditioning ([001] App. B.3).

SIM rewrites PixArt in EDM form (ALGORITHMS.md §1.2, §4.6, §12.19):

    D(x; σ, c) = c_skip·x + c_out·F_θ(c_in·x; c_noise, c)[ε channels]
               = x − σ·ε_θ(x/√(σ² + 1), t(σ), c)[:C],

c_skip = 1, c_out = −σ, c_in = 1/√(σ² + 1) at the given σ, and c_noise = t(σ), the integer DDPM time whose
σ_t = √((1 − ᾱ_t)/ᾱ_t) is nearest to σ (|σ_t − σ|, EDM's `round_sigma`), on the grid of the pipeline's
scheduler (`ddpm.DiscreteSchedule`). The transformer's output has 2C channels, ε and the learned-variance
values; only the first C (the latent channels) are kept. The condition c is the T5 embedding of the prompt with
its attention mask, {'embedding': [N, L, D], 'mask': [N, L]}, the transformer's `encoder_hidden_states` and
`encoder_attention_mask`.

The official SIM code builds its σ grid with EDM's iDDPM recursion over β(j) = β_end + (β_start − β_end)·j/M,
j = 1…M, which is the pipeline's β grid shifted by one step of 1.99e-5 (σ range [0.0100005, 156.6155] rather
than the scheduler's [0.0100013, 157.4073]); the grid here is the pipeline's own ᾱ_t, the schedule PixArt was
trained on (docs/t2i_sim.md compares the two).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sida_jax.models.t2i import ddpm

Array = jax.Array
EMBEDDING, MASK = 'embedding', 'mask'


def text_condition(embedding: Array, mask: Array) -> dict:
  """The condition pytree of a masked text encoder: what the step carries as `labels`."""
  return {EMBEDDING: embedding, MASK: mask}


def preconditioning(sigma: Array) -> tuple:
  """(c_skip, c_out, c_in) of iDDPM+DDIM in EDM form at σ (float32, σ's shape)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return jnp.ones_like(sigma), -sigma, 1 / jnp.sqrt(sigma ** 2 + 1)


def edm_denoise(network, schedule: ddpm.DiscreteSchedule, variables: dict, x: Array, sigma: Array,
                condition: Mapping[str, Array]) -> Array:
  """D(x; σ, c) of a PixArt transformer `network.apply(variables, x_in, t, embedding, mask) -> [N, H, W, 2C]`
  (NHWC; σ a scalar or [N]; float32 out)."""
  n, channels = x.shape[0], x.shape[-1]
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,))
  c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in preconditioning(sigma))
  x = x.astype(jnp.float32)
  out = network.apply(variables, c_in * x, schedule.nearest_timestep(sigma), condition[EMBEDDING],
                      condition[MASK])
  return c_skip * x + c_out * out[..., :channels].astype(jnp.float32)
