"""GDD and GDD-I: distribution-level GAN distillation of a diffusion teacher ([004], Zyriix/GDD).

Generator: the teacher's denoiser at σ_max, x_g = D_θ(80·z; 80) (the step's one-step generator with
`init_sigma` = 80; EDM's c_skip/c_out there differ from the paper's consistency-model ones by < 3e-5
relative, spec A-29). No teacher or score term enters any loss: real data are the only target.

Discriminator, projected-GAN style: frozen feature networks P_l and trainable heads D_l. The feature networks
are the frozen teacher itself, read at fixed noise levels σ_l (`feature_sigmas`; the input is not noised, so
P_l is a deterministic function): P_l(x) = [D_φ(x; σ_l), encoder logits of D_φ at σ_l], flattened. Each head
is a small leaky-ReLU MLP, with projection conditioning on the class label for conditional data. (The
paper's VGG16-BN / EfficientNet / DeiT backbones have no JAX port here; the heads are the trainable part in
both designs.) Losses, non-saturating, summed over heads, averaged over samples:
    discriminator  softplus(l(x_g)) + softplus(−l(x_real)) + γ/2·‖∇_x Σ_l l(x_real)‖²   (R1 on real data)
    generator      softplus(−l(x_g)), differentiated through the frozen features into x_g.
R1 is applied every iteration with weight γ/2 (the official lazy form, ×16 every 16 iterations, is a
cheaper approximation of it), so the discriminator's Adam needs no lazy-regularisation correction.

GDD-I: the generator's 3×3 block convolutions and attention output projections are frozen
(`generator_trainable_mask`, the official rule: parameter names containing one of block/up/down/in and
one of conv/proj); norms, affine, skip, qkv, stem, aux, mapping and output layers stay trainable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sida_jax.losses import common
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Method, Networks
from sida_jax.models.denoiser import Denoiser

Array = jax.Array

FROZEN_WHERE = ("block", "up", "down", "in")
FROZEN_WHAT = ("conv", "proj")


@dataclasses.dataclass(frozen=True)
class GDDHyper:
  init_sigma: float = 80.0                      # σ_max: the generator's input level
  # Levels at which the frozen teacher reads its input: near-clean (fine detail) to coarse structure.
  feature_sigmas: tuple = (0.05, 0.5, 2.0)
  head_width: int = 64                          # the projected GAN's cmap_dim
  r1_gamma: float = 1e-4                        # CIFAR-10 / AFHQv2 / FFHQ; 4e-4 for ImageNet-64
  freeze: bool = False                          # GDD-I

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> "GDDHyper":
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in loss.items() if k in names}
    if "feature_sigmas" in values:
      values["feature_sigmas"] = tuple(float(s) for s in values["feature_sigmas"])
    hp = cls(**values)
    if not hp.feature_sigmas or min(hp.feature_sigmas) <= 0:
      raise ValueError(f"gdd: feature_sigmas must be a non-empty tuple of positive levels, got {hp.feature_sigmas}")
    return hp


class DiscriminatorHeads(nn.Module):
  """One trainable head per feature network: [N, F_l] features (+ one-hot labels) -> [N, L] logits."""
  width: int = 64
  label_dim: int = 0

  @nn.compact
  def __call__(self, features: Sequence[Array], labels: Optional[Array] = None) -> Array:
    logits = []
    for i, feature in enumerate(features):
      h = feature
      for j in range(2):
        h = nn.leaky_relu(nn.Dense(self.width, name=f"head{i}_layer{j}")(h), 0.2)
      if self.label_dim:
        # Projection discriminator: logit = <out, embed(c)>/√width.
        out = nn.Dense(self.width, name=f"head{i}_out")(h)
        cmap = nn.leaky_relu(nn.Dense(self.width, name=f"head{i}_embed")(labels), 0.2)
        logits.append(jnp.sum(out * cmap, axis=1) / math.sqrt(self.width))
      else:
        logits.append(nn.Dense(1, name=f"head{i}_out")(h)[:, 0])
    return jnp.stack(logits, axis=1)


def teacher_features(hp: GDDHyper, teacher: Denoiser, teacher_variables: dict, x: Array,
                     labels: Optional[Array]) -> list:
  """P_l(x) for every σ_l: the frozen teacher's denoised output and encoder logits, flattened."""
  n = x.shape[0]
  features = []
  for level in hp.feature_sigmas:
    out = teacher(teacher_variables, x, jnp.full((n,), level, jnp.float32), labels,
                  teacher.zero_augment_labels(n), mode="encoder_decoder")
    features.append(jnp.concatenate([out.denoised.reshape(n, -1), out.logits.reshape(n, -1)], axis=1))
  return features


def make_discriminator(hp: GDDHyper, nets: Networks):
  heads = DiscriminatorHeads(hp.head_width, nets.teacher.label_dim)

  def logits(head_params, teacher_variables: dict, x: Array, labels: Optional[Array]) -> Array:
    features = teacher_features(hp, nets.teacher, teacher_variables, x, labels)
    return heads.apply({"params": head_params}, features, labels if nets.teacher.label_dim else None)

  def init(rng: Array, teacher_variables: dict, image_shape: tuple) -> dict:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    labels = jnp.zeros((1, nets.teacher.label_dim), jnp.float32) if nets.teacher.label_dim else None
    features = teacher_features(hp, nets.teacher, teacher_variables, x, labels)
    return heads.init(rng, features, labels)

  return logits, init


def logits_and_r1(logits_fn, real: Array) -> tuple:
  """Logits of real data and the per-sample R1 penalty ‖∇_x Σ(all logits of x)‖², from one forward.

  Samples are independent (no batch statistics), so one vector-Jacobian product gives every sample's
  gradient.
  """
  logits, vjp = jax.vjp(logits_fn, real)
  (grads,) = vjp(jnp.ones_like(logits))
  return logits, jnp.sum(grads.reshape(real.shape[0], -1) ** 2, axis=1)


def make_critic_loss(hp: GDDHyper, logits_fn):
  def critic_loss(params, inputs: CriticInputs):
    n = inputs.x_g.shape[0]
    fake = logits_fn(params, inputs.teacher_variables, inputs.x_g, inputs.labels)
    real, r1 = logits_and_r1(lambda x: logits_fn(params, inputs.teacher_variables, x, inputs.labels),
                             inputs.real_images)
    per_sample = jnp.sum(common.softplus(fake) + common.softplus(-real), axis=1)
    keep = common.finite_samples(inputs.x_g, fake, real)
    loss_gan = common.masked_sum(per_sample, keep) / n
    loss_r1 = common.masked_sum(r1, keep) * hp.r1_gamma / 2 / n
    return loss_gan + loss_r1, {"loss_critic": loss_gan, "loss_r1": loss_r1,
                                "logit_real": jnp.mean(real), "logit_fake": jnp.mean(fake)}
  return critic_loss


def make_generator_loss(logits_fn):
  def generator_loss(x_g: Array, inputs: GeneratorInputs):
    logits = logits_fn(inputs.critic_variables["params"], inputs.teacher_variables, x_g, inputs.labels)
    per_sample = jnp.sum(common.softplus(-logits), axis=1)
    keep = common.finite_samples(x_g, logits)
    loss = common.masked_sum(per_sample, keep) / x_g.shape[0]
    return loss, {"loss_generator": loss}
  return generator_loss


def is_frozen(name: str) -> bool:
  """GDD-I's rule on a '.'-joined PyTorch parameter name."""
  return any(w in name for w in FROZEN_WHERE) and any(w in name for w in FROZEN_WHAT)


def trainable_mask(params):
  """Pytree of bools shaped like `params`: False for the parameters GDD-I freezes."""
  def trainable(path, _):
    return not is_frozen(".".join(str(getattr(k, "key", k)) for k in path))
  return jax.tree_util.tree_map_with_path(trainable, params)


def _no_draws(rng: Array, batch: int, image_shape: tuple) -> dict:
  del rng, batch, image_shape
  return {}


def make(config: ml_collections.ConfigDict, nets: Networks) -> Method:
  hp = GDDHyper.from_config(config.loss)
  logits_fn, init = make_discriminator(hp, nets)
  return Method(critic_loss=make_critic_loss(hp, logits_fn),
                generator_loss=make_generator_loss(logits_fn),
                critic_draws=_no_draws, generator_draws=_no_draws, uses_real_images=True,
                generator_trainable_mask=trainable_mask if hp.freeze else None,
                init_critic_variables=init, init_sigma=hp.init_sigma)
