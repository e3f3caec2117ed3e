"""train_and_evaluate: the loop over the shared step, with logging, checkpoints and periodic evaluation.

The run it executes (teacher, networks, method, data, step specification) is assembled by `run.py`. Progress
is counted in images (a resume with another batch size continues from the same kimg); checkpoints are written
every `checkpoint_every_kimg`, every `checkpoint_every_minutes` of wall-clock time, at the end, and on SIGTERM /
SIGINT (`preemption.py`); the workdir is locked and a resumed config is checked first (`workdir.py`).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sida_jax import checkpoint, data as data_lib, host_memory, sampling
from sida_jax.train import preemption
from sida_jax.train import run as run_lib
from sida_jax.train import sharding
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib
from sida_jax.train import tensorboard
from sida_jax.train import workdir as workdir_lib

EVAL_HISTORY = "eval_history.jsonl"   # one JSON line per periodic evaluation


class Batches:
  """Two host batches per iteration (critic phase, generator phase), a pure function of the step; one batch
  for both phases when the method shares it (GDD)."""

  def __init__(self, run: run_lib.Run):
    self.run = run
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.local = run.batch_size // self.process_count

  def _uniform_labels(self, step: int, phase: int) -> dict:
    label_dim = self.run.nets.generator.label_dim
    if not label_dim:
      return {}
    rng = np.random.default_rng([self.run.seed, step, phase])
    labels = rng.integers(0, label_dim, size=self.run.batch_size)
    rows = labels[self.process_index * self.local:(self.process_index + 1) * self.local]
    return {"labels": np.eye(label_dim, dtype=np.float32)[rows]}

  def iterate(self, start_step: int, step_base: int = 0, nimg_base: int = 0) -> Iterator[dict]:
    """Batches from iteration `start_step` on. After a batch-size change at iteration `step_base` (`nimg_base`
    images earlier), the sample stream continues where the old
    batch size left it (`batches_per_step` batches per iteration)."""
    if self.run.text is not None:   # text-to-image: prompt token ids (embedded on the devices)
      yield from self.run.text.host_batches(self.run.batch_size, self.run.seed, start_step, self.process_index,
                                            self.process_count)
      return
    dataset = self.run.dataset
    if dataset is None:
      step = start_step
      while True:
        yield {"critic": self._uniform_labels(step, 0), "generator": self._uniform_labels(step, 1)}
        step += 1
    keep_images = self.run.method.uses_real_images
    per_step = batches_per_step(self.run)
    if keep_images:
      it = dataset.iterate(self.run.batch_size, self.run.seed, position=per_step * (start_step - step_base),
                           process_index=self.process_index, process_count=self.process_count,
                           offset=per_step * nimg_base)
    else:   # same order as the loader, no image decoding
      it = self._loader_labels(dataset, per_step * (start_step - step_base), per_step * nimg_base)
    label_dim = self.run.nets.generator.label_dim
    latents = dataset.name == "edm2_latents"

    def clean(batch, step, phase):
      out = {}
      if keep_images and "images" in batch:
        images = batch["images"]
        if latents:
          # EDM2 stores VAE moments; each use draws a fresh latent mean + std·ε (seeded by step/phase
          # and this process's rows, so resumes are exact).
          rng = np.random.default_rng([self.run.seed, step, phase, self.process_index, 7])
          noise = rng.standard_normal((*images.shape[:-1], images.shape[-1] // 2)).astype(np.float32)
          images = data_lib.edm2_final_latents(images, noise)
        out["images"] = images
      if label_dim and batch["labels"].shape[1] == label_dim:
        out["labels"] = batch["labels"]
      return out

    step = start_step
    while True:
      critic = clean(next(it), step, 0)
      yield {"critic": critic, "generator": critic if per_step == 1 else clean(next(it), step, 1)}
      step += 1

  def _loader_labels(self, dataset, position: int, offset: int) -> Iterator[dict]:
    """The loader's labels in the loader's order (data-free SiD uses only these)."""
    while True:
      items = dataset.batch_items(position, self.run.batch_size, self.run.seed,
                                  self.process_index, self.process_count, offset)
      yield {"labels": dataset.labels(items)}
      position += 1


def batches_per_step(run: run_lib.Run) -> int:
  """Data batches one iteration reads: 1 when the method's phases share it, else 2."""
  return 1 if run.method.shared_batch else 2


def sample_grid(run: run_lib.Run, ema_variables: dict, seeds=range(64)) -> np.ndarray:
  """uint8 grid of EMA generator samples for fixed seeds (the same images at every checkpoint); text-to-image
  runs show the first 16 seeds, image i conditioned on training prompt i and decoded by the VAE 8 at a time."""
  if run.text is not None:
    from sida_jax import text_to_image  # pylint: disable=import-outside-toplevel
    seeds = list(seeds)[:16]
    generate = lambda z, y: run.generate(ema_variables, z, y)
    return image_grid(np.concatenate(list(text_to_image.generated_images(
        generate, run.text, run.image_shape, seeds, run.text.prompts.prompts[:len(seeds)], 8, run.sample_rng))))
  z, labels = sampling.seed_noise(list(seeds), run.image_shape, run.nets.generator.label_dim,
                                  run.sample_rng)
  images = run.generate(ema_variables, jnp.asarray(z), None if labels is None else jnp.asarray(labels))
  return image_grid(sampling.to_uint8(images))


def image_grid(images: np.ndarray) -> np.ndarray:
  n, h, w, c = images.shape
  cols = int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, cols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
  return grid


def crosses(kimg_every: float, nimg_before: int, nimg_after: int) -> bool:
  """True when the image count passes a multiple of `kimg_every` thousand images in (before, after]."""
  if kimg_every <= 0:
    return False
  every = kimg_every * 1000
  return math.floor(nimg_after / every) > math.floor(nimg_before / every)


def crosses_kimg(kimg_every: float, step: int, batch: int) -> bool:
  """True on the step that crosses a multiple of `kimg_every` thousand images (a constant batch size)."""
  return crosses(kimg_every, step * batch, (step + 1) * batch)


def progress_bar(total_kimg: float, start_kimg: float, desc: str):
  """A tqdm bar counting kimg (main process only; hidden when stderr is not a terminal or in tests)."""
  import sys  # pylint: disable=import-outside-toplevel
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=round(total_kimg, 3), initial=round(start_kimg, 3), desc=desc, unit="kimg",
                   disable=jax.process_index() != 0 or not sys.stderr.isatty(), dynamic_ncols=True,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]")


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when a multi-process environment is configured."""
  if workdir_lib.multi_process_environment() and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def place_state(state, layout: sharding.Layout):
  """The train state laid out on the layout's mesh (split along 'fsdp' by its rules, else replicated).
  Checkpoints are restored into the shardings this gives, whatever device count they were written on."""
  return layout.place(state)


def restore_newest(mngr, target) -> tuple:
  """(state, meta) of the newest readable checkpoint, laid out like `target`; the unreadable newer ones are set
  aside (by process 0, the others wait and re-list), so that training from there can write those steps again."""
  state, meta = checkpoint.restore(mngr, target)
  if jax.process_index() == 0:
    checkpoint.set_aside_newer(mngr, int(meta["step"]))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("unreadable checkpoints set aside")
    mngr.reload()
  return state, meta


def continue_with_batch(state: state_lib.DistillState, saved_batch: int, batch: int) -> state_lib.DistillState:
  """A restored state trained with `saved_batch` images per iteration, continued with `batch`: the image count
  carries over (SiDA's gates, the EMA ramp-up and the data position follow it), the iteration count too."""
  if saved_batch == batch:
    return state
  step = int(jax.device_get(state.step))
  nimg = int(jax.device_get(state.nimg_base)) + (step - int(jax.device_get(state.step_base))) * saved_batch
  if nimg >= 2 ** 31:
    raise ValueError(f"config.batch_size: cannot continue a run at {nimg} images with another batch size")
  return state.replace(step_base=jnp.asarray(step, jnp.int32), nimg_base=jnp.asarray(nimg, jnp.int32))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_fn=None, stop_after_steps: Optional[int] = None) -> state_lib.DistillState:
  """Trains until config.total_kimg, resuming from the workdir's newest readable checkpoint if there is one.

  `evaluate_fn(run, ema_variables) -> dict` (optional) computes metrics, logged and appended to
  workdir/eval_history.jsonl; the lower `fid` is tracked and the best EMA generator is kept under
  workdir/best. `stop_after_steps` ends early (tests, benchmarks).

  Before anything is loaded or written the config is checked against the workdir's (`workdir.check_resume`)
  and the workdir is locked. SIGTERM / SIGINT save the step in progress and raise `preemption.Interrupted`.
  """
  maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  workdir_lib.check_resume(workdir, config)
  with workdir_lib.lock(workdir, enabled=is_main), preemption.stop_signals() as stop:
    run = run_lib.build_run(config)
    network = {"class_name": run.generator_class, "init_kwargs": run.generator_kwargs,
               "init_sigma": run.spec.init_sigma}
    workdir_lib.check_network(workdir, network)
    if is_main:
      workdir_lib.record(workdir, config, network)
    return _train(config, workdir, run, evaluate_fn, stop_after_steps, stop)


def _train(config, workdir, run, evaluate_fn, stop_after_steps, stop) -> state_lib.DistillState:
  is_main = jax.process_index() == 0
  logging.info("%s on %d %s device(s), %d process(es); workdir %s", config.method, jax.device_count(),
               jax.devices()[0].platform, jax.process_count(), workdir)
  writer = tensorboard.SummaryWriter(workdir, enabled=is_main)
  layout = run.layout()
  mesh = layout.mesh
  train_step = step_lib.make_train_step(run.spec, mesh, layout.min_shard_size)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  mngr = checkpoint.manager(ckpt_dir, config.max_to_keep)
  state = run_lib.initial_state(run, layout)   # built in place on the mesh
  batch = run.batch_size
  best = {"fid": float("inf")}
  evaluation_due = False   # an evaluation skipped by a stop signal, made up on the resume
  if mngr.latest_step() is not None:
    state, meta = restore_newest(mngr, state)
    state = place_state(continue_with_batch(state, int(meta.get("batch_size", batch)), batch), layout)
    best["fid"] = meta.get("best_fid") or float("inf")
    evaluation_due = bool(meta.get("evaluation_due"))
    logging.info("resumed from %s/%d (%.3f kimg)", ckpt_dir, int(meta["step"]),
                 float(jax.device_get(state.nimg(batch))) / 1000)
  teacher_variables = place_state(run.frozen_variables, layout)   # the teacher, or the method's
  host_memory.release()   # the initialisation's and the restore's temporaries
  step_base, nimg_base = int(state.step_base), int(state.nimg_base)
  images = lambda step: nimg_base + (step - step_base) * batch   # images seen after `step` iterations
  total_steps = step_base + int(math.ceil((config.total_kimg * 1000 - nimg_base) / batch))
  start = int(jax.device_get(state.step))
  end = max(start, total_steps if stop_after_steps is None else min(total_steps, start + stop_after_steps))
  batches = Batches(run).iterate(start, step_base, nimg_base)
  best_mngr = checkpoint.manager(os.path.join(workdir, "best"), 1) if evaluate_fn else None

  def evaluate(done: int) -> None:
    ema_vars = {"params": state.generator_ema, **state.generator.buffers}
    results = {k: float(v) for k, v in evaluate_fn(run, ema_vars).items()}
    writer.write_scalars(done, results)
    if is_main:
      with open(os.path.join(workdir, EVAL_HISTORY), "a") as f:
        f.write(json.dumps({"kimg": images(done) / 1000, "step": done, **results}) + "\n")
    logging.info("evaluation at kimg %.2f: %s", images(done) / 1000, results)
    if results.get("fid", float("inf")) < best["fid"]:
      best["fid"] = float(results["fid"])
      checkpoint.save(best_mngr, done, {"generator_ema": state.generator_ema, "buffers": state.generator.buffers},
                      {"step": done, "kimg": images(done) / 1000, **results})

  def save(done: int) -> None:
    meta = {"step": done, "kimg": images(done) / 1000, "nimg": images(done), "batch_size": batch,
            "data_position": batches_per_step(run) * images(done), "evaluation_due": evaluation_due,
            "best_fid": best["fid"] if math.isfinite(best["fid"]) else None}
    checkpoint.save(mngr, done, state, meta)

  if evaluation_due and evaluate_fn is not None and not stop.requested:
    evaluate(start)
    evaluation_due = False
  t_last, step_last = time.time(), start
  t_start, t_saved = time.time(), time.monotonic()
  stopped = preemption.agree(stop, False)[0]
  bar = progress_bar(config.total_kimg, images(start) / 1000, config.method)
  try:
    for step in (range(start, end) if not stopped else ()):
      state, metrics = train_step(state, teacher_variables,
                                  run.device_batch(step_lib.shard_batch(next(batches), mesh)))
      done, before, after = step + 1, images(step), images(step + 1)
      bar.update(batch / 1000)
      due = 0 < config.checkpoint_every_minutes * 60 <= time.monotonic() - t_saved
      stopped, timed = preemption.agree(stop, due)
      if crosses(config.log_every_kimg, before, after) or done == end or stopped:
        metrics = jax.device_get(metrics)
        now = time.time()
        kimg_per_s = (done - step_last) * batch / 1000 / max(now - t_last, 1e-9)
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars.update(kimg=after / 1000, kimg_per_s=kimg_per_s)
        writer.write_scalars(done, scalars)
        eta = max(total_steps - done, 0) * batch / 1000 / max(kimg_per_s, 1e-9)
        logging.info("kimg %.2f / %.2f  critic %.4g  generator %.4g  %.3f kimg/s  ETA %s", after / 1000,
                     config.total_kimg, scalars.get("loss_critic", float("nan")),
                     scalars.get("loss_generator", float("nan")), kimg_per_s, format_eta(eta))
        t_last, step_last = now, done
      if crosses(config.grid_every_kimg, before, after) or done == end:
        ema_vars = {"params": state.generator_ema, **state.generator.buffers}
        writer.write_images(done, {"samples": sample_grid(run, ema_vars)[None]})
      if evaluate_fn is not None and (crosses(config.eval_every_kimg, before, after) or done == end):
        if stopped:
          evaluation_due = True   # exit now; the resumed run evaluates this step first
        else:
          evaluate(done)
      if crosses(config.checkpoint_every_kimg, before, after) or done == end or timed or stopped:
        save(done)
        t_saved = time.monotonic()
      if stopped:
        break
  finally:
    bar.close()
    mngr.wait_until_finished()
    if best_mngr is not None:
      best_mngr.wait_until_finished()
    writer.flush()
  done = int(jax.device_get(state.step))
  if stopped and done < end:
    where = (f"checkpoint {ckpt_dir}/{done} saved" if done > start else
             f"no step since {ckpt_dir}/{done}" if start else "before the first step, nothing saved")
    raise preemption.Interrupted(stop.signum, f"stopped by {stop.name} at {images(done) / 1000:.3f} kimg "
                                 f"(step {done}): {where}; run the same command to continue")
  logging.info("trained %d steps in %.1f s", done - start, time.time() - t_start)
  return state


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"
