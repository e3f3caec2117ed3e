"""The one training step shared by every method, data-parallel over a device mesh.

One iteration, in the official order (REFERENCE_CODE.md §1.3, §1.6):
  1. critic phase: generator samples without gradient (generator in eval mode), optional augmentation,
     the method's critic loss in train mode, gradients averaged over devices, nan_to_num → clip → Adam;
  2. generator phase: fresh noise and labels, generator in train mode (dropout), the method's generator loss
     with gradients through x_g and through x_t into the frozen teacher and the just-updated critic;
     the update is applied only where the method's gate allows (SiDA stage 1);
  3. EMA of the generator parameters, with the pre-step image count.
A critic whose calls change its non-trainable variables (GDD's heads) gets them back from each loss
(`CRITIC_BUFFERS`), averaged over devices, in call order.
A method with `generator_first` (GDD, REFERENCE_CODE.md §4.1) swaps 1 and 2: its generator trains against the
previous iteration's critic and the critic then sees samples of the updated generator. A method with a lazy
`critic_regularizer` (GDD's R1) gets one more critic optimiser step after both phases every `interval`
iterations (not at iteration 0), on `interval` × the regulariser's loss.
Networks in train mode first get `train_transform` (EDM2's forced weight normalisation), and the
transformed weights are what gets updated, exactly like the official in-place overwrite.

All random draws are made for the global batch outside the per-device body, so results do not depend on
how the batch is split; only dropout masks and augmentation use per-device keys.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sida_jax import sampling
from sida_jax.losses.method import CRITIC_BUFFERS, CriticInputs, GeneratorInputs, Method, Networks
from sida_jax.train import state as state_lib

Array = jax.Array
AXIS = "data"


def identity(params):
  return params


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Static description of a run's step (hashable pieces only: functions and numbers)."""
  method: Method
  nets: Networks
  batch_size: int                       # global
  image_shape: tuple                    # (H, W, C)
  init_sigma: float
  generator_tx: optax.GradientTransformation
  critic_tx: optax.GradientTransformation
  ema_halflife_mimg: float
  ema_rampup_ratio: Optional[float] = 0.05
  augment_fn: Optional[Callable[[Array, Array], tuple]] = None   # (rng, images) -> (images, labels)
  generator_train_transform: Callable = identity
  critic_train_transform: Callable = identity


def sample_draws(spec: StepSpec, rng: Array) -> dict:
  """Every random number of one iteration except dropout/augmentation, for the global batch."""
  k_cz, k_c, k_gz, k_g = jax.random.split(rng, 4)
  n, shape = spec.batch_size, spec.image_shape
  critic = dict(spec.method.critic_draws(k_c, n, shape), z=jax.random.normal(k_cz, (n, *shape)))
  generator = dict(spec.method.generator_draws(k_g, n, shape), z=jax.random.normal(k_gz, (n, *shape)))
  return {"critic": critic, "generator": generator}


def iteration_key(state: state_lib.DistillState, stream: int) -> Array:
  """Keys are a function of (seed, step, stream) only, which makes resumes exact."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), stream)


def _mean_over_devices(tree, axis_name):
  return jax.lax.pmean(tree, axis_name) if axis_name else tree


def _write_back_buffers(metrics: dict, critic: state_lib.TrainedNetwork, axis_name):
  """(metrics without CRITIC_BUFFERS, critic holding the buffers a loss returned there, averaged over devices)."""
  if CRITIC_BUFFERS not in metrics:
    return metrics, critic
  metrics = dict(metrics)
  return metrics, critic.replace(buffers=_mean_over_devices(metrics.pop(CRITIC_BUFFERS), axis_name))


def _count_nonfinite(grads) -> Array:
  return sum(jnp.sum(~jnp.isfinite(g)).astype(jnp.int32) for g in jax.tree.leaves(grads))


def _global_norm(grads) -> Array:
  return optax.global_norm(jax.tree.map(lambda g: jnp.nan_to_num(g, posinf=1e5, neginf=-1e5), grads))


def critic_phase(spec: StepSpec, state: state_lib.DistillState, teacher_variables: dict, batch: dict,
                 draws: dict, rng: Array, axis_name: Optional[str] = None):
  """The critic update. Returns (new critic TrainedNetwork, loss, metrics, grads)."""
  k_drop, k_aug_fake, k_aug_real = jax.random.split(rng, 3)
  nimg = state.nimg(spec.batch_size)
  labels = batch.get("labels")
  if spec.method.critic_labels is not None:
    labels = spec.method.critic_labels(labels, draws)   # e.g. SiD-LSG's null-label dropout
  x_g = sampling.generate(spec.nets.generator, state.generator.variables, draws["z"], labels, spec.init_sigma)
  x_g = jax.lax.stop_gradient(x_g)
  real = batch.get("images") if spec.method.uses_real_images else None
  augment_labels = real_augment_labels = None
  if spec.augment_fn is not None:
    x_g, augment_labels = spec.augment_fn(k_aug_fake, x_g)
    if real is not None:
      real, real_augment_labels = spec.augment_fn(k_aug_real, real)
  params = spec.critic_train_transform(state.critic.params)
  inputs = CriticInputs(x_g=x_g, augment_labels=augment_labels, labels=labels, real_images=real,
                        real_augment_labels=real_augment_labels, draws=draws,
                        critic_buffers=state.critic.buffers, teacher_variables=teacher_variables,
                        dropout_rng=k_drop, nimg=nimg)
  (loss, metrics), grads = jax.value_and_grad(spec.method.critic_loss, has_aux=True)(params, inputs)
  grads = _mean_over_devices(grads, axis_name)
  updates, opt_state = spec.critic_tx.update(grads, state.critic.opt_state, params)
  new = state.critic.replace(params=optax.apply_updates(params, updates), opt_state=opt_state)
  metrics, new = _write_back_buffers(metrics, new, axis_name)
  return new, loss, metrics, grads


def generator_phase(spec: StepSpec, state: state_lib.DistillState, critic: state_lib.TrainedNetwork,
                    teacher_variables: dict, batch: dict, draws: dict, rng: Array,
                    axis_name: Optional[str] = None):
  """The generator update against the given (already updated) critic. Returns (new generator, loss,
  metrics, grads); the metrics may carry the critic's buffers after this phase (CRITIC_BUFFERS)."""
  nimg = state.nimg(spec.batch_size)
  labels = batch.get("labels")
  real = batch.get("images") if spec.method.uses_real_images else None
  inputs = GeneratorInputs(labels=labels, real_images=real, draws=draws, critic_variables=critic.variables,
                           teacher_variables=teacher_variables, dropout_rng=rng, nimg=nimg)
  k_drop = jax.random.fold_in(rng, 1)
  buffers = state.generator.buffers

  def objective(params):
    x_g = sampling.generate(spec.nets.generator, {"params": params, **buffers}, draws["z"], labels,
                            spec.init_sigma, train=True, rng=k_drop)
    return spec.method.generator_loss(x_g, inputs)

  params = spec.generator_train_transform(state.generator.params)
  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
  grads = _mean_over_devices(grads, axis_name)
  updates, opt_state = spec.generator_tx.update(grads, state.generator.opt_state, params)
  stepped = optax.apply_updates(params, updates)
  gate = spec.method.generator_update_gate(nimg)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(gate, a, b), new, old)
  new = state.generator.replace(params=keep(stepped, params),
                                opt_state=keep(opt_state, state.generator.opt_state))
  return new, loss, metrics, grads


def regularizer_phase(spec: StepSpec, state: state_lib.DistillState, critic: state_lib.TrainedNetwork,
                      teacher_variables: dict, batch: dict, rng: Array, axis_name: Optional[str] = None):
  """The method's lazy critic regulariser: on iterations k·interval (k ≥ 1) one more critic optimiser step on
  interval × its loss; otherwise nothing (and no computation). Returns (critic, metrics, non-finite count)."""
  regularizer = spec.method.critic_regularizer
  due = (state.step > 0) & (state.step % regularizer.interval == 0)
  inputs = CriticInputs(x_g=None, augment_labels=None, labels=batch.get("labels"), real_images=batch.get("images"),
                        real_augment_labels=None, draws={}, critic_buffers=critic.buffers,
                        teacher_variables=teacher_variables, dropout_rng=rng, nimg=state.nimg(spec.batch_size))

  def gained(params):
    loss, metrics = regularizer.loss(params, inputs)
    return loss * regularizer.interval, metrics

  def regularize(critic):
    params = spec.critic_train_transform(critic.params)
    (_, metrics), grads = jax.value_and_grad(gained, has_aux=True)(params)
    grads = _mean_over_devices(grads, axis_name)
    updates, opt_state = spec.critic_tx.update(grads, critic.opt_state, params)
    new = critic.replace(params=optax.apply_updates(params, updates), opt_state=opt_state)
    metrics, new = _write_back_buffers(metrics, new, axis_name)
    return new, metrics, _count_nonfinite(grads)

  def skip(critic):
    without_buffers = lambda metrics: {k: v for k, v in metrics.items() if k != CRITIC_BUFFERS}
    shapes = jax.eval_shape(lambda p: without_buffers(gained(p)[1]), critic.params)
    return critic, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), jnp.zeros((), jnp.int32)

  critic, metrics, bad = jax.lax.cond(due, regularize, skip, critic)
  return critic, {**metrics, "critic_regularized": due.astype(jnp.float32)}, bad


def step_body(spec: StepSpec, state: state_lib.DistillState, teacher_variables: dict, batch: dict,
              draws: dict, axis_name: Optional[str] = None):
  """One iteration on one device's share of the batch (the whole batch on a single device)."""
  rng = iteration_key(state, 1)
  if axis_name:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  k_critic, k_gen = jax.random.split(rng)
  if spec.method.generator_first:
    generator, g_loss, g_metrics, g_grads = generator_phase(
        spec, state, state.critic, teacher_variables, batch["generator"], draws["generator"], k_gen, axis_name)
    g_metrics, critic = _write_back_buffers(g_metrics, state.critic, axis_name)
    critic, c_loss, c_metrics, c_grads = critic_phase(
        spec, state.replace(generator=generator, critic=critic), teacher_variables, batch["critic"],
        draws["critic"], k_critic, axis_name)
  else:
    critic, c_loss, c_metrics, c_grads = critic_phase(
        spec, state, teacher_variables, batch["critic"], draws["critic"], k_critic, axis_name)
    generator, g_loss, g_metrics, g_grads = generator_phase(
        spec, state, critic, teacher_variables, batch["generator"], draws["generator"], k_gen, axis_name)
    g_metrics, critic = _write_back_buffers(g_metrics, critic, axis_name)
  nimg = state.nimg(spec.batch_size)
  beta = state_lib.ema_beta(nimg, spec.batch_size, spec.ema_halflife_mimg, spec.ema_rampup_ratio)
  ema = state_lib.ema_update(state.generator_ema, generator.params, beta)
  bad_c, bad_g = _count_nonfinite(c_grads), _count_nonfinite(g_grads)
  metrics = {**c_metrics, **g_metrics}
  if spec.method.critic_regularizer is not None:
    critic, r_metrics, bad_r = regularizer_phase(spec, state, critic, teacher_variables, batch["critic"],
                                                 jax.random.fold_in(rng, 2), axis_name)
    metrics.update(r_metrics)
    bad_c = bad_c + bad_r
  metrics = _mean_over_devices(metrics, axis_name)
  metrics.update(critic_grad_norm=_global_norm(c_grads), generator_grad_norm=_global_norm(g_grads),
                 nonfinite_critic=bad_c, nonfinite_generator=bad_g, ema_beta=beta,
                 generator_updated=spec.method.generator_update_gate(nimg).astype(jnp.float32))
  new_state = state.replace(
      step=state.step + 1, generator=generator, generator_ema=ema, critic=critic,
      nonfinite={"critic": state.nonfinite["critic"] + bad_c,
                 "generator": state.nonfinite["generator"] + bad_g})
  return new_state, metrics


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  devices = jax.devices()
  if num_devices is not None:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def make_train_step(spec: StepSpec, mesh: Mesh):
  """Returns jitted `train_step(state, teacher_variables, batch) -> (state, metrics)`.

  The state and teacher are replicated; `batch` arrays (leading axis = global batch) are split over the
  mesh's data axis. The state is donated; the teacher never is.
  """
  n_dev = mesh.devices.size
  if spec.batch_size % n_dev:
    raise ValueError(f"batch_size {spec.batch_size} is not divisible by the {n_dev} devices of the mesh")
  replicated, sharded = P(), P(AXIS)
  body = jax.shard_map(functools.partial(step_body, spec, axis_name=AXIS), mesh=mesh,
                       in_specs=(replicated, replicated, sharded, sharded),
                       out_specs=(replicated, replicated), check_vma=False)

  def train_step(state, teacher_variables, batch):
    draws = sample_draws(spec, iteration_key(state, 0))
    draws = jax.lax.with_sharding_constraint(draws, NamedSharding(mesh, sharded))
    return body(state, teacher_variables, batch, draws)

  return jax.jit(train_step, donate_argnums=(0,))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host batch (this process's rows) on the mesh, split along the data axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
