"""The one training step shared by every method, in JAX's global view over a ('data', 'fsdp') mesh.

One iteration, in the official order (REFERENCE_CODE.md §1.3, §1.6):
  1. critic phase: generator samples without gradient (generator in eval mode), optional augmentation,
     the method's critic loss in train mode, gradients over the whole batch, nan_to_num → clip → Adam;
  2. generator phase: fresh noise and labels, generator in train mode (dropout), the method's generator loss
     with gradients through x_g and through x_t into the frozen teacher and the just-updated critic;
     the update is applied only where the method's gate allows (SiDA stage 1);
  3. EMA of the generator parameters, with the pre-step image count.
A critic whose calls change its non-trainable variables (GDD's heads) gets them back from each loss
(`CRITIC_BUFFERS`), in call order (the global batch's statistics; the mean of the rounds' under accumulation).
A method with `generator_first` (GDD, REFERENCE_CODE.md §4.1) swaps 1 and 2: its generator trains against the
previous iteration's critic and the critic then sees samples of the updated generator. A method with a lazy
`critic_regularizer` (GDD's R1) gets one more critic optimiser step after both phases every `interval`
iterations (not at iteration 0), on `interval` × the regulariser's loss.
Networks in train mode first get `train_transform` (EDM2's forced weight normalisation), and the
transformed weights are what gets updated, exactly like the official in-place overwrite.

Global view. The step is one `jax.jit` program over global arrays; where they live is given by
`sharding.Layout` (batch split over every device, parameters, Adam moments, EMA and teacher split along
'fsdp'), and XLA inserts the collectives: the all-gather of a network's weights before it runs and the
reduce-scatter (or all-reduce) of gradients. This keeps every method's code unchanged and free of devices:
a loss sees the whole (micro-)batch and divides its per-sample sums by its size, which is exactly the
official reduction (per-device sums / per-device batch, averaged over devices = the global mean over
samples). All random numbers — the draws of `sample_draws`, dropout masks, augmentation — are drawn for
global arrays, whose values do not depend on how they are split (partitionable threefry), so results do
not depend on the mesh. (shard_map would keep per-device code: explicit gathers of every network's weights
and per-device keys, which make dropout and augmentation depend on the device count.) The one per-device
quantity the official code has, its micro-batch `batch_gpu`, reaches the losses as `device_batch`: the
default group of SiDA's BCE pools and GDD's sums (a fixed `adv_pool_size` / `gan_sum_size` makes results
independent of it).

Gradient accumulation (`grad_accum` = k, as the official loops): each phase runs over k rounds of B/k
consecutive samples (its slice of the draws, its own dropout/augmentation key); each round's loss divides
its per-sample sums by the round's size, gradients are summed over rounds and divided by k, and the
optimiser steps once: the official "per-round sums / per-device total batch, gradients add" — the same
gradient as one batch of B. Only dropout masks and augmentation are drawn per round (another draw of the
same distribution).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from sida_jax import host_memory, sampling
from sida_jax.losses.method import CRITIC_BUFFERS, CriticInputs, GeneratorInputs, Method, Networks
from sida_jax.train import sharding as sharding_lib
from sida_jax.train import state as state_lib

Array = jax.Array
AXIS = sharding_lib.DATA
REMAT = ("none", "blocks", "full")


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
  grad_accum: int = 1                   # rounds per optimiser step (exact accumulation)
  checkpoint_generator_objective: bool = False   # config.remat='full': jax.checkpoint around it


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


def _write_back_buffers(metrics: dict, critic: state_lib.TrainedNetwork):
  """(metrics without CRITIC_BUFFERS, critic holding the buffers a loss returned there). Over accumulation
  rounds the returned buffers are the rounds' mean (each round starts from the phase's buffers)."""
  if CRITIC_BUFFERS not in metrics:
    return metrics, critic
  metrics = dict(metrics)
  buffers = jax.tree.map(lambda new, old: new.astype(old.dtype), metrics.pop(CRITIC_BUFFERS), critic.buffers)
  return metrics, critic.replace(buffers=buffers)


def _count_nonfinite(grads) -> Array:
  return sum(jnp.sum(~jnp.isfinite(g)).astype(jnp.int32) for g in jax.tree.leaves(grads))


def _global_norm(grads) -> Array:
  return optax.global_norm(jax.tree.map(lambda g: jnp.nan_to_num(g, posinf=1e5, neginf=-1e5), grads))


class _Placement:
  """The layout's constraints inside the step; nothing at all when the phases run without a mesh (the
  golden replays call them eagerly on one device)."""

  def __init__(self, layout: Optional[sharding_lib.Layout]):
    self.layout = layout

  def gather(self, tree):
    return tree if self.layout is None else self.layout.gather(tree)

  def shard_like_params(self, tree):
    return tree if self.layout is None else self.layout.constrain(tree)

  def batch(self, tree):
    return tree if self.layout is None else self.layout.split_batch(tree)

  def rounds(self, tree, k: int):
    """[B, ...] leaves → [k, B/k, ...]: round r holds samples r·B/k … (r+1)·B/k − 1."""
    tree = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), tree)
    if self.layout is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: self.layout.rounds, tree))

  def device_batch(self, batch_size: int, k: int) -> int:
    shards = 1 if self.layout is None else self.layout.batch_shards
    return batch_size // (shards * k)


def accumulate(grad_fn: Callable, params: Any, per_sample: Any, rng: Array, rounds: int,
               place: _Placement) -> tuple:
  """`grad_fn(params, samples, rng) -> ((loss, metrics), grads)` over the whole batch in `rounds` rounds.

  Returns the round-mean of loss, metrics and gradients: each round's loss is a mean over its B/k samples,
  so the mean over rounds is the whole batch's (gradients summed, then / k, as the official per-round
  division by the per-device total batch). One round calls `grad_fn` on everything with `rng` itself.
  """
  if rounds == 1:
    (loss, metrics), grads = grad_fn(params, per_sample, rng)
    return loss, metrics, place.shard_like_params(grads)
  split = place.rounds(per_sample, rounds)

  def one_round(total, xs):
    index, samples = xs
    (loss, metrics), grads = grad_fn(params, samples, jax.random.fold_in(rng, index))
    total = jax.tree.map(jnp.add, total, place.shard_like_params(grads))
    return place.shard_like_params(total), (loss, metrics)

  zeros = place.shard_like_params(jax.tree.map(jnp.zeros_like, params))
  total, (losses, metrics) = jax.lax.scan(one_round, zeros, (jnp.arange(rounds), split))
  mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
  grads = jax.tree.map(lambda g: g / rounds, total)
  return mean(losses), mean(metrics), place.shard_like_params(grads)


def critic_objective(spec: StepSpec, state: state_lib.DistillState, teacher_variables: dict, samples: tuple,
                     key: Array, place: Optional[_Placement] = None) -> Callable:
  """`loss(critic_params) -> (loss, metrics)` of the critic phase on `samples` = (batch, draws) (the whole
  batch or one accumulation round): generator samples without gradient, augmentation, the method's loss."""
  place = place or _Placement(None)
  batch, draws = samples
  k_drop, k_aug_fake, k_aug_real = jax.random.split(key, 3)
  labels = batch.get("labels")
  if spec.method.critic_labels is not None:
    labels = spec.method.critic_labels(labels, draws)   # e.g. SiD-LSG's null-label dropout
  x_g = sampling.generate(spec.nets.generator, place.gather(state.generator.variables), draws["z"], labels,
                          spec.init_sigma)
  x_g = jax.lax.stop_gradient(x_g)
  real = batch.get("images") if spec.method.uses_real_images else None
  augment_labels = real_augment_labels = None
  if spec.augment_fn is not None:
    x_g, augment_labels = spec.augment_fn(k_aug_fake, x_g)
    if real is not None:
      real, real_augment_labels = spec.augment_fn(k_aug_real, real)
  inputs = CriticInputs(x_g=x_g, augment_labels=augment_labels, labels=labels, real_images=real,
                        real_augment_labels=real_augment_labels, draws=draws,
                        critic_buffers=state.critic.buffers, teacher_variables=place.gather(teacher_variables),
                        dropout_rng=k_drop, nimg=state.nimg(spec.batch_size),
                        device_batch=place.device_batch(spec.batch_size, spec.grad_accum))
  return lambda params: spec.method.critic_loss(place.gather(params), inputs)


def critic_phase(spec: StepSpec, state: state_lib.DistillState, teacher_variables: dict, batch: dict,
                 draws: dict, rng: Array, layout: Optional[sharding_lib.Layout] = None):
  """The critic update. Returns (new critic TrainedNetwork, loss, metrics, grads)."""
  place = _Placement(layout)

  def grad_fn(params, samples, key):
    loss = critic_objective(spec, state, teacher_variables, samples, key, place)
    return jax.value_and_grad(loss, has_aux=True)(params)

  params = spec.critic_train_transform(state.critic.params)
  loss, metrics, grads = accumulate(grad_fn, params, (batch, draws), rng, spec.grad_accum, place)
  updates, opt_state = spec.critic_tx.update(grads, state.critic.opt_state, params)
  new = state.critic.replace(params=optax.apply_updates(params, updates), opt_state=opt_state)
  metrics, new = _write_back_buffers(metrics, new)
  return new, loss, metrics, grads


def generator_objective(spec: StepSpec, state: state_lib.DistillState, critic_variables: dict,
                        teacher_variables: dict, samples: tuple, key: Array,
                        place: Optional[_Placement] = None) -> Callable:
  """`objective(generator_params) -> (loss, metrics)` of the generator phase on `samples` = (batch, draws):
  the generator in train mode, then the method's loss of its output."""
  place = place or _Placement(None)
  batch, draws = samples
  labels = batch.get("labels")
  real = batch.get("images") if spec.method.uses_real_images else None
  inputs = GeneratorInputs(labels=labels, real_images=real, draws=draws,
                           critic_variables=place.gather(critic_variables),
                           teacher_variables=place.gather(teacher_variables),
                           dropout_rng=key, nimg=state.nimg(spec.batch_size),
                           device_batch=place.device_batch(spec.batch_size, spec.grad_accum))
  k_drop = jax.random.fold_in(key, 1)
  buffers = state.generator.buffers

  def objective(params):
    x_g = sampling.generate(spec.nets.generator, {"params": place.gather(params), **buffers}, draws["z"],
                            labels, spec.init_sigma, train=True, rng=k_drop)
    return spec.method.generator_loss(x_g, inputs)

  return jax.checkpoint(objective) if spec.checkpoint_generator_objective else objective


def generator_phase(spec: StepSpec, state: state_lib.DistillState, critic: state_lib.TrainedNetwork,
                    teacher_variables: dict, batch: dict, draws: dict, rng: Array,
                    layout: Optional[sharding_lib.Layout] = None):
  """The generator update against the given (already updated) critic. Returns (new generator, loss,
  metrics, grads)."""
  place = _Placement(layout)

  def grad_fn(params, samples, key):
    objective = generator_objective(spec, state, critic.variables, teacher_variables, samples, key, place)
    return jax.value_and_grad(objective, has_aux=True)(params)

  nimg = state.nimg(spec.batch_size)
  params = spec.generator_train_transform(state.generator.params)
  loss, metrics, grads = accumulate(grad_fn, params, (batch, draws), rng, spec.grad_accum, place)
  updates, opt_state = spec.generator_tx.update(grads, state.generator.opt_state, params)
  stepped = optax.apply_updates(params, updates)
  gate = spec.method.generator_update_gate(nimg)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(gate, a, b), new, old)
  new = state.generator.replace(params=keep(stepped, params),
                                opt_state=keep(opt_state, state.generator.opt_state))
  return new, loss, metrics, grads


def regularizer_phase(spec: StepSpec, state: state_lib.DistillState, critic: state_lib.TrainedNetwork,
                      teacher_variables: dict, batch: dict, rng: Array,
                      layout: Optional[sharding_lib.Layout] = None):
  """The method's lazy critic regulariser: on iterations k·interval (k ≥ 1) one more critic optimiser step on
  interval × its loss; otherwise nothing (and no computation). Returns (critic, metrics, non-finite count)."""
  place = _Placement(layout)
  regularizer = spec.method.critic_regularizer
  due = (state.step > 0) & (state.step % regularizer.interval == 0)
  nimg = state.nimg(spec.batch_size)
  device_batch = place.device_batch(spec.batch_size, spec.grad_accum)
  real = {k: batch[k] for k in ("labels", "images") if batch.get(k) is not None}

  def grad_fn(params, samples, key):
    inputs = CriticInputs(x_g=None, augment_labels=None, labels=samples.get("labels"),
                          real_images=samples.get("images"), real_augment_labels=None, draws={},
                          critic_buffers=critic.buffers, teacher_variables=place.gather(teacher_variables),
                          dropout_rng=key, nimg=nimg, device_batch=device_batch)

    def gained(params):
      loss, metrics = regularizer.loss(place.gather(params), inputs)
      return loss * regularizer.interval, metrics
    return jax.value_and_grad(gained, has_aux=True)(params)

  def regularize(critic):
    params = spec.critic_train_transform(critic.params)
    _, metrics, grads = accumulate(grad_fn, params, real, rng, spec.grad_accum, place)
    updates, opt_state = spec.critic_tx.update(grads, critic.opt_state, params)
    new = critic.replace(params=optax.apply_updates(params, updates), opt_state=opt_state)
    metrics, new = _write_back_buffers(metrics, new)
    return new, metrics, _count_nonfinite(grads)

  def skip(critic):
    shapes = jax.eval_shape(lambda c: regularize(c)[1], critic)
    return critic, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), jnp.zeros((), jnp.int32)

  critic, metrics, bad = jax.lax.cond(due, regularize, skip, critic)
  return critic, {**metrics, "critic_regularized": due.astype(jnp.float32)}, bad


def step_body(spec: StepSpec, state: state_lib.DistillState, teacher_variables: dict, batch: dict,
              draws: dict, layout: Optional[sharding_lib.Layout] = None):
  """One iteration over the global batch."""
  place = _Placement(layout)
  batch, draws = place.batch(batch), place.batch(draws)
  k_critic, k_gen = jax.random.split(iteration_key(state, 1))
  if spec.method.generator_first:
    generator, g_loss, g_metrics, g_grads = generator_phase(
        spec, state, state.critic, teacher_variables, batch["generator"], draws["generator"], k_gen, layout)
    g_metrics, critic = _write_back_buffers(g_metrics, state.critic)
    critic, c_loss, c_metrics, c_grads = critic_phase(
        spec, state.replace(generator=generator, critic=critic), teacher_variables, batch["critic"],
        draws["critic"], k_critic, layout)
  else:
    critic, c_loss, c_metrics, c_grads = critic_phase(
        spec, state, teacher_variables, batch["critic"], draws["critic"], k_critic, layout)
    generator, g_loss, g_metrics, g_grads = generator_phase(
        spec, state, critic, teacher_variables, batch["generator"], draws["generator"], k_gen, layout)
    g_metrics, critic = _write_back_buffers(g_metrics, critic)
  nimg = state.nimg(spec.batch_size)
  beta = state_lib.ema_beta(nimg, spec.batch_size, spec.ema_halflife_mimg, spec.ema_rampup_ratio)
  ema = state_lib.ema_update(state.generator_ema, generator.params, beta)
  bad_c, bad_g = _count_nonfinite(c_grads), _count_nonfinite(g_grads)
  metrics = {**c_metrics, **g_metrics}
  if spec.method.critic_regularizer is not None:
    critic, r_metrics, bad_r = regularizer_phase(spec, state, critic, teacher_variables, batch["critic"],
                                                 jax.random.fold_in(iteration_key(state, 1), 2), layout)
    metrics.update(r_metrics)
    bad_c = bad_c + bad_r
  metrics.update(critic_grad_norm=_global_norm(c_grads), generator_grad_norm=_global_norm(g_grads),
                 nonfinite_critic=bad_c, nonfinite_generator=bad_g, ema_beta=beta,
                 generator_updated=spec.method.generator_update_gate(nimg).astype(jnp.float32))
  new_state = state.replace(
      step=state.step + 1, generator=generator, generator_ema=ema, critic=critic,
      nonfinite={"critic": state.nonfinite["critic"] + bad_c,
                 "generator": state.nonfinite["generator"] + bad_g})
  return new_state, metrics


def make_mesh(num_devices: Optional[int] = None, fsdp: int = 1) -> Mesh:
  """A ('data', 'fsdp') mesh over the first `num_devices` devices (default: all)."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices is not None:
    devices = devices[:num_devices]
  return sharding_lib.make_mesh(-1, fsdp, devices)


def check_batch(spec: StepSpec, layout: sharding_lib.Layout) -> None:
  shards, rounds = layout.batch_shards, spec.grad_accum
  if rounds < 1:
    raise ValueError(f"config.grad_accum={rounds}: expected a positive number of rounds")
  if spec.batch_size % (shards * rounds):
    raise ValueError(f"batch_size {spec.batch_size} is not divisible by the {shards} devices of the mesh "
                     f"× {rounds} accumulation rounds")


class TrainStep:
  """The jitted step and its layout. Called as `train_step(state, teacher_variables, batch) -> (state,
  metrics)`: the state and the teacher are put where the layout says (a no-op for arrays already there),
  the batch (leading axis = global batch; host rows of this process, or placed) is split over every device.
  The state is donated; the teacher never is. Metrics are replicated."""

  def __init__(self, spec: StepSpec, mesh: Mesh, min_shard_size: int = sharding_lib.MIN_SHARD_SIZE):
    self.layout = sharding_lib.Layout(mesh, min_shard_size)
    check_batch(spec, self.layout)
    layout = self.layout

    def step(state, teacher_variables, batch):
      draws = sample_draws(spec, iteration_key(state, 0))
      new_state, metrics = step_body(spec, state, teacher_variables, batch, draws, layout)
      return layout.constrain(new_state), jax.lax.with_sharding_constraint(metrics, layout.replicated)

    self.jitted = jax.jit(step, donate_argnums=(0,))
    self._compiled = False

  def place(self, state, teacher_variables, batch) -> tuple:
    return (self.layout.place(state), self.layout.place(teacher_variables),
            shard_batch(batch, self.layout.mesh))

  def __call__(self, state, teacher_variables, batch):
    args = self.place(state, teacher_variables, batch)
    if not self._compiled:
      # Compile ahead of the first run (the jit reuses this executable) and hand the compiler's freed
      # memory back before the step takes its own buffers: it would otherwise stay resident all run.
      self.jitted.lower(*args).compile()
      host_memory.release()
      self._compiled = True
    return self.jitted(*args)

  def lower(self, state, teacher_variables, batch):
    return self.jitted.lower(*self.place(state, teacher_variables, batch))


def make_train_step(spec: StepSpec, mesh: Mesh, min_shard_size: int = sharding_lib.MIN_SHARD_SIZE) -> TrainStep:
  """The step of `spec` on `mesh` (see `TrainStep`); leaves under `min_shard_size` elements stay replicated."""
  return TrainStep(spec, mesh, min_shard_size)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a host batch (this process's rows) on the mesh, split over every device; arrays already
  placed that way are left as they are."""
  sharding = NamedSharding(mesh, sharding_lib.Layout(mesh).batch.spec)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree.map(put, batch)
