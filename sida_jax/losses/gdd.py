"""GDD and GDD-I: distribution-level GAN distillation of a diffusion teacher ([004], Zyriix/GDD).

Generator: the teacher's denoiser at σ_max, x_g = D_θ(80·z; 80) (the step's one-step generator with
`init_sigma` = 80; EDM's c_skip/c_out there differ from the paper's consistency-model ones by < 3e-5
relative, spec A-29). No teacher or score term enters any loss: real data are the only target.

Discriminator, projected-GAN style: frozen feature networks P_l and trainable heads D_l. Any `Discriminator`
plugs in: its `logits(params, teacher_variables, x, labels)` returns one array [N, ...] per feature network
(the logits of all that network's heads, in any trailing shape). The default here reads the frozen teacher
at fixed noise levels σ_l (`feature_sigmas`; the input is not noised, so P_l is a deterministic function):
P_l(x) = [D_φ(x; σ_l), encoder logits of D_φ at σ_l], flattened, with one small leaky-ReLU MLP head per level
(projection conditioning on the class label for conditional data). The paper's VGG16-BN / EfficientNet /
DeiT backbones are a declared deviation until their port is plugged in.

Losses as the official `GDDLoss` reduces them (spec ALGORITHMS.md §12.18): per sample and feature network the
mean of that sample's logits, summed over feature networks and over samples, non-saturating:
    discriminator  Σ_i Σ_l [mean softplus(l(x_g,i)) + mean softplus(−l(x_real,i))]
    generator      Σ_i Σ_l mean softplus(−l(x_g,i)), differentiated through the frozen features into x_g
    R1             γ/2 · mean_i ‖∇_x Σ(all logits of x_real,i)‖²   (a mean, not a sum, over samples)
The official sums run over one GPU's samples, so γ's weight against the GAN terms depends on the per-GPU
batch. Here every sum is the mean over samples × `gan_sum_size` (0: the per-device micro-batch,
`inputs.device_batch`), which fixes that weight independently of the device count: the recipes use the
per-GPU batch of [004]'s 8-GPU runs.
R1 is lazy, as in the official loop: a separate discriminator step every `r1_interval` iterations (not the
first) on interval × R1, with the discriminator's Adam at lr·k/(k+1) and β2^(k/(k+1)) (k = interval; see
`method.LazyRegularizer`). Each iteration trains the generator first, then the discriminator on samples of
the updated generator (`generator_first`).

GDD-I: the generator's 3×3 block convolutions and attention output projections are frozen
(`generator_trainable_mask`, the official rule: parameter names containing one of block/up/down/in and
one of conv/proj); norms, affine, skip, qkv, stem, aux, mapping and output layers stay trainable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sida_jax.losses import common
from sida_jax.losses.method import CriticInputs, GeneratorInputs, LazyRegularizer, Method, Networks
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
  r1_interval: int = 16                         # lazy R1: every 16 iterations, gain ×16
  gan_sum_size: int = 0                         # samples each GAN sum runs over; 0: the per-device batch
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
    if hp.r1_interval < 1 or hp.gan_sum_size < 0:
      raise ValueError(f"gdd: r1_interval must be >= 1 and gan_sum_size >= 0, got {hp.r1_interval}, "
                       f"{hp.gan_sum_size}")
    return hp


@dataclasses.dataclass(frozen=True)
class Discriminator:
  """A projected discriminator: frozen feature networks and trainable heads.

  Attributes:
    logits: (params, teacher_variables, x, labels) -> list with one array [N, ...] per feature network, all
      logits of that network's heads for each sample, concatenated (as the official `MultiScaleD` does: the
      mean then runs over all of them, so a head counts by its number of logits). One entry per head instead
      would change the weighting.
    init: (rng, teacher_variables, image_shape) -> the heads' initial variables.
  """
  logits: Callable[[Any, dict, Array, Optional[Array]], List[Array]]
  init: Callable[[Array, dict, tuple], dict]


class DiscriminatorHeads(nn.Module):
  """One trainable head per feature network: [N, F_l] features (+ one-hot labels) -> [N, 1] logits each."""
  width: int = 64
  label_dim: int = 0

  @nn.compact
  def __call__(self, features: Sequence[Array], labels: Optional[Array] = None) -> list:
    logits = []
    for i, feature in enumerate(features):
      h = feature
      for j in range(2):
        h = nn.leaky_relu(nn.Dense(self.width, name=f"head{i}_layer{j}")(h), 0.2)
      if self.label_dim:
        # Projection discriminator: logit = <out, embed(c)>/√width.
        out = nn.Dense(self.width, name=f"head{i}_out")(h)
        cmap = nn.leaky_relu(nn.Dense(self.width, name=f"head{i}_embed")(labels), 0.2)
        logits.append(jnp.sum(out * cmap, axis=1, keepdims=True) / math.sqrt(self.width))
      else:
        logits.append(nn.Dense(1, name=f"head{i}_out")(h))
    return logits


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


def teacher_feature_discriminator(hp: GDDHyper, nets: Networks) -> Discriminator:
  """The frozen teacher read at `feature_sigmas` as feature networks, one MLP head each."""
  heads = DiscriminatorHeads(hp.head_width, nets.teacher.label_dim)

  def logits(head_params, teacher_variables: dict, x: Array, labels: Optional[Array]) -> list:
    features = teacher_features(hp, nets.teacher, teacher_variables, x, labels)
    return heads.apply({"params": head_params}, features, labels if nets.teacher.label_dim else None)

  def init(rng: Array, teacher_variables: dict, image_shape: tuple) -> dict:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    labels = jnp.zeros((1, nets.teacher.label_dim), jnp.float32) if nets.teacher.label_dim else None
    features = teacher_features(hp, nets.teacher, teacher_variables, x, labels)
    return heads.init(rng, features, labels)

  return Discriminator(logits, init)


def per_sample_logit_means(logits: Sequence[Array], fn: Callable[[Array], Array] = lambda l: l) -> Array:
  """[N]: Σ over feature networks of the mean of fn(logits) over each sample's logits of that network (the
  official reduction of the per-sample logit list)."""
  return sum(jnp.mean(fn(l.reshape(l.shape[0], -1).astype(jnp.float32)), axis=1) for l in logits)


def input_gradient_norms(logits_fn: Callable[[Array], list], real: Array) -> tuple:
  """Logits of real data and each sample's ‖∇_x Σ(all logits)‖², from one forward and one VJP — the gradient
  of the sum over the whole batch, as the official R1 takes it."""
  logits, vjp = jax.vjp(logits_fn, real)
  (grads,) = vjp([jnp.ones_like(l) for l in logits])
  return logits, jnp.sum(grads.reshape(real.shape[0], -1).astype(jnp.float32) ** 2, axis=1)


def _sum_scale(hp: GDDHyper, n: int, device_batch: int) -> float:
  """The official per-GPU sum over samples as a mean × gan_sum_size (default: the per-device micro-batch)."""
  return (hp.gan_sum_size or device_batch or n) / n


def _mean_logit(logits: Sequence[Array]) -> Array:
  return jnp.mean(jnp.concatenate([l.reshape(l.shape[0], -1) for l in logits], axis=1))


def make_critic_loss(hp: GDDHyper, discriminator: Discriminator):
  def critic_loss(params, inputs: CriticInputs):
    n = inputs.x_g.shape[0]
    fake = discriminator.logits(params, inputs.teacher_variables, inputs.x_g, inputs.labels)
    real = discriminator.logits(params, inputs.teacher_variables, inputs.real_images, inputs.labels)
    per_sample = (per_sample_logit_means(fake, common.softplus)
                  + per_sample_logit_means(real, lambda l: common.softplus(-l)))
    keep = common.finite_samples(inputs.x_g, inputs.real_images, *fake, *real)
    loss = common.masked_sum(per_sample, keep) * _sum_scale(hp, n, inputs.device_batch)
    return loss, {"loss_critic": loss, "logit_real": _mean_logit(real), "logit_fake": _mean_logit(fake)}
  return critic_loss


def make_r1_loss(hp: GDDHyper, discriminator: Discriminator):
  """R1 on the real batch, per iteration (the step applies the lazy interval and gain)."""
  def r1_loss(params, inputs: CriticInputs):
    real = inputs.real_images
    logits, penalty = input_gradient_norms(
        lambda x: discriminator.logits(params, inputs.teacher_variables, x, inputs.labels), real)
    keep = common.finite_samples(real, penalty, *logits)
    loss = common.masked_sum(penalty, keep) * (hp.r1_gamma / 2) / real.shape[0]
    return loss, {"loss_r1": loss}
  return r1_loss


def make_generator_loss(hp: GDDHyper, discriminator: Discriminator):
  def generator_loss(x_g: Array, inputs: GeneratorInputs):
    n = x_g.shape[0]
    logits = discriminator.logits(inputs.critic_variables["params"], inputs.teacher_variables, x_g, inputs.labels)
    per_sample = per_sample_logit_means(logits, lambda l: common.softplus(-l))
    keep = common.finite_samples(x_g, *logits)
    loss = common.masked_sum(per_sample, keep) * _sum_scale(hp, n, inputs.device_batch)
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


def make(config: ml_collections.ConfigDict, nets: Networks,
         discriminator: Optional[Discriminator] = None) -> Method:
  """GDD from config.loss; `discriminator` defaults to the teacher-feature one."""
  hp = GDDHyper.from_config(config.loss)
  discriminator = discriminator or teacher_feature_discriminator(hp, nets)
  regularizer = None
  if hp.r1_gamma > 0:
    regularizer = LazyRegularizer(loss=make_r1_loss(hp, discriminator), interval=hp.r1_interval)
  return Method(critic_loss=make_critic_loss(hp, discriminator),
                generator_loss=make_generator_loss(hp, discriminator),
                critic_draws=_no_draws, generator_draws=_no_draws, uses_real_images=True,
                generator_trainable_mask=trainable_mask if hp.freeze else None,
                init_critic_variables=discriminator.init, init_sigma=hp.init_sigma,
                generator_first=True, critic_regularizer=regularizer)
