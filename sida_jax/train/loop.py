"""train_and_evaluate: the loop over the shared step, with logging, checkpoints and periodic evaluation.

The run it executes (teacher, networks, method, data, step specification) is assembled by `run.py`.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator, Optional

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sida_jax import checkpoint, data as data_lib, sampling
from sida_jax.train import run as run_lib
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

EVAL_HISTORY = "eval_history.jsonl"   # one JSON line per periodic evaluation


class Batches:
  """Two host batches per iteration (critic phase, generator phase), a pure function of the step."""

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

  def iterate(self, start_step: int) -> Iterator[dict]:
    dataset = self.run.dataset
    if dataset is None:
      step = start_step
      while True:
        yield {"critic": self._uniform_labels(step, 0), "generator": self._uniform_labels(step, 1)}
        step += 1
    keep_images = self.run.method.uses_real_images
    if keep_images:
      it = dataset.iterate(self.run.batch_size, self.run.seed, position=2 * start_step,
                           process_index=self.process_index, process_count=self.process_count)
    else:
      it = self._loader_labels(dataset, 2 * start_step)   # same order as the loader, no image decoding
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
      yield {"critic": clean(next(it), step, 0), "generator": clean(next(it), step, 1)}
      step += 1

  def _loader_labels(self, dataset, position: int) -> Iterator[dict]:
    """The loader's labels in the loader's order (data-free SiD uses only these)."""
    while True:
      items = dataset.batch_items(position, self.run.batch_size, self.run.seed,
                                  self.process_index, self.process_count)
      yield {"labels": dataset.labels(items)}
      position += 1


def sample_grid(run: run_lib.Run, ema_variables: dict, seeds=range(64)) -> np.ndarray:
  """uint8 grid of EMA generator samples for fixed seeds (the same images at every checkpoint)."""
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


def crosses_kimg(kimg_every: float, step: int, batch: int) -> bool:
  """True on the step that crosses a multiple of `kimg_every` thousand images."""
  if kimg_every <= 0:
    return False
  every = kimg_every * 1000
  return math.floor((step + 1) * batch / every) > math.floor(step * batch / every)


def progress_bar(total_kimg: float, start_kimg: float, desc: str):
  """A tqdm bar counting kimg (main process only; hidden when stderr is not a terminal or in tests)."""
  import sys  # pylint: disable=import-outside-toplevel
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=round(total_kimg, 3), initial=round(start_kimg, 3), desc=desc, unit="kimg",
                   disable=jax.process_index() != 0 or not sys.stderr.isatty(), dynamic_ncols=True,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]")


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when a multi-process environment is configured."""
  env = os.environ
  multi = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
           or "," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if multi and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluate_fn=None, stop_after_steps: Optional[int] = None) -> state_lib.DistillState:
  """Trains until config.total_kimg, resuming from the workdir's latest checkpoint if there is one.

  `evaluate_fn(run, ema_variables) -> dict` (optional) computes metrics, logged and appended to
  workdir/eval_history.jsonl; the lower `fid` is tracked and the best EMA generator is kept under
  workdir/best. `stop_after_steps` ends early (tests, benchmarks).
  """
  maybe_initialize_distributed()
  run = run_lib.build_run(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    checkpoint.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    checkpoint.write_json(os.path.join(workdir, checkpoint.NETWORK_JSON),
                          {"class_name": run.class_name, "init_kwargs": run.train_kwargs,
                           "init_sigma": run.spec.init_sigma})
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  layout = run.layout()
  mesh = layout.mesh
  train_step = step_lib.make_train_step(run.spec, mesh, layout.min_shard_size)
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), config.max_to_keep)
  state = run_lib.initial_state(run, layout)
  best = {"fid": float("inf")}
  if mngr.latest_step() is not None:
    state, meta = checkpoint.restore(mngr, state)
    best["fid"] = meta.get("best_fid") or float("inf")
    logging.info("resumed from step %d (%.1f kimg)", int(state.step), meta.get("kimg", 0.0))
  teacher_variables = layout.place(run.teacher.variables)
  batch = run.batch_size
  total_steps = int(math.ceil(config.total_kimg * 1000 / batch))
  start = int(jax.device_get(state.step))
  end = total_steps if stop_after_steps is None else min(total_steps, start + stop_after_steps)
  batches = Batches(run).iterate(start)
  best_mngr = checkpoint.manager(os.path.join(workdir, "best"), 1) if evaluate_fn else None

  def save(step_done: int):
    meta = {"step": step_done, "kimg": step_done * batch / 1000, "data_position": 2 * step_done,
            "best_fid": best["fid"] if math.isfinite(best["fid"]) else None}
    checkpoint.save(mngr, step_done, state, meta)

  t_last, step_last = time.time(), start
  t_start = time.time()
  bar = progress_bar(total_steps * batch / 1000, start * batch / 1000, config.method)
  for step in range(start, end):
    state, metrics = train_step(state, teacher_variables, step_lib.shard_batch(next(batches), mesh))
    done = step + 1
    bar.update(batch / 1000)
    if crosses_kimg(config.log_every_kimg, step, batch) or done == end:
      metrics = jax.device_get(metrics)
      now = time.time()
      kimg_per_s = (done - step_last) * batch / 1000 / max(now - t_last, 1e-9)
      scalars = {k: float(v) for k, v in metrics.items()}
      scalars.update(kimg=done * batch / 1000, kimg_per_s=kimg_per_s)
      writer.write_scalars(done, scalars)
      eta = (total_steps - done) * batch / 1000 / max(kimg_per_s, 1e-9)
      logging.info("kimg %.2f / %.2f  critic %.4g  generator %.4g  %.3f kimg/s  ETA %s",
                   done * batch / 1000, config.total_kimg, scalars.get("loss_critic", float("nan")),
                   scalars.get("loss_generator", float("nan")), kimg_per_s, format_eta(eta))
      t_last, step_last = now, done
    if crosses_kimg(config.grid_every_kimg, step, batch) or done == end:
      ema_vars = {"params": state.generator_ema, **state.generator.buffers}
      writer.write_images(done, {"samples": sample_grid(run, ema_vars)[None]})
    if evaluate_fn is not None and (crosses_kimg(config.eval_every_kimg, step, batch) or done == end):
      ema_vars = {"params": state.generator_ema, **state.generator.buffers}
      results = {k: float(v) for k, v in evaluate_fn(run, ema_vars).items()}
      writer.write_scalars(done, results)
      if is_main:
        with open(os.path.join(workdir, EVAL_HISTORY), "a") as f:
          f.write(json.dumps({"kimg": done * batch / 1000, "step": done, **results}) + "\n")
      logging.info("evaluation at kimg %.2f: %s", done * batch / 1000, results)
      if results.get("fid", float("inf")) < best["fid"]:
        best["fid"] = float(results["fid"])
        checkpoint.save(best_mngr, done, {"generator_ema": state.generator_ema,
                                          "buffers": state.generator.buffers},
                        {"step": done, "kimg": done * batch / 1000, **{k: float(v) for k, v in results.items()}})
    if crosses_kimg(config.checkpoint_every_kimg, step, batch) or done == end:
      save(done)
  bar.close()
  mngr.wait_until_finished()
  if best_mngr is not None:
    best_mngr.wait_until_finished()
  writer.flush()
  logging.info("trained %d steps in %.1f s", end - start, time.time() - t_start)
  return state


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"
