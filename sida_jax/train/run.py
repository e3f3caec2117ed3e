"""Run assembly: the config is read here, once, into a frozen `Run`; the loop (`loop.py`) only runs it.

`build_run(config)` loads the teacher (a snapshot, a converted folder or a fresh `config.network`),
builds the trained networks, the method (`losses/<config.method>.py`), the data, the optimisers and
the step specification, and checks them against each other; the helpers below it take plain values.
`initial_state(run, layout)` gives the first DistillState, placed on the mesh (`sharding.py`). A Stable Diffusion
pipeline folder as the teacher makes a text-to-image run instead (`train/t2i.py`), with the same `Run` record.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from sida_jax import checkpoint, data as data_lib, sampling
from sida_jax import augment as augment_lib
from sida_jax.formats import feature_networks
from sida_jax.losses import method as method_lib
from sida_jax.losses.method import Method, Networks
from sida_jax.models import convert
from sida_jax.models.edm2 import networks as edm2
from sida_jax.models.registry import (Network, build_network, denoiser_for, is_edm2_class, rewrap,
                                     with_block_remat)
from sida_jax.train import sharding
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

METHODS = ("sid", "sida", "sim", "lsg", "gdd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PROMPT_KEYS = ("prompts", "prompt_feature")   # config.data entries of text-to-image runs (train/t2i.py)


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything static about a distillation run."""
  teacher: Network
  train_kwargs: dict          # constructor kwargs of generator and critic (dropout overridden)
  generator_class: str        # official class name of the generator (the teacher's, or the method's)
  generator_kwargs: dict      # its constructor kwargs
  nets: Networks
  method: Method
  spec: step_lib.StepSpec
  dataset: Optional[data_lib.Dataset]
  image_shape: tuple
  batch_size: int             # global batch
  seed: int
  generator_init: str         # SiD²A: where the generator starts ('': the teacher)
  dtype: Any                  # compute dtype of the networks
  sample_rng: str = 'torch_cpu'  # per-seed noise of sample grids and evaluations (sampling.seed_noise)
  text: Any = None              # text-to-image runs: the frozen text side (text_to_image.TextConditioning)
  mesh: tuple = (-1, 1)       # (data, fsdp) as configured; -1: the devices left over
  min_shard_size: int = sharding.MIN_SHARD_SIZE

  @property
  def class_name(self) -> str:
    return self.teacher.class_name

  @property
  def frozen_variables(self) -> dict:
    """The step's frozen argument: the teacher's variables, or what the method makes of them."""
    frozen = self.method.frozen_variables
    return self.teacher.variables if frozen is None else frozen(self.teacher.variables)

  def layout(self, devices=None) -> sharding.Layout:
    """The mesh of `config.mesh` over `devices` (default: all) with the sharding rules."""
    return sharding.Layout(sharding.make_mesh(*self.mesh, devices=devices), self.min_shard_size)

  @functools.cached_property
  def generate(self):
    """Jitted one-step generation (variables, z, labels) -> images, compiled once per run. With several
    processes the images come back whole on every process (grids and evaluations read them on the host)."""
    fn = jax.jit(lambda v, z, y: sampling.generate(self.nets.generator, v, z, y, self.spec.init_sigma))
    if jax.process_count() == 1:
      return fn
    return lambda v, z, y: multihost_utils.process_allgather(fn(v, z, y), tiled=True)

  def device_batch(self, batch: dict) -> dict:
    """The step's batch from the one placed on the devices: prompt token ids become text embeddings."""
    return batch if self.text is None else self.text.device_batch(batch)


def compute_dtype(name: str) -> Any:
  """The compute dtype `config.dtype` names."""
  if name not in DTYPES:
    raise ValueError(f"config.dtype={name!r} is not one of {', '.join(DTYPES)}")
  return DTYPES[name]


def load_teacher(source: str, key: str, class_name: str, init_kwargs: Mapping[str, Any], seed: int,
                 dtype: Any) -> Network:
  """The teacher at `source` (a snapshot or converted folder), or without one a freshly initialised
  `class_name(**init_kwargs)` (smoke tests, benchmarks)."""
  if source:
    if not os.path.exists(source):
      raise FileNotFoundError(f"config.teacher: file not found: {source}")
    return checkpoint.load_network(source, key=key, dtype=dtype)
  module = build_network(class_name, init_kwargs, dtype)
  variables = convert.init_variables(module, jax.random.key(seed))
  return Network(module, variables, class_name, dict(init_kwargs))


def make_dataset(options: Mapping[str, Any]) -> Optional[data_lib.Dataset]:
  """The dataset `options` (config.data) describe, or None when they name no source."""
  options = {k: v for k, v in options.items() if k not in PROMPT_KEYS}
  if not options.get("source"):
    return None
  # '' and 0 mean "unset" in the config (ml_collections fields need a type); booleans pass through.
  return data_lib.make_dataset({k: (None if not isinstance(v, bool) and v in ("", 0) else v)
                                for k, v in options.items()})


def make_augment(probability: float, augment_dim: int):
  """EDM's AugmentPipe at `probability` as augment_fn(rng, images), or None when it is 0."""
  if probability <= 0:
    return None
  aug_config = augment_lib.edm_config(probability)
  if augment_lib.augment_dim(aug_config) != augment_dim:
    raise ValueError(f"config.augment_p > 0 needs a network with augment_dim "
                     f"{augment_lib.augment_dim(aug_config)}, the teacher has {augment_dim}")
  return lambda rng, images: augment_lib.augment(rng, images, aug_config)


def method_weights(config: ml_collections.ConfigDict, label_dim: int) -> dict:
  """Pretrained files the method's config names besides the teacher, read here as plain arrays and handed to
  its make(): GDD's projected discriminator (config.gdd.backbones: its feature networks and, conditional, its
  class embedding). {} for every other configuration."""
  gdd = config.get("gdd")
  if config.method != "gdd" or gdd is None or gdd.discriminator != "projected":
    return {}
  names = tuple(gdd.feature_networks)
  if not gdd.backbones:
    raise ValueError("config.gdd.discriminator='projected' needs config.gdd.backbones=DIR holding "
                     f"{feature_networks.describe(names, bool(label_dim))} (or use config.gdd.discriminator=teacher)")
  weights, table = feature_networks.read(gdd.backbones, names, class_embedding=bool(label_dim))
  return {"feature_weights": weights, "class_embedding": table}


def make_method(name: str, config: ml_collections.ConfigDict, nets: Networks, **weights) -> Method:
  """The method `name`: the module sida_jax/losses/<name>.py, whose make() reads its own settings
  (`weights`: the arrays of `method_weights`)."""
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is not one of {', '.join(METHODS)}")
  return importlib.import_module(f"sida_jax.losses.{name}").make(config, nets, **weights)


def mesh_shape(config: ml_collections.ConfigDict) -> tuple:
  """(data, fsdp) of config.mesh on this machine's devices, after checking that the batch splits over them and
  config.grad_accum rounds."""
  n_dev = jax.device_count()
  mesh = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, n_dev)
  if config.grad_accum < 1:
    raise ValueError(f"config.grad_accum={config.grad_accum}: expected a positive number of rounds")
  if config.batch_size % (n_dev * config.grad_accum):
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {n_dev} devices × "
                     f"config.grad_accum={config.grad_accum} rounds")
  return mesh


def build_run(config: ml_collections.ConfigDict, teacher: Optional[Network] = None,
              with_data: bool = True) -> Run:
  """Reads the config, validates it against the teacher and data, and builds the step specification.

  `teacher` replaces loading `config.teacher` and `with_data=False` opens no dataset: the memory plan
  builds the run from shapes alone (a teacher whose variables are ShapeDtypeStructs).
  """
  method_lib.check_recipe_method(config)
  from sida_jax.train import t2i  # pylint: disable=import-outside-toplevel
  if t2i.is_pipeline_folder(config.teacher):
    return t2i.build_run(config, with_data=with_data)
  dtype = compute_dtype(config.dtype)
  if teacher is None:
    teacher = load_teacher(config.teacher, config.teacher_key, config.network.class_name,
                           config.network.kwargs.to_dict(), config.seed, dtype)
  kwargs = dict(teacher.init_kwargs)
  if config.dropout >= 0:
    kwargs["dropout"] = float(config.dropout)
  module = build_network(teacher.class_name, kwargs, dtype)
  trained = denoiser_for(module, teacher.class_name, kwargs, config.loss.use_logvar)
  nets = Networks(teacher=denoiser_for(teacher.module, teacher.class_name, teacher.init_kwargs),
                  critic=trained, generator=dataclasses.replace(trained, has_logvar=False))
  weights = method_weights(config, trained.label_dim)
  method = make_method(config.method, config, nets, **weights)
  generator_class, generator_kwargs = teacher.class_name, kwargs
  if method.generator_class:
    # The method's own preconditioning around the teacher's network and weights (GDD's GDDPrecond).
    generator_class = method.generator_class
    generator_kwargs = rewrap(teacher.class_name, kwargs, generator_class)
    generator = build_network(generator_class, generator_kwargs, dtype)
    nets = dataclasses.replace(nets, generator=denoiser_for(generator, generator_class, generator_kwargs))
  step_nets = nets
  if config.remat not in step_lib.REMAT:
    raise ValueError(f"config.remat={config.remat!r} is not one of {', '.join(step_lib.REMAT)}")
  if config.remat == "blocks":
    # Only the generator phase recomputes blocks: its loss is taken from the method built on networks
    # whose U-Net blocks are rematerialised (same parameters); the critic phase keeps plain networks.
    step_nets = Networks(*(dataclasses.replace(net, module=with_block_remat(net.module))
                           for net in (nets.teacher, nets.critic, nets.generator)))
    method = dataclasses.replace(
        method, generator_loss=make_method(config.method, config, step_nets, **weights).generator_loss)
  res, channels = int(kwargs["img_resolution"]), int(kwargs["img_channels"])
  image_shape = (res, res, channels)
  dataset = make_dataset(config.data.to_dict()) if with_data else None
  if method.uses_real_images and dataset is None and with_data:
    raise ValueError(f"config.method={config.method!r} needs real data: set config.data.source")
  if dataset is not None and dataset.has_images and tuple(dataset.image_shape) != image_shape:
    raise ValueError(f"config.data: images are {tuple(dataset.image_shape)} but the teacher works on {image_shape}")
  if dataset is not None and trained.label_dim and dataset.label_dim not in (0, trained.label_dim):
    raise ValueError(f"config.data: {dataset.label_dim} classes but the teacher has label_dim {trained.label_dim}")
  mesh = mesh_shape(config)
  augment_fn = make_augment(config.augment_p, trained.augment_dim)
  o = config.optim
  transform = step_lib.identity
  if is_edm2_class(teacher.class_name) and config.force_normalize:
    transform = edm2.force_normalize
  critic_lr, critic_beta2 = method_lib.lazy_adam_settings(method, o.critic_lr, o.beta2)
  spec = step_lib.StepSpec(
      method=method, nets=step_nets, batch_size=config.batch_size, image_shape=image_shape,
      init_sigma=method.init_sigma or config.init_sigma,
      generator_tx=state_lib.make_optimizer(o.generator_lr, o.generator_beta1, o.beta2, o.eps,
                                            clip_value=o.generator_grad_clip or None,
                                            trainable_mask=method.generator_trainable_mask),
      critic_tx=state_lib.make_optimizer(critic_lr, o.critic_beta1, critic_beta2, o.eps,
                                         clip_value=method.critic_grad_clip,
                                         trainable_mask=method.critic_trainable_mask),
      ema_halflife_mimg=config.ema.halflife_mimg, ema_rampup_ratio=config.ema.rampup_ratio or None,
      augment_fn=augment_fn, generator_train_transform=transform, critic_train_transform=transform,
      grad_accum=config.grad_accum, checkpoint_generator_objective=config.remat == "full")
  # The teacher waits on the host until the loop places it on the mesh: a whole copy on the first device
  # next to its shards would not fit where fsdp is needed.
  teacher = dataclasses.replace(teacher, variables=jax.tree.map(
      lambda x: jax.device_get(x) if isinstance(x, jax.Array) else x, teacher.variables))
  return Run(teacher=teacher, train_kwargs=kwargs, generator_class=generator_class,
             generator_kwargs=generator_kwargs, nets=nets, method=method, spec=spec, dataset=dataset,
             image_shape=image_shape, batch_size=config.batch_size, seed=config.seed,
             generator_init=config.generator_init, dtype=dtype,
             sample_rng=config.sample.rng, mesh=mesh, min_shard_size=config.mesh.min_shard_size)


def initial_state(run: Run, layout: Optional[sharding.Layout] = None) -> state_lib.DistillState:
  """Generator from the teacher (or `run.generator_init`: SiD²A), critic from the teacher (or the
  method's own initialiser), EMA = generator. With a layout the state is built in place, already split
  over the mesh (no device ever holds more than its share of the optimiser states and EMA)."""
  place = layout.place if layout is not None else (lambda tree: tree)
  teacher = place(run.teacher.variables)
  generator = teacher
  if run.generator_init:
    generator = place(jax.device_get(
        checkpoint.load_network(run.generator_init, dtype=run.dtype, like=run.teacher).variables))
  critic = teacher
  init_critic = getattr(run.method, "init_critic_variables", None)
  if init_critic is not None:
    critic = place(init_critic(jax.random.key(run.seed + 1), teacher, run.image_shape))

  def init(generator, critic):
    return state_lib.init_state(jax.random.key(run.seed), generator, critic,
                                run.spec.generator_tx, run.spec.critic_tx)
  if layout is None:
    return init(generator, critic)
  shapes = jax.eval_shape(init, generator, critic)
  return jax.jit(init, out_shardings=layout.shardings(shapes))(generator, critic)
