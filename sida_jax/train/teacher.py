"""Training an EDM teacher from scratch (EDM loss, Adam with LR ramp-up, EMA) — used by the MNIST demo.

Not a distillation method (those share sida_jax/train/step.py); it reuses the data pipeline, the Orbax
checkpoints (exact resume), the networks and the EMA rule. The final EMA network is written as a converted
folder (`<workdir>/network`), which distillation configs name as `teacher`.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sida_jax import checkpoint
from sida_jax.losses import edm as edm_loss_lib
from sida_jax.models import convert
from sida_jax.models.registry import build_network, denoiser_for
from sida_jax.train import loop
from sida_jax.train import preemption
from sida_jax.train import run as run_lib
from sida_jax.train import sharding
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib
from sida_jax.train import tensorboard
from sida_jax.train import workdir as workdir_lib


@flax.struct.dataclass
class TeacherState:
  step: jax.Array
  rng: jax.Array
  params: dict
  buffers: dict
  ema: dict
  opt_state: optax.OptState


def _optimizer(config) -> optax.GradientTransformation:
  t = config.teacher_training
  rampup_steps = max(t.lr_rampup_kimg * 1000 / config.batch_size, 1e-8)
  # EDM: lr·min(nimg / rampup, 1), applied as a scale on the Adam step.
  schedule = lambda count: t.lr * jnp.minimum(count.astype(jnp.float32) / rampup_steps, 1.0)
  return optax.chain(state_lib.nan_to_num_gradients(),
                     state_lib.torch_adam(1.0, t.beta1, config.optim.beta2, config.optim.eps),
                     optax.scale_by_schedule(schedule))


def make_teacher_step(config, denoiser, tx, mesh):
  batch = config.batch_size

  def train_step(state: TeacherState, images, labels):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss_fn = lambda p: edm_loss_lib.edm_loss(denoiser, p, state.buffers, images, labels, rng,
                                              config.loss.p_mean, config.loss.p_std, config.loss.sigma_data)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    nimg = state.step.astype(jnp.float32) * batch
    beta = state_lib.ema_beta(nimg, batch, config.ema.halflife_mimg, config.ema.rampup_ratio or None)
    ema = state_lib.ema_update(state.ema, params, beta)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state), metrics

  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(step_lib.AXIS))
  return jax.jit(train_step, in_shardings=(replicated, sharded, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def train_teacher(config: ml_collections.ConfigDict, workdir: str,
                  stop_after_steps: Optional[int] = None) -> TeacherState:
  """Trains config.network on config.data with the EDM loss for config.total_kimg; resumable (also to a larger
  total_kimg), with the distillation loop's guards: the config checked against the workdir's and the workdir
  locked first, checkpoints by kimg, by wall-clock minutes and on SIGTERM / SIGINT (`preemption.Interrupted`).
  Progress is counted in steps here (the learning-rate ramp-up is), so the batch size cannot change on a
  resume. When training reaches total_kimg the EMA network is written to `<workdir>/network`."""
  loop.maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  workdir_lib.check_resume(workdir, config, fixed=("batch_size",))
  with workdir_lib.lock(workdir, enabled=is_main), preemption.stop_signals() as stop:
    return _train(config, workdir, stop_after_steps, stop)


def _train(config, workdir, stop_after_steps, stop) -> TeacherState:
  kwargs = config.network.kwargs.to_dict()
  module = build_network(config.network.class_name, kwargs, run_lib.compute_dtype(config.dtype))
  denoiser = denoiser_for(module, config.network.class_name, kwargs)
  dataset = run_lib.make_dataset(config.data.to_dict())
  if dataset is None or not dataset.has_images:
    raise ValueError("config.data.source: teacher training needs an image dataset")
  shape = (int(kwargs["img_resolution"]), int(kwargs["img_resolution"]), int(kwargs["img_channels"]))
  if tuple(dataset.image_shape) != shape:
    raise ValueError(f"config.data: images are {tuple(dataset.image_shape)} but config.network expects {shape}")
  mesh = step_lib.make_mesh()
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {mesh.devices.size} devices")
  tx = _optimizer(config)
  variables = convert.init_variables(module, jax.random.key(config.seed))
  params, buffers = state_lib.split_variables(variables)
  state = TeacherState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(config.seed + 1)),
                       params=params, buffers=buffers, ema=jax.tree.map(jnp.array, params),
                       opt_state=tx.init(params))
  state = loop.place_state(state, sharding.Layout(mesh))
  is_main = jax.process_index() == 0
  if is_main:
    workdir_lib.record(workdir, config)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mngr = checkpoint.manager(ckpt_dir, config.max_to_keep)
  if mngr.latest_step() is not None:
    state, meta = loop.restore_newest(mngr, state)
    logging.info("resumed teacher training from %s/%d", ckpt_dir, int(meta["step"]))
  writer = tensorboard.SummaryWriter(workdir, enabled=is_main)
  train_step = make_teacher_step(config, denoiser, tx, mesh)
  batch = config.batch_size
  total = int(math.ceil(config.total_kimg * 1000 / batch))
  start = int(jax.device_get(state.step))
  end = max(start, total if stop_after_steps is None else min(total, start + stop_after_steps))
  if start > total:
    logging.info("teacher already trained for %.3f kimg (config.total_kimg=%g)", start * batch / 1000,
                 config.total_kimg)
  it = dataset.iterate(batch, config.seed, position=start, process_index=jax.process_index(),
                       process_count=jax.process_count())
  label_dim = denoiser.label_dim
  t0, last = time.time(), start
  t_saved = time.monotonic()
  stopped = preemption.agree(stop, False)[0]
  bar = loop.progress_bar(config.total_kimg, start * batch / 1000, "teacher")
  try:
    for step in (range(start, end) if not stopped else ()):
      host = next(it)
      labels = host["labels"] if label_dim else np.zeros((host["images"].shape[0], 0), np.float32)
      images, labels = step_lib.shard_batch((host["images"], labels), mesh)
      state, metrics = train_step(state, images, labels if label_dim else None)
      done = step + 1
      bar.update(batch / 1000)
      due = 0 < config.checkpoint_every_minutes * 60 <= time.monotonic() - t_saved
      stopped, timed = preemption.agree(stop, due)
      if loop.crosses_kimg(config.log_every_kimg, step, batch) or done == end or stopped:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        rate = (done - last) * batch / 1000 / max(time.time() - t0, 1e-9)
        writer.write_scalars(done, {**m, "kimg": done * batch / 1000, "kimg_per_s": rate})
        logging.info("teacher kimg %.1f / %.1f  loss %.4g  %.3f kimg/s  ETA %s", done * batch / 1000,
                     config.total_kimg, m["loss"], rate,
                     loop.format_eta(max(total - done, 0) * batch / 1000 / max(rate, 1e-9)))
        t0, last = time.time(), done
      if loop.crosses_kimg(config.checkpoint_every_kimg, step, batch) or done == end or timed or stopped:
        checkpoint.save(mngr, done, state, {"step": done, "kimg": done * batch / 1000, "batch_size": batch,
                                            "data_position": done})
        t_saved = time.monotonic()
      if stopped:
        break
  finally:
    bar.close()
    mngr.wait_until_finished()
    writer.flush()
  done = int(jax.device_get(state.step))
  if stopped and done < end:
    where = f"checkpoint {ckpt_dir}/{done} saved" if done > start else "nothing new to save"
    raise preemption.Interrupted(stop.signum, f"stopped by {stop.name} at {done * batch / 1000:.3f} kimg "
                                 f"(step {done}): {where}; run the same command to continue")
  network_dir = os.path.join(workdir, "network")
  if done >= total and is_main and (done > start or not os.path.isdir(network_dir)):
    checkpoint.save_network(network_dir, config.network.class_name, kwargs,
                            jax.device_get({"params": state.ema, **state.buffers}))
  return state
