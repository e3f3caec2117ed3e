"""Run assembly: the teacher, the networks, the method, the data and the step specification of a run."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from sida_jax import checkpoint, data as data_lib, sampling
from sida_jax import augment as augment_lib
from sida_jax.losses.method import Method, Networks
from sida_jax.models import convert
from sida_jax.models.registry import Network, build_network, denoiser_for, is_edm2_class
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

METHODS = ("sid", "sida", "sim", "lsg", "gdd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_method(config: ml_collections.ConfigDict, nets: Networks) -> Method:
  """The method named by config.method: the module sida_jax/losses/<name>.py and its make()."""
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is not one of {', '.join(METHODS)}")
  return importlib.import_module(f"sida_jax.losses.{config.method}").make(config, nets)


def compute_dtype(config) -> Any:
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r} is not one of {', '.join(DTYPES)}")
  return DTYPES[config.dtype]


def load_teacher(config: ml_collections.ConfigDict) -> Network:
  """The configured teacher snapshot/converted folder, or a freshly initialised `config.network`."""
  dtype = compute_dtype(config)
  if config.teacher:
    if not os.path.exists(config.teacher):
      raise FileNotFoundError(f"config.teacher: file not found: {config.teacher}")
    return checkpoint.load_network(config.teacher, key=config.teacher_key, dtype=dtype)
  kwargs = config.network.kwargs.to_dict()
  module = build_network(config.network.class_name, kwargs, dtype)
  variables = convert.init_variables(module, jax.random.key(config.seed))
  return Network(module, variables, config.network.class_name, kwargs)


@dataclasses.dataclass
class Run:
  """Everything static about a run, derived from the config."""
  config: ml_collections.ConfigDict
  teacher: Network
  class_name: str
  train_kwargs: dict          # constructor kwargs of generator and critic (dropout overridden)
  nets: Networks
  method: Method
  spec: step_lib.StepSpec
  dataset: Optional[data_lib.Dataset]
  image_shape: tuple

  @functools.cached_property
  def generate(self):
    """Jitted one-step generation (variables, z, labels) -> images, compiled once per run."""
    return jax.jit(lambda v, z, y: sampling.generate(self.nets.generator, v, z, y, self.spec.init_sigma))


def _training_kwargs(config, teacher: Network) -> dict:
  kwargs = dict(teacher.init_kwargs)
  if config.dropout >= 0:
    kwargs["dropout"] = float(config.dropout)
  return kwargs


def make_dataset(config) -> Optional[data_lib.Dataset]:
  if not config.data.source:
    return None
  # '' and 0 mean "unset" in the config (ml_collections fields need a type); booleans pass through.
  options = {k: (None if not isinstance(v, bool) and v in ("", 0) else v) for k, v in config.data.items()}
  return data_lib.make_dataset(options)


def build_run(config: ml_collections.ConfigDict) -> Run:
  """Validates the config against the teacher and data, and builds the step specification."""
  dtype = compute_dtype(config)
  teacher = load_teacher(config)
  kwargs = _training_kwargs(config, teacher)
  module = build_network(teacher.class_name, kwargs, dtype)
  edm2 = is_edm2_class(teacher.class_name)
  trained = denoiser_for(module, teacher.class_name, kwargs, config.loss.use_logvar)
  nets = Networks(teacher=denoiser_for(teacher.module, teacher.class_name, teacher.init_kwargs),
                  critic=trained, generator=dataclasses.replace(trained, has_logvar=False))
  method = make_method(config, nets)
  res, channels = int(kwargs["img_resolution"]), int(kwargs["img_channels"])
  image_shape = (res, res, channels)
  dataset = make_dataset(config)
  if method.uses_real_images and dataset is None:
    raise ValueError(f"config.method={config.method!r} needs real data: set config.data.source")
  if dataset is not None and dataset.has_images and tuple(dataset.image_shape) != image_shape:
    raise ValueError(f"config.data: images are {tuple(dataset.image_shape)} but the teacher works on {image_shape}")
  if dataset is not None and trained.label_dim and dataset.label_dim not in (0, trained.label_dim):
    raise ValueError(f"config.data: {dataset.label_dim} classes but the teacher has label_dim {trained.label_dim}")
  n_dev = jax.device_count()
  if config.batch_size % n_dev:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {n_dev} devices")
  augment_fn = None
  if config.augment_p > 0:
    aug_config = augment_lib.edm_config(config.augment_p)
    if augment_lib.augment_dim(aug_config) != trained.augment_dim:
      raise ValueError(f"config.augment_p > 0 needs a network with augment_dim "
                       f"{augment_lib.augment_dim(aug_config)}, the teacher has {trained.augment_dim}")
    augment_fn = lambda rng, images: augment_lib.augment(rng, images, aug_config)
  o = config.optim
  transform = step_lib.identity
  if edm2 and config.force_normalize:
    from sida_jax.models.edm2 import networks as edm2_lib  # pylint: disable=import-outside-toplevel
    transform = edm2_lib.force_normalize
  spec = step_lib.StepSpec(
      method=method, nets=nets, batch_size=config.batch_size, image_shape=image_shape,
      init_sigma=method.init_sigma or config.init_sigma,
      generator_tx=state_lib.make_optimizer(o.generator_lr, o.generator_beta1, o.beta2, o.eps,
                                            trainable_mask=method.generator_trainable_mask),
      critic_tx=state_lib.make_optimizer(o.critic_lr, o.critic_beta1, o.beta2, o.eps,
                                         clip_value=method.critic_grad_clip,
                                         trainable_mask=method.critic_trainable_mask),
      ema_halflife_mimg=config.ema.halflife_mimg, ema_rampup_ratio=config.ema.rampup_ratio or None,
      augment_fn=augment_fn, generator_train_transform=transform, critic_train_transform=transform)
  return Run(config, teacher, teacher.class_name, kwargs, nets, method, spec, dataset, image_shape)


def initial_state(run: Run) -> state_lib.DistillState:
  """Generator from the teacher (or config.generator_init: SiD²A), critic from the teacher (or the
  method's own initialiser), EMA = generator."""
  config = run.config
  generator = run.teacher.variables
  if config.generator_init:
    generator = checkpoint.load_network(config.generator_init, dtype=compute_dtype(config)).variables
  critic = run.teacher.variables
  init_critic = getattr(run.method, "init_critic_variables", None)
  if init_critic is not None:
    critic = init_critic(jax.random.key(config.seed + 1), run.teacher.variables, run.image_shape)
  return state_lib.init_state(jax.random.key(config.seed), generator, critic,
                              run.spec.generator_tx, run.spec.critic_tx)
