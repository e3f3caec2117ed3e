"""SiDA / SiD²A: SiD plus an adversarial loss whose discriminator is the fake score network's encoder.

Critic phase (fake score network in train mode), one σ and one noise draw shared by fake and real:
    DSM term    λ(σ)(f_ψ(y + σn) − y)² per element (as SiD)
    D term      λ(σ_i)·½(BCE(l_real, 1) + BCE(l_fake, 0)) per sample, the BCEs averaged over a pool of samples
                and all logit positions (the official code: one device's micro-batch), × λ_D
Generator phase (critic in eval mode), on the SiD x_t:
    SiD term    as SiD, × λ_sid
    GAN term    BCE(clamp(l(x_t), ±10), 1) pooled the same way, / w_i, × C·H·W, × λ_adv
    used as SiD alone while nimg ≤ stage-2 boundary, then ½·SiD + ½·GAN; the generator's optimiser does not
    step while nimg ≤ stage-1 boundary (its loss is still computed, as in the official loop).
SiD²A is the same method started from a distilled SiD generator (see the train loop's generator init).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from sida_jax.losses import common, sid
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Method, Networks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SiDAHyper(sid.SiDHyper):
  alpha: float = 1.0
  discriminator_scale: float = 1.0   # λ_D (`lsd`): 1 for EDM teachers, 100 for EDM2
  adversarial_scale: float = 0.01    # λ_adv (`lsg_gan`)
  logit_clamp: float = 10.0
  critic_grad_clip: float = 1.0      # element-wise; 0 disables (EDM2 loop)
  adv_pool_size: int = 0             # 0: the per-device micro-batch (inputs.device_batch), as the official code
  critic_only_kimg: float = 100.0    # stage 1: the generator does not step
  sid_only_kimg: float = 200.0       # stage 2: the generator uses the SiD loss alone


def _pool(hp: SiDAHyper, n: int, device_batch: int) -> int:
  return hp.adv_pool_size or device_batch or n


def make_critic_loss(hp: SiDAHyper, nets: Networks):
  def critic_loss(params, inputs: CriticInputs):
    sigma = sid.critic_sigma(hp, inputs.draws)
    noise = common.per_sample(sigma) * inputs.draws["noise"]
    variables = {"params": params, **inputs.critic_buffers}
    rng_fake, rng_real = jax.random.split(inputs.dropout_rng)
    y = inputs.x_g
    fake = nets.critic(variables, y + noise, sigma, inputs.labels, _augment(nets, inputs.augment_labels, y),
                       train=True, rng=rng_fake, mode="encoder_decoder", want_logvar=hp.use_logvar)
    real = nets.critic(variables, inputs.real_images + noise, sigma, inputs.labels,
                       _augment(nets, inputs.real_augment_labels, y), train=True, rng=rng_real,
                       mode="encoder")
    n = y.shape[0]
    keep = common.finite_samples(y, fake.denoised, fake.logits, real.logits)
    dsm = sid.denoising_terms(hp, y, fake.denoised, sigma, fake.logvar)
    loss_dsm = common.masked_sum(dsm, keep) * hp.critic_scale / n
    pool = _pool(hp, n, inputs.device_batch)
    bce_real = common.group_mean(common.softplus(-real.logits), pool, keep)
    bce_fake = common.group_mean(common.softplus(fake.logits), pool, keep)
    d_terms = common.edm_weight(sigma, hp.sigma_data) * 0.5 * (bce_real + bce_fake)
    if fake.logvar is not None:
      d_terms = d_terms / jnp.exp(fake.logvar.reshape(n))
    loss_d = common.masked_sum(d_terms, keep) * hp.discriminator_scale / n
    return loss_dsm + loss_d, {"loss_critic": loss_dsm, "loss_discriminator": loss_d,
                               "logit_real": jnp.mean(real.logits), "logit_fake": jnp.mean(fake.logits)}
  return critic_loss


def _augment(nets: Networks, labels, y):
  """SiDA feeds zero augment labels when nothing was augmented (SiD feeds none; the outputs agree)."""
  return labels if labels is not None else nets.critic.zero_augment_labels(y.shape[0])


def adversarial_terms(hp: SiDAHyper, logits: Array, w: Array, divisor, keep: Array, device_batch: int = 0) -> Array:
  """Per-sample generator GAN term BCE(clamp(l), 1)/w_i (/e^u), before the ×C·H·W."""
  n = logits.shape[0]
  clamped = jnp.clip(logits, -hp.logit_clamp, hp.logit_clamp)
  bce = common.group_mean(common.softplus(-clamped), _pool(hp, n, device_batch), keep)
  return bce.reshape(n, 1, 1, 1) / w / divisor


def make_generator_loss(hp: SiDAHyper, nets: Networks):
  def generator_loss(x_g: Array, inputs: GeneratorInputs):
    _, teacher_out, critic = sid.generator_phase_outputs(hp, nets, x_g, inputs, critic_mode="encoder_decoder")
    loss_sid, w, divisor, keep = sid.sid_generator_loss(hp, x_g, teacher_out, critic)
    keep = keep & common.finite_samples(critic.logits)
    gan = adversarial_terms(hp, critic.logits, w, divisor, keep, inputs.device_batch)
    pixels = x_g.shape[1] * x_g.shape[2] * x_g.shape[3]
    loss_gan = common.masked_sum(gan * pixels, keep) * hp.adversarial_scale / x_g.shape[0]
    mixed = inputs.nimg > hp.sid_only_kimg * 1000
    loss = jnp.where(mixed, 0.5 * loss_sid + 0.5 * loss_gan, loss_sid)
    return loss, {"loss_generator": loss, "loss_generator_sid": loss_sid, "loss_generator_gan": loss_gan,
                  "sid_weight_factor": jnp.mean(w)}
  return generator_loss


def make(config: ml_collections.ConfigDict, nets: Networks) -> Method:
  hp = SiDAHyper.from_config(config.loss)
  return Method(critic_loss=make_critic_loss(hp, nets), generator_loss=make_generator_loss(hp, nets),
                critic_draws=sid.critic_draws, generator_draws=sid.generator_draws,
                generator_update_gate=lambda nimg: nimg > hp.critic_only_kimg * 1000,
                critic_grad_clip=hp.critic_grad_clip or None, uses_real_images=True)
