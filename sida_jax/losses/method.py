"""The interface between the shared training step and a distillation method.

A method is a record of pure functions. The step (sida_jax/train/step.py) owns everything common — random
draws, generator forward passes, augmentation, gradients, optimisers, EMA, devices — and calls:

  critic_loss(critic_params, inputs: CriticInputs) -> (loss, metrics)
      the loss of the network trained in the first phase of every iteration (SiD's fake score network;
      GDD's discriminator), on generator samples produced without gradient;
  generator_loss(x_g, inputs: GeneratorInputs) -> (loss, metrics)
      the generator's loss as a function of its differentiable output x_g.

Both see the whole batch (or one accumulation round of it) and divide their per-sample sums by its size: the
official per-device sums over the per-device batch, averaged over devices. Reductions the official code makes
per device (SiDA's BCE pools, GDD's sums) default to groups of `inputs.device_batch` samples.
A method may also ask for the generator phase to run first (`generator_first`) and for a lazy critic
regulariser (`critic_regularizer`: its own optimiser step every few iterations). A critic whose calls change
its non-trainable variables (GDD's heads: batch-norm statistics, spectral-norm vectors) has each loss return
them under `CRITIC_BUFFERS` in its metrics; the step writes them back. The step never branches on a
method's name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from sida_jax.models.denoiser import Denoiser

Array = jax.Array

# Metrics key under which a loss (critic, generator or regulariser) returns the critic's non-trainable
# variables after its calls; the step writes them into the critic state (averaged over devices) and drops the
# key from the metrics. Losses of critics without such state leave it out.
CRITIC_BUFFERS = "critic_buffers"


@dataclasses.dataclass(frozen=True)
class Networks:
  """The three denoisers of a distillation run (same architecture unless a method says otherwise)."""
  teacher: Denoiser
  critic: Denoiser
  generator: Denoiser


def _pytree(cls):
  names = [f.name for f in dataclasses.fields(cls)]
  static = [n for n in names if n == "device_batch"]   # a Python int: shapes depend on it
  return jax.tree_util.register_dataclass(cls, data_fields=[n for n in names if n not in static],
                                          meta_fields=static)


@_pytree
@dataclasses.dataclass(frozen=True)
class CriticInputs:
  """Everything the critic loss may use, for the samples of one device."""
  x_g: Array                      # generator samples (no gradient), after augmentation
  augment_labels: Optional[Array]  # labels of that augmentation (None when no augmentation)
  labels: Optional[Array]          # one-hot class labels of the batch, or None
  real_images: Optional[Array]     # real data (methods with real data), augmented like x_g
  real_augment_labels: Optional[Array]
  draws: dict                      # the method's random draws (see Method.critic_draws)
  critic_buffers: dict             # non-trainable variables of the critic
  teacher_variables: dict
  dropout_rng: Array
  nimg: Array                      # images seen before this iteration (float32)
  # Samples per device and accumulation round (the official `batch_gpu`): the default group of the official
  # per-device reductions (SiDA's BCE pools, GDD's sums); 0: the batch the loss sees.
  device_batch: int = 0


@_pytree
@dataclasses.dataclass(frozen=True)
class GeneratorInputs:
  labels: Optional[Array]
  real_images: Optional[Array]
  draws: dict
  critic_variables: dict           # the critic after this iteration's update, frozen
  teacher_variables: dict
  dropout_rng: Array
  nimg: Array
  device_batch: int = 0            # as in CriticInputs


DrawFn = Callable[[Array, int, tuple], dict]


@dataclasses.dataclass(frozen=True)
class LazyRegularizer:
  """A critic regulariser taken as a separate optimiser step every `interval` iterations (StyleGAN2's lazy
  regularisation, as GDD's R1): at iterations k·interval, k ≥ 1, after the critic phase, the critic steps once
  more on `interval` × loss; the critic's Adam then runs with lr·c and β2^c, c = interval/(interval + 1)
  (`lazy_adam_settings`), so that its step size and second-moment horizon per iteration stay as configured.

  Attributes:
    loss: (critic_params, inputs: CriticInputs) -> (loss, metrics), the per-iteration regulariser (the step
      multiplies it by `interval`). Its inputs carry the batch's real images without augmentation, the
      batch's labels and no generator samples (x_g is None).
    interval: iterations between regulariser steps.
  """
  loss: Callable[[Any, CriticInputs], tuple]
  interval: int


@dataclasses.dataclass(frozen=True)
class Method:
  """A distillation method plugged into the shared step.

  Attributes:
    critic_loss: see module docstring.
    generator_loss: see module docstring.
    critic_draws: (rng, batch, image_shape) -> dict of arrays with a leading batch axis; drawn globally so
      that results do not depend on how the batch is split over devices. (The generator's own input noise
      z of each phase is drawn by the step.)
    generator_draws: the same for the generator phase.
    generator_update_gate: nimg -> bool array; False skips the generator's optimiser step (SiDA stage 1).
    critic_grad_clip: element-wise clip of critic gradients (SiDA on EDM teachers), or None.
    uses_real_images: whether the critic phase needs real data (SiDA, GDD).
    critic_trainable_mask: optional pytree-of-bool function of params (GDD-I style freezing) for the critic.
    generator_trainable_mask: the same for the generator.
    critic_labels: optional (labels, critic draws) -> labels of the critic phase, used both to generate its
      x_g and in the critic loss (SiD-LSG's null-label dropout); None keeps the batch's labels. The
      method's critic loss applies it as well, so it must be idempotent for given draws.
    init_critic_variables: optional (rng, teacher_variables, image_shape) -> initial critic variables, for
      a critic that is not a copy of the teacher (GDD's discriminator heads); None: the teacher's copy.
    init_sigma: the generator input noise level the method prescribes (GDD: σ_max = 80), to be used as the
      step's `init_sigma`; None leaves it to the run's configuration.
    generator_first: run the generator phase (against the critic of the previous iteration) before the critic
      phase (whose samples then come from the just-updated generator), as GDD's official loop; False is the
      SiD family's order.
    critic_regularizer: an optional `LazyRegularizer` (GDD's R1).
    frozen_variables: optional teacher variables -> the frozen variables the step receives in the teacher's
      place and the losses read as `inputs.teacher_variables` (GDD's projected discriminator: its pretrained
      feature networks; the teacher itself is then not needed); None: the teacher's variables.
    generator_class: official class name of the preconditioner the generator puts around the teacher's
      network, with the teacher's weights (GDD: 'GDDPrecond'); None: the teacher's own class.
    shared_batch: both phases of an iteration use the same data batch (GDD's official loop: the G and D
      stages and R1 see the same real images and labels); False: a fresh batch per phase.
  """
  critic_loss: Callable[[Any, CriticInputs], tuple]
  generator_loss: Callable[[Array, GeneratorInputs], tuple]
  critic_draws: DrawFn
  generator_draws: DrawFn
  generator_update_gate: Callable[[Array], Array] = lambda nimg: jnp.asarray(True)
  critic_grad_clip: Optional[float] = None
  uses_real_images: bool = False
  critic_trainable_mask: Optional[Callable[[Any], Any]] = None
  generator_trainable_mask: Optional[Callable[[Any], Any]] = None
  critic_labels: Optional[Callable[[Optional[Array], dict], Optional[Array]]] = None
  init_critic_variables: Optional[Callable[[Array, dict, tuple], dict]] = None
  init_sigma: Optional[float] = None
  generator_first: bool = False
  critic_regularizer: Optional[LazyRegularizer] = None
  frozen_variables: Optional[Callable[[dict], dict]] = None
  generator_class: Optional[str] = None
  shared_batch: bool = False


def lazy_adam_settings(method: Method, learning_rate: float, beta2: float) -> tuple:
  """The critic's Adam (lr, β2) for a method with a lazy regulariser: lr·c and β2^c, c = k/(k + 1) for
  interval k (the official GDD / StyleGAN2 adjustment; β1 is 0 in every such recipe). Unchanged otherwise."""
  regularizer = method.critic_regularizer
  if regularizer is None:
    return learning_rate, beta2
  ratio = regularizer.interval / (regularizer.interval + 1)
  return learning_rate * ratio, beta2 ** ratio


def check_recipe_method(config) -> None:
  """Refuses a `config.method` other than the one its published recipe was written for, in one line that
  names the recipe variant of the requested method (the other method's loss, optimiser and schedule values
  would otherwise be used silently).

  Published configs record `recipe` ('FILE:VARIANT') and `recipe_variants` ('VARIANT=METHOD …', every
  variant of that file); configs without a recipe (smoke tests, demos) take every value as given.
  """
  recipe = config.get("recipe", "")
  if not recipe:
    return
  methods = dict(pair.rsplit("=", 1) for pair in config.recipe_variants.split())
  name, _, variant = recipe.partition(":")
  if config.method == methods[variant]:
    return
  options = [f"configs/{name}.py:{v}" for v, m in methods.items() if m == config.method]
  hint = (f"use {' or '.join(options)}" if options else
          f"{name} has no {config.method!r} recipe (variants: {', '.join(methods)})")
  raise ValueError(f"config.method={config.method!r} on recipe {recipe}: {hint}")
