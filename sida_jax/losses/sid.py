"""SiD: score identity distillation (data-free), as the official `SID_EDMLoss` computes it.

Critic (fake score network f_ψ) loss, on generator samples y produced without gradient:
    ℓ = λ(σ)·(f_ψ(y + σn; σ) − y)²,   ln σ ~ N(P_mean, P_std²)
Generator loss, with σ from the t_max schedule and x_t = x_g + σn:
    ℓ = (f_φ − f_ψ)·((f_φ − x_g) − α(f_φ − f_ψ)) / w,   w = sg(mean|x_g − f_φ|) ≥ 1e-5
Gradients reach the generator through x_g and through x_t into both frozen networks; only w is
stop-gradient. With an EDM2 log-variance head both terms follow the official EDM2 variant: the critic's
loss becomes (λ/e^u)·(f_ψ − y)² + u and the generator's is divided by e^u of the (frozen) critic.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from sida_jax.losses import common
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Method, Networks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SiDHyper:
  alpha: float = 1.2
  tmax: float = 800.0
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_data: float = 0.5
  critic_scale: float = 1.0       # `ls`
  generator_scale: float = 100.0  # `lsg`
  use_logvar: bool = False        # EDM2 uncertainty weighting (needs a logvar head)

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> "SiDHyper":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in loss.items() if k in names})


def critic_draws(rng: Array, batch: int, image_shape: tuple) -> dict:
  """The official order: σ's standard normal, then the unit noise (shared by fake and real in SiDA)."""
  k_sigma, k_noise = jax.random.split(rng)
  return dict(sigma_normal=jax.random.normal(k_sigma, (batch,)),
              noise=jax.random.normal(k_noise, (batch, *image_shape)))


def generator_draws(rng: Array, batch: int, image_shape: tuple) -> dict:
  k_t, k_noise = jax.random.split(rng)
  return dict(t_uniform=jax.random.uniform(k_t, (batch,)),
              noise=jax.random.normal(k_noise, (batch, *image_shape)))


def critic_sigma(hp: SiDHyper, draws: dict) -> Array:
  return common.lognormal_sigma(draws["sigma_normal"], hp.p_mean, hp.p_std)


def generator_sigma(hp: SiDHyper, draws: dict) -> Array:
  return common.tmax_sigma(draws["t_uniform"], hp.tmax, hp.sigma_min, hp.sigma_max, hp.rho)


def denoising_terms(hp: SiDHyper, target: Array, denoised: Array, sigma: Array, logvar) -> Array:
  """Per-element fake-score loss λ(σ)(f_ψ − y)² (with EDM2's /e^u + u when a logvar is given)."""
  weight = common.per_sample(common.edm_weight(sigma, hp.sigma_data))
  sq = (denoised - target) ** 2
  if logvar is None:
    return weight * sq
  return weight / jnp.exp(logvar) * sq + logvar


def sid_terms(hp: SiDHyper, x_g: Array, teacher_out: Array, critic_out: Array) -> tuple:
  """Per-element SiD generator loss and the per-sample normaliser w."""
  w = common.sid_weight_factor(x_g, teacher_out)
  diff = teacher_out - critic_out
  return diff * ((teacher_out - x_g) - hp.alpha * diff) / w, w


def make_critic_loss(hp: SiDHyper, nets: Networks):
  def critic_loss(params, inputs: CriticInputs):
    sigma = critic_sigma(hp, inputs.draws)
    y = inputs.x_g
    out = nets.critic({"params": params, **inputs.critic_buffers}, y + common.per_sample(sigma) * inputs.draws["noise"],
                      sigma, inputs.labels, inputs.augment_labels, train=True, rng=inputs.dropout_rng,
                      want_logvar=hp.use_logvar)
    terms = denoising_terms(hp, y, out.denoised, sigma, out.logvar)
    keep = common.finite_samples(y, out.denoised)
    loss = common.masked_sum(terms, keep) * hp.critic_scale / y.shape[0]
    return loss, {"loss_critic": loss}
  return critic_loss


def generator_phase_outputs(hp: SiDHyper, nets: Networks, x_g: Array, inputs: GeneratorInputs,
                            critic_mode: str = "decoder"):
  """Teacher and critic on x_t = x_g + σn (eval mode, gradients flow through x_t)."""
  sigma = generator_sigma(hp, inputs.draws)
  x_t = x_g + common.per_sample(sigma) * inputs.draws["noise"]
  n = x_g.shape[0]
  zeros = nets.teacher.zero_augment_labels(n)
  teacher = nets.teacher(inputs.teacher_variables, x_t, sigma, inputs.labels, zeros)
  critic = nets.critic(inputs.critic_variables, x_t, sigma, inputs.labels,
                       nets.critic.zero_augment_labels(n), mode=critic_mode, want_logvar=hp.use_logvar)
  return sigma, teacher.denoised, critic


def sid_generator_loss(hp: SiDHyper, x_g: Array, teacher_out: Array, critic_out) -> tuple:
  """Scaled SiD loss, the per-sample normaliser w and the per-sample logvar divisor (or 1)."""
  terms, w = sid_terms(hp, x_g, teacher_out, critic_out.denoised)
  divisor = 1.0
  if critic_out.logvar is not None:
    divisor = jnp.exp(jax.lax.stop_gradient(critic_out.logvar))
    terms = terms / divisor
  keep = common.finite_samples(x_g, teacher_out, critic_out.denoised)
  loss = common.masked_sum(terms, keep) * hp.generator_scale / x_g.shape[0]
  return loss, w, divisor, keep


def make_generator_loss(hp: SiDHyper, nets: Networks):
  def generator_loss(x_g: Array, inputs: GeneratorInputs):
    _, teacher_out, critic = generator_phase_outputs(hp, nets, x_g, inputs)
    loss, w, _, _ = sid_generator_loss(hp, x_g, teacher_out, critic)
    return loss, {"loss_generator": loss, "sid_weight_factor": jnp.mean(w)}
  return generator_loss


def make(config: ml_collections.ConfigDict, nets: Networks) -> Method:
  hp = SiDHyper.from_config(config.loss)
  return Method(critic_loss=make_critic_loss(hp, nets), generator_loss=make_generator_loss(hp, nets),
                critic_draws=critic_draws, generator_draws=generator_draws)
