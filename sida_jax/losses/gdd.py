"""GDD and GDD-I: distribution-level GAN distillation of a diffusion teacher ([004], Zyriix/GDD).

Generator: the teacher's U-Net under GDD's own preconditioning (`generator_class` 'GDDPrecond': EDM's c_in
and c_noise, the consistency-model c_skip/c_out with ε = 0.002; spec A-28/A-29), called on 80·z at σ = 80
(`init_sigma`). No teacher or score term enters any loss: real data are the only target.

Discriminator (`config.gdd.discriminator`):
  'projected'  the paper's: Projected GAN on frozen pretrained feature networks (VGG16-BN or DeiT, with
               EfficientNet-lite0; `sida_jax/models/projected_gan.py`) and trainable multi-scale heads that
               run in training mode in every call, as the official code's: batch-norm statistics over groups
               of `config.gdd.batch_stat_size` samples (the official per-GPU batch) and one spectral-norm
               power iteration per call, whose buffers each loss returns (`CRITIC_BUFFERS`) in call order
               (G: fake; D: fake, then real; R1: real). The frozen feature networks are the step's frozen
               argument (`Method.frozen_variables`), never trained, averaged or checkpointed.
  'teacher'    for machines without the pretrained weights: the frozen teacher read at fixed noise levels σ_l
               (`feature_sigmas`; the input is not noised, so P_l is deterministic) as feature networks,
               P_l(x) = [D_φ(x; σ_l), encoder logits of D_φ at σ_l], flattened, one small leaky-ReLU MLP head
               per level (projection conditioning on the class label for conditional data).
Any `Discriminator` plugs in: its `logits(variables, frozen, x, labels, device_batch)` returns one array [N, ...]
per feature network (the logits of all that network's heads, in any trailing shape) and its updated buffers
(`device_batch`: the per-device micro-batch, the default batch-norm group; 0 for the whole batch).

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
the updated generator (`generator_first`); both phases and R1 use the iteration's one real batch and its
labels (`shared_batch`).

GDD-I: the generator's 3×3 block convolutions and attention output projections are frozen
(`generator_trainable_mask`, the official rule: parameter names containing one of block/up/down/in and
one of conv/proj); norms, affine, skip, qkv, stem, aux, mapping and output layers stay trainable.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sida_jax.losses import common
from sida_jax.losses.method import (CRITIC_BUFFERS, CriticInputs, GeneratorInputs, LazyRegularizer, Method,
                                    Networks)
from sida_jax.models import projected_gan as pg
from sida_jax.models.denoiser import Denoiser

Array = jax.Array

FROZEN_WHERE = ("block", "up", "down", "in")
FROZEN_WHAT = ("conv", "proj")
GENERATOR_CLASS = "GDDPrecond"
DISCRIMINATORS = ("projected", "teacher")


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
class ProjectedSettings:
  """The projected discriminator's settings (`config.gdd`; official values as defaults).

  feature_networks: official names (`--backbone 1`: vgg16_bn + tf_efficientnet_lite0 for CIFAR-10;
    `--backbone 0`: deit_base_distilled_patch16_224 + tf_efficientnet_lite0 for AFHQv2, FFHQ, ImageNet-64).
  interp224: resize images under 224 to 224 (official `--interp224`, on in every GDD run).
  cout, ndf: Projected GAN's mixing width (64) and head width (0: its `nfc_midas` table).
  batch_stat_size: samples per batch-norm statistics group of the heads (the official per-GPU batch;
    0: the per-device batch).
  seed: the random (frozen) mixing layers are drawn from it.
  """
  feature_networks: tuple = ("deit_base_distilled_patch16_224", "tf_efficientnet_lite0")
  interp224: bool = True
  cout: int = 64
  ndf: int = 0
  batch_stat_size: int = 0
  seed: int = 0

  @classmethod
  def from_config(cls, gdd: ml_collections.ConfigDict, seed: int = 0) -> "ProjectedSettings":
    names = {f.name for f in dataclasses.fields(cls)} - {"seed"}
    values = {k: v for k, v in gdd.items() if k in names}
    if "feature_networks" in values:
      values["feature_networks"] = tuple(values["feature_networks"])
    settings = cls(**values, seed=seed)
    if settings.batch_stat_size < 0 or settings.ndf < 0 or settings.cout < 1:
      raise ValueError(f"config.gdd: batch_stat_size and ndf must be >= 0 and cout >= 1, got "
                       f"{settings.batch_stat_size}, {settings.ndf}, {settings.cout}")
    return settings


@dataclasses.dataclass(frozen=True)
class Discriminator:
  """A projected discriminator: frozen feature networks and trainable heads.

  Attributes:
    logits: (variables, frozen, x, labels) -> (list with one array [N, ...] per feature network, updated
      non-trainable variables). `variables` are the heads' ({'params': ..., **buffers}); `frozen` is what the
      step passes as its frozen argument (`frozen` below, or the teacher's variables). Each array holds all
      logits of that network's heads for each sample, concatenated (as the official `MultiScaleD` does: the
      mean then runs over all of them, so a head counts by its number of logits).
    init: (rng, teacher_variables, image_shape) -> the heads' initial variables.
    frozen: optional teacher variables -> the frozen variables `logits` reads (None: the teacher's).
  """
  logits: Callable[[dict, Any, Array, Optional[Array]], tuple]
  init: Callable[[Array, dict, tuple], dict]
  frozen: Optional[Callable[[dict], dict]] = None


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
  """The frozen teacher read at `feature_sigmas` as feature networks, one MLP head each (no buffers)."""
  heads = DiscriminatorHeads(hp.head_width, nets.teacher.label_dim)

  def logits(variables: dict, teacher_variables: dict, x: Array, labels: Optional[Array],
             device_batch: int = 0) -> tuple:
    del device_batch   # no batch statistics
    features = teacher_features(hp, nets.teacher, teacher_variables, x, labels)
    return heads.apply(variables, features, labels if nets.teacher.label_dim else None), {}

  def init(rng: Array, teacher_variables: dict, image_shape: tuple) -> dict:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    labels = jnp.zeros((1, nets.teacher.label_dim), jnp.float32) if nets.teacher.label_dim else None
    features = teacher_features(hp, nets.teacher, teacher_variables, x, labels)
    return heads.init(rng, features, labels)

  return Discriminator(logits, init)


def projected_discriminator(settings: ProjectedSettings, image_shape: tuple, label_dim: int,
                            feature_weights: Mapping[str, Mapping[str, Any]],
                            class_embedding: Optional[np.ndarray] = None) -> Discriminator:
  """GDD's Projected-GAN discriminator (`models/projected_gan.py`) on images of `image_shape`.

  feature_weights: the torchvision/timm state_dict of every feature network (`formats/feature_networks.py`).
  class_embedding: GDD's [1000, 320] class table, required for conditional heads (label_dim > 0).
  The frozen part (pretrained backbones, the ViT's reassembly convolutions, CCM and CSM) is built here once.
  """
  resolution, _, channels = image_shape
  if channels != 3:
    raise ValueError(f"gdd: the projected discriminator reads RGB images, the data have {channels} channel(s) "
                     "(use config.gdd.discriminator=teacher)")
  if label_dim and class_embedding is None:
    raise ValueError("gdd: conditional heads need GDD's class embedding (in_embeddings/tf_efficientnet_lite0)")
  disc = pg.ProjectedDiscriminator(backbones=settings.feature_networks, resolution=resolution,
                                   label_dim=label_dim, interp224=settings.interp224, cout=settings.cout,
                                   ndf=settings.ndf or None)
  features = disc.load_backbones({"features": disc.init_features(jax.random.key(settings.seed))},
                                 feature_weights)["features"]

  def logits(variables: dict, frozen: dict, x: Array, labels: Optional[Array], device_batch: int = 0) -> tuple:
    n = x.shape[0]
    size = settings.batch_stat_size or min(device_batch or n, n)
    if n % size:
      raise ValueError(f"gdd: a batch of {n} does not split into batch-norm groups of "
                       f"config.gdd.batch_stat_size={size}")
    grouped = dataclasses.replace(disc, batch_stat_groups=n // size)
    out, buffers = grouped.apply({"features": frozen["features"], "heads": variables}, x,
                                 labels if label_dim else None, train=True)
    return list(out), {"buffers": buffers}

  def init(rng: Array, teacher_variables: dict, image_shape: tuple) -> dict:
    del teacher_variables, image_shape
    return disc.init_heads(rng, class_embedding)

  return Discriminator(logits, init, frozen=lambda teacher_variables: {"features": features})


def per_sample_logit_means(logits: Sequence[Array], fn: Callable[[Array], Array] = lambda l: l) -> Array:
  """[N]: Σ over feature networks of the mean of fn(logits) over each sample's logits of that network (the
  official reduction of the per-sample logit list)."""
  return sum(jnp.mean(fn(l.reshape(l.shape[0], -1).astype(jnp.float32)), axis=1) for l in logits)


def input_gradient_norms(logits_fn: Callable[[Array], tuple], real: Array) -> tuple:
  """(logits of real data, each sample's ‖∇_x Σ(all logits)‖², logits_fn's aux) from one forward and one VJP
  — the gradient of the sum over the whole batch, as the official R1 takes it. `logits_fn(x)` returns
  (logits, aux)."""
  logits, vjp, aux = jax.vjp(logits_fn, real, has_aux=True)
  (grads,) = vjp([jnp.ones_like(l) for l in logits])
  return logits, jnp.sum(grads.reshape(real.shape[0], -1).astype(jnp.float32) ** 2, axis=1), aux


def _sum_scale(hp: GDDHyper, n: int, device_batch: int) -> float:
  """The official per-GPU sum over samples as a mean × gan_sum_size (default: the per-device micro-batch)."""
  return (hp.gan_sum_size or device_batch or n) / n


def _mean_logit(logits: Sequence[Array]) -> Array:
  return jnp.mean(jnp.concatenate([l.reshape(l.shape[0], -1) for l in logits], axis=1))


def _with_buffers(metrics: dict, buffers: dict) -> dict:
  return {**metrics, CRITIC_BUFFERS: buffers} if buffers else metrics


def make_critic_loss(hp: GDDHyper, discriminator: Discriminator):
  """The official D stage: fake logits, then real logits (the heads' buffers carried from call to call)."""
  def critic_loss(params, inputs: CriticInputs):
    n = inputs.x_g.shape[0]
    fake, buffers = discriminator.logits({"params": params, **inputs.critic_buffers}, inputs.teacher_variables,
                                         inputs.x_g, inputs.labels, inputs.device_batch)
    real, buffers = discriminator.logits({"params": params, **buffers}, inputs.teacher_variables,
                                         inputs.real_images, inputs.labels, inputs.device_batch)
    per_sample = (per_sample_logit_means(fake, common.softplus)
                  + per_sample_logit_means(real, lambda l: common.softplus(-l)))
    keep = common.finite_samples(inputs.x_g, inputs.real_images, *fake, *real)
    loss = common.masked_sum(per_sample, keep) * _sum_scale(hp, n, inputs.device_batch)
    metrics = {"loss_critic": loss, "logit_real": _mean_logit(real), "logit_fake": _mean_logit(fake)}
    return loss, _with_buffers(metrics, buffers)
  return critic_loss


def make_r1_loss(hp: GDDHyper, discriminator: Discriminator):
  """R1 on the real batch, per iteration (the step applies the lazy interval and gain)."""
  def r1_loss(params, inputs: CriticInputs):
    real = inputs.real_images
    logits, penalty, buffers = input_gradient_norms(
        lambda x: discriminator.logits({"params": params, **inputs.critic_buffers}, inputs.teacher_variables,
                                       x, inputs.labels, inputs.device_batch), real)
    keep = common.finite_samples(real, penalty, *logits)
    loss = common.masked_sum(penalty, keep) * (hp.r1_gamma / 2) / real.shape[0]
    return loss, _with_buffers({"loss_r1": loss}, buffers)
  return r1_loss


def make_generator_loss(hp: GDDHyper, discriminator: Discriminator):
  """The official G stage: the previous discriminator, in training mode, on x_g."""
  def generator_loss(x_g: Array, inputs: GeneratorInputs):
    n = x_g.shape[0]
    logits, buffers = discriminator.logits(inputs.critic_variables, inputs.teacher_variables, x_g, inputs.labels,
                                           inputs.device_batch)
    per_sample = per_sample_logit_means(logits, lambda l: common.softplus(-l))
    keep = common.finite_samples(x_g, *logits)
    loss = common.masked_sum(per_sample, keep) * _sum_scale(hp, n, inputs.device_batch)
    return loss, _with_buffers({"loss_generator": loss}, buffers)
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


def discriminator_from_config(config: ml_collections.ConfigDict, hp: GDDHyper, nets: Networks,
                              feature_weights: Optional[Mapping[str, Mapping[str, Any]]] = None,
                              class_embedding: Optional[np.ndarray] = None) -> Discriminator:
  """The discriminator `config.gdd.discriminator` names ('teacher' when the config has no gdd section)."""
  settings = config.get("gdd")
  kind = settings.discriminator if settings is not None else "teacher"
  if kind == "teacher":
    return teacher_feature_discriminator(hp, nets)
  if kind != "projected":
    raise ValueError(f"config.gdd.discriminator={kind!r} is not one of {', '.join(DISCRIMINATORS)}")
  if feature_weights is None:
    raise ValueError("config.gdd.discriminator='projected' needs the feature networks' weights "
                     "(config.gdd.backbones, read by the run assembly)")
  module = nets.teacher.module
  image_shape = (module.img_resolution, module.img_resolution, module.img_channels)
  return projected_discriminator(ProjectedSettings.from_config(settings, config.get("seed", 0)), image_shape,
                                 nets.teacher.label_dim, feature_weights, class_embedding)


def make(config: ml_collections.ConfigDict, nets: Networks, discriminator: Optional[Discriminator] = None,
         feature_weights: Optional[Mapping[str, Mapping[str, Any]]] = None,
         class_embedding: Optional[np.ndarray] = None) -> Method:
  """GDD from config.loss and config.gdd; `discriminator` overrides the configured one. `feature_weights`
  and `class_embedding` are the projected discriminator's pretrained arrays, read by the run assembly."""
  hp = GDDHyper.from_config(config.loss)
  discriminator = discriminator or discriminator_from_config(config, hp, nets, feature_weights, class_embedding)
  regularizer = None
  if hp.r1_gamma > 0:
    regularizer = LazyRegularizer(loss=make_r1_loss(hp, discriminator), interval=hp.r1_interval)
  return Method(critic_loss=make_critic_loss(hp, discriminator),
                generator_loss=make_generator_loss(hp, discriminator),
                critic_draws=_no_draws, generator_draws=_no_draws, uses_real_images=True,
                generator_trainable_mask=trainable_mask if hp.freeze else None,
                init_critic_variables=discriminator.init, init_sigma=hp.init_sigma,
                generator_first=True, critic_regularizer=regularizer,
                frozen_variables=discriminator.frozen, generator_class=GENERATOR_CLASS, shared_batch=True)
