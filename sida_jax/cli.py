"""The modes of main.py: train | sample | eval | convert | ref. This is the only I/O-heavy layer."""
from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image

from sida_jax import checkpoint, evaluation, sampling
from sida_jax.models import build_network, convert, denoiser_for, load_network
from sida_jax.train import loop

MODES = ("train", "sample", "eval", "convert", "ref")


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r} is not one of {', '.join(MODES)}")
  if not workdir:
    raise ValueError("--workdir is required")
  {"train": train, "sample": sample, "eval": evaluate, "convert": convert_network, "ref": reference}[mode](
      config, workdir)


def train(config, workdir):
  evaluate_fn = None
  if config.eval_every_kimg > 0:
    detector = evaluation.make_detector(config.eval.detector, config.eval.detector_path)
    reference_cache = {}

    def evaluate_fn(run, ema_variables):
      res = run.image_shape[0]
      if res not in reference_cache:
        reference_cache[res] = evaluation.reference_statistics(detector, config.eval.ref_stats, res)
      generate = loop._generate_fn(run)  # pylint: disable=protected-access
      return evaluation.evaluate(lambda z, y: generate(ema_variables, z, y), run.image_shape,
                                 run.nets.generator.label_dim, detector, reference_cache[res],
                                 config.eval.num_images, config.eval.batch_size, config.eval.seed_offset,
                                 config.eval.inception_score)
  loop.train_and_evaluate(config, workdir, evaluate_fn=evaluate_fn)


def _generator(config, workdir):
  """(generate(z, labels) -> images, image_shape, label_dim, description) of the configured source."""
  source = config.sample.source or workdir
  dtype = loop.compute_dtype(config)
  if config.sample.teacher_steps > 0:
    net = loop.load_teacher(config)
    denoiser = denoiser_for(net.module, net.class_name, net.init_kwargs)
    steps = config.sample.teacher_steps
    fn = jax.jit(lambda z, y: sampling.heun_sample(denoiser, net.variables, z, y, num_steps=steps))
    what = f"teacher, Heun {steps} steps (NFE {2 * steps - 1})"
  else:
    net = load_network(source, dtype=dtype)
    denoiser = denoiser_for(net.module, net.class_name, net.init_kwargs)
    init_sigma = config.init_sigma
    recorded = os.path.join(source, checkpoint.NETWORK_JSON)
    if os.path.isfile(recorded):   # a workdir records the level its generator was trained at (GDD: 80)
      init_sigma = checkpoint.read_json(recorded).get("init_sigma", init_sigma)
    fn = jax.jit(lambda z, y: sampling.generate(denoiser, net.variables, z, y, init_sigma))
    what = f"one-step generator from {source}"
  res, ch = int(net.init_kwargs["img_resolution"]), int(net.init_kwargs["img_channels"])
  return fn, (res, res, ch), denoiser.label_dim, what


def sample(config, workdir):
  """PNGs under workdir/samples and samples.npz (uint8 images, seeds, labels) for config.sample.seeds."""
  generate, image_shape, label_dim, what = _generator(config, workdir)
  seeds = sampling.parse_seeds(config.sample.seeds)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  images = np.concatenate(list(evaluation.generated_batches(generate, seeds, image_shape, label_dim,
                                                            config.sample.batch_size)))
  _, labels = sampling.seed_noise(seeds, image_shape, label_dim)
  if config.sample.write_png:
    for seed, img in zip(seeds, images):
      PIL.Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
          os.path.join(out_dir, f"{seed:06d}.png"))
  tmp = os.path.join(out_dir, "samples.tmp.npz")
  np.savez(tmp, images=images, seeds=np.asarray(seeds), **({"labels": labels} if labels is not None else {}))
  os.replace(tmp, os.path.join(out_dir, "samples.npz"))
  grid = loop.image_grid(images[:64])
  PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(os.path.join(out_dir, "grid.png"))
  logging.info("wrote %d images (%s) to %s", len(seeds), what, out_dir)


def evaluate(config, workdir):
  generate, image_shape, label_dim, what = _generator(config, workdir)
  detector = evaluation.make_detector(config.eval.detector, config.eval.detector_path)
  reference = evaluation.reference_statistics(detector, config.eval.ref_stats, image_shape[0])
  results = evaluation.evaluate(generate, image_shape, label_dim, detector, reference, config.eval.num_images,
                                config.eval.batch_size, config.eval.seed_offset, config.eval.inception_score)
  results = {k: float(v) for k, v in results.items()}
  results.update(source=what, detector=config.eval.detector, num_images=config.eval.num_images)
  checkpoint.write_json(os.path.join(workdir, "eval.json"), results)
  logging.info("evaluation of %s: %s", what, results)


def convert_network(config, workdir):
  """`.pkl` → Orbax + network.json (a teacher or generator init for training configs); and/or a
  PyTorch-named safetensors file from a .pkl, converted folder or workdir."""
  source = config.convert.source
  if not source:
    raise ValueError("config.convert.source: give the .pkl (or converted folder / workdir) to convert")
  net = load_network(source, key=config.teacher_key)
  if source.endswith(".pkl") or not config.convert.safetensors:
    checkpoint.save_network(workdir, net.class_name, net.init_kwargs, jax.device_get(net.variables))
    logging.info("converted %s (%s, %d parameters) to %s", source, net.class_name,
                 convert.count_params(net.variables), workdir)
  if config.convert.safetensors:
    convert.export_safetensors(net.module, jax.device_get(net.variables), config.convert.safetensors,
                               metadata={"class_name": net.class_name})
    logging.info("wrote PyTorch state_dict names to %s", config.convert.safetensors)


def reference(config, workdir):
  """Reference statistics (mu, sigma) of the configured dataset under the configured detector."""
  dataset = loop._dataset(config)  # pylint: disable=protected-access
  if dataset is None or not dataset.has_images:
    raise ValueError("config.data.source: `--mode ref` needs an image dataset")
  detector = evaluation.make_detector(config.eval.detector, config.eval.detector_path)
  n = dataset.num_images if config.eval.num_images <= 0 else min(config.eval.num_images, dataset.num_images)
  bs = config.eval.batch_size

  def batches():
    for i in range(0, n, bs):
      images = dataset.images(np.arange(i, min(i + bs, n)))
      yield sampling.to_uint8(images)

  mu, sigma, _, _ = detector.statistics(batches())
  from sida_jax.metrics import fid  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "ref_stats.npz")
  fid.save_reference_stats(path, mu, sigma)
  logging.info("reference statistics of %d images written to %s", n, path)
