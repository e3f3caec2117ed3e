"""SIM: score implicit matching with the pseudo-Huber distance, for EDM-form teachers ([001] Alg. 2).

Critic (fake score network d_ψ): SiD's denoising loss, unchanged (ln σ ~ N(−1.2, 1.2²), weight λ_EDM).
Generator, with ln σ ~ N(−3.5, 2.5²) (p_SIM), weight 1 and x_t = x_g + σn:
    y  = d_ψ(x_t; σ) − d_φ(x_t; σ)                                  (fake − teacher, denoiser space)
    ℓ  = −(y / √(‖y‖² + c²))ᵀ (d_ψ(x_t; σ) − x_g)                     (eq. B.13; ‖·‖ over one sample)
The score-divergence gradient theorem puts the stop-gradient on the *parameters* of the score networks
only: the gradient reaches the generator through x_g and through x_t into both frozen networks, the
normaliser 1/√(‖y‖² + c²) included. Nothing is wrapped in `stop_gradient` (the critic's and the
teacher's parameters are constants of the generator loss already).

Reductions as SiD (per-sample sums, divided by the per-device batch, × `generator_scale`, 1 by default).
As c → ∞, c·ℓ → (d_φ − d_ψ)ᵀ(d_ψ − x_g), SiD's α = 1 loss without its normaliser: SIM swaps SiD's
stop-gradient per-sample weight for a differentiated, self-normalising one.

The constant c is not given anywhere in the paper (spec A-12). Default: c = 0.00054·√(C·H·W), the
dimension-scaled pseudo-Huber constant of improved consistency training (Song & Dhariwal, 2023), ≈ 0.03
on CIFAR-10 — small against ‖y‖ early in training, so the loss acts as the unit-direction (L1-like)
normalisation the paper credits for SIM's robustness, and quadratic only once d_ψ ≈ d_φ. Set `huber_c` to
override it with an absolute value.

Text-to-image form ([001] App. B.3, ALGORITHMS.md §4.6; `make(..., sigma_range=(σ_lo, σ_hi))`): the teacher is
PixArt-α in EDM form (`models/t2i/iddpm.py`) and both phases draw σ from one log-normal truncated to the
teacher's range — ln σ ~ N(p_mean, p_std²) for the critic and N(generator_p_mean, generator_p_std²) for the
generator (both (−2.0, 2.0) in the paper), conditioned on σ_lo ≤ σ ≤ σ_hi ([0.01, 156.6155]) — and both losses
have weight 1: the critic's is ‖d_ψ(y + σn; σ) − y‖² (no λ_EDM), the generator's the pseudo-Huber term above.
"Truncated" is read as the truncated distribution (draws outside the range are redrawn, here by the inverse
CDF of a truncated standard normal), not as clipping, which would put ≈ 10 % of the critic's draws at σ_lo.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from sida_jax.losses import common, sid
from sida_jax.losses.lsg import NoiseLevels
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Method, Networks

Array = jax.Array

ICT_HUBER_SCALE = 0.00054


@dataclasses.dataclass(frozen=True)
class SIMHyper(sid.SiDHyper):
  generator_p_mean: float = -3.5     # p_SIM ([001] eq. B.10)
  generator_p_std: float = 2.5
  generator_scale: float = 1.0       # weight 1 ("nowgt")
  huber_c: Optional[float] = None    # None or 0 (the config default): 0.00054·√(C·H·W)

  def distance_constant(self, image_shape: tuple) -> float:
    if self.huber_c:
      if self.huber_c < 0:
        raise ValueError(f"sim: huber_c must be positive, got {self.huber_c}")
      return float(self.huber_c)
    return ICT_HUBER_SCALE * math.sqrt(math.prod(image_shape))


def generator_draws(rng: Array, batch: int, image_shape: tuple) -> dict:
  k_sigma, k_noise = jax.random.split(rng)
  return dict(sigma_normal=jax.random.normal(k_sigma, (batch,)),
              noise=jax.random.normal(k_noise, (batch, *image_shape)))


def generator_sigma(hp: SIMHyper, draws: dict) -> Array:
  return common.lognormal_sigma(draws["sigma_normal"], hp.generator_p_mean, hp.generator_p_std)


def edm_levels(hp: SIMHyper) -> NoiseLevels:
  """EDM teachers: p_EDM and λ_EDM for the critic (SiD's), p_SIM for the generator."""
  return NoiseLevels(critic_draws=sid.critic_draws, generator_draws=generator_draws,
                     critic_sigma=lambda draws: sid.critic_sigma(hp, draws),
                     generator_sigma=lambda draws: generator_sigma(hp, draws),
                     critic_weight=lambda sigma: common.edm_weight(sigma, hp.sigma_data))


def truncated_lognormal_draws(p_mean: float, p_std: float, sigma_range: tuple):
  """Draws {'sigma_normal', 'noise'} whose standard normal r is truncated so that σ = exp(p_mean + p_std·r)
  lies in `sigma_range`."""
  lower, upper = ((math.log(s) - p_mean) / p_std for s in sigma_range)

  def draws(rng: Array, batch: int, image_shape: tuple) -> dict:
    k_sigma, k_noise = jax.random.split(rng)
    return dict(sigma_normal=jax.random.truncated_normal(k_sigma, lower, upper, (batch,)),
                noise=jax.random.normal(k_noise, (batch, *image_shape)))
  return draws


def text_to_image_levels(hp: SIMHyper, sigma_range: tuple) -> NoiseLevels:
  """PixArt: truncated log-normal σ in both phases ((p_mean, p_std) critic, (generator_p_mean,
  generator_p_std) generator), critic weight 1."""
  lo, hi = (float(s) for s in sigma_range)
  if not 0 < lo < hi:
    raise ValueError(f"sim: sigma range must satisfy 0 < sigma_min < sigma_max, got [{lo}, {hi}]")
  return NoiseLevels(
      critic_draws=truncated_lognormal_draws(hp.p_mean, hp.p_std, (lo, hi)),
      generator_draws=truncated_lognormal_draws(hp.generator_p_mean, hp.generator_p_std, (lo, hi)),
      critic_sigma=lambda draws: common.lognormal_sigma(draws["sigma_normal"], hp.p_mean, hp.p_std),
      generator_sigma=lambda draws: generator_sigma(hp, draws),
      critic_weight=lambda sigma: jnp.ones_like(sigma))


def make_critic_loss(hp: SIMHyper, nets: Networks, levels: NoiseLevels):
  """The denoising loss weight(σ)·‖d_ψ(y + σn; σ) − y‖² at the levels' σ (SiD's with p_EDM and λ_EDM)."""
  def critic_loss(params, inputs: CriticInputs):
    sigma = levels.critic_sigma(inputs.draws)
    y = inputs.x_g
    out = nets.critic({"params": params, **inputs.critic_buffers}, y + common.per_sample(sigma) * inputs.draws["noise"],
                      sigma, inputs.labels, inputs.augment_labels, train=True, rng=inputs.dropout_rng)
    terms = common.per_sample(levels.critic_weight(sigma)) * (out.denoised - y) ** 2
    keep = common.finite_samples(y, out.denoised)
    loss = common.masked_sum(terms, keep) * hp.critic_scale / y.shape[0]
    return loss, {"loss_critic": loss}
  return critic_loss


def pseudo_huber_terms(x_g: Array, teacher_out: Array, critic_out: Array, c: float) -> Array:
  """Per-element −(y/√(‖y‖² + c²))·(d_ψ − x_g), y = d_ψ − d_φ, the norm taken per sample."""
  y = critic_out - teacher_out
  norm = jnp.sqrt(jnp.sum(y ** 2, axis=(1, 2, 3), keepdims=True) + c ** 2)
  return -(y / norm) * (critic_out - x_g)


def make_generator_loss(hp: SIMHyper, nets: Networks, levels: Optional[NoiseLevels] = None):
  levels = levels or edm_levels(hp)

  def generator_loss(x_g: Array, inputs: GeneratorInputs):
    sigma = levels.generator_sigma(inputs.draws)
    x_t = x_g + common.per_sample(sigma) * inputs.draws["noise"]
    n = x_g.shape[0]
    teacher = nets.teacher(inputs.teacher_variables, x_t, sigma, inputs.labels, nets.teacher.zero_augment_labels(n))
    critic = nets.critic(inputs.critic_variables, x_t, sigma, inputs.labels, nets.critic.zero_augment_labels(n))
    c = hp.distance_constant(x_g.shape[1:])
    terms = pseudo_huber_terms(x_g, teacher.denoised, critic.denoised, c)
    keep = common.finite_samples(x_g, teacher.denoised, critic.denoised)
    loss = common.masked_sum(terms, keep) * hp.generator_scale / n
    gap = jnp.sqrt(jnp.sum((critic.denoised - teacher.denoised) ** 2, axis=(1, 2, 3)))
    return loss, {"loss_generator": loss, "sim_score_gap": jnp.mean(gap)}
  return generator_loss


def make(config: ml_collections.ConfigDict, nets: Networks, sigma_range: Optional[tuple] = None) -> Method:
  """SIM on EDM teachers; with `sigma_range` (σ_lo, σ_hi) the text-to-image form (module docstring)."""
  hp = SIMHyper.from_config(config.loss)
  if hp.use_logvar:
    raise ValueError("sim: use_logvar is not supported (SIM's generator loss has no uncertainty weighting)")
  if sigma_range is None:
    return Method(critic_loss=sid.make_critic_loss(hp, nets), generator_loss=make_generator_loss(hp, nets),
                  critic_draws=sid.critic_draws, generator_draws=generator_draws)
  levels = text_to_image_levels(hp, sigma_range)
  return Method(critic_loss=make_critic_loss(hp, nets, levels), generator_loss=make_generator_loss(hp, nets, levels),
                critic_draws=levels.critic_draws, generator_draws=levels.generator_draws)
