"""The modes of main.py (`sida_jax/command.py` parses the command line and runs them through `run`): train |
teacher | pipeline | sample | eval | convert | ref | plan. This is the only I/O-heavy layer."""
from __future__ import annotations

import os

from absl import logging
import jax
import ml_collections
import numpy as np
import PIL.Image

from sida_jax import checkpoint, compile_cache, evaluation, plan as plan_lib, sampling
from sida_jax.formats import safetensors
from sida_jax.losses import method as method_lib
from sida_jax.models import convert
from sida_jax.models.registry import denoiser_for
from sida_jax.train import loop
from sida_jax.train import run as run_lib


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r} is not one of {', '.join(MODES)}")
  if not workdir:
    raise ValueError("--workdir is required")
  # Before anything compiles: a resumed run loads its step from the cache instead of compiling it again.
  compile_cache.enable(config.get("compile_cache", ""))
  MODES[mode](config, workdir)


def _periodic_evaluator(config):
  """evaluate_fn(run, ema_variables) -> results for train_and_evaluate, or None: periodic evaluation off, or
  impossible without the detector's files (one warning; a distillation never fails for lack of them). The
  detector and reference statistics load at the first evaluation; a named file that is missing fails now.
  Text-to-image runs evaluate on config.eval.prompts."""
  if config.eval_every_kimg <= 0:
    return None
  e = config.eval
  if e.detector == "inception" and not (e.detector_path and e.ref_stats):
    logging.warning("periodic evaluation (eval_every_kimg=%g) is off: the Inception FID needs the detector "
                    "weights --config.eval.detector_path=pt_inception-2015-12-05-6726825d.pth and reference "
                    "statistics --config.eval.ref_stats=FILE.npz", config.eval_every_kimg)
    return None
  for key in ("detector_path", "ref_stats"):
    if e[key] and not os.path.exists(e[key]):
      raise FileNotFoundError(f"config.eval.{key}: file not found: {e[key]}")
  if e.prompts:
    return _text_to_image_evaluator(config)
  _refuse_text_to_image(config.teacher, "config.eval.prompts")
  loaded = {}

  def evaluate_fn(run, ema_variables):
    res = run.image_shape[0]
    if "detector" not in loaded:
      loaded["detector"] = evaluation.make_detector(e.detector, e.detector_path)
    detector = loaded["detector"]
    if res not in loaded:
      loaded[res] = evaluation.reference_statistics(detector, e.ref_stats, res)
    generate = run.generate
    return evaluation.evaluate(lambda z, y: generate(ema_variables, z, y), run.image_shape,
                               run.nets.generator.label_dim, detector, loaded[res], e.num_images, e.batch_size,
                               e.seed_offset, e.inception_score, rng=config.sample.rng)
  return evaluate_fn


def train(config, workdir):
  method_lib.check_recipe_method(config)   # before any file is read
  loop.train_and_evaluate(config, workdir, evaluate_fn=_periodic_evaluator(config))


def train_teacher(config, workdir):
  from sida_jax.train import teacher  # pylint: disable=import-outside-toplevel
  teacher.train_teacher(config, workdir)


def _generator(config, workdir):
  """(generate(z, labels) -> images, image_shape, label_dim, description) of the configured source."""
  source = config.sample.source or workdir
  dtype = run_lib.compute_dtype(config.dtype)
  _refuse_text_to_image(config.teacher if config.sample.teacher_steps > 0 else source,
                        "config.sample.prompts (sampling) or config.eval.prompts (evaluation)")
  if config.sample.teacher_steps > 0:
    net = run_lib.load_teacher(config.teacher, config.teacher_key, config.network.class_name,
                               config.network.kwargs.to_dict(), config.seed, dtype)
    denoiser = denoiser_for(net.module, net.class_name, net.init_kwargs)
    steps = config.sample.teacher_steps
    # EDM's sampler keeps the schedule inside the network's own σ range (VE: σ_min = 0.02).
    sigma_min = max(0.002, float(getattr(net.module, "sigma_min", 0.0)))
    sigma_max = min(80.0, float(getattr(net.module, "sigma_max", float("inf"))))
    fn = sampling.with_weights(lambda v, z, y: sampling.heun_sample(
        denoiser, v, z, y, num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max), net.variables)
    what = f"teacher, Heun {steps} steps (NFE {2 * steps - 1})"
  else:
    net = checkpoint.load_network(source, dtype=dtype)
    denoiser = denoiser_for(net.module, net.class_name, net.init_kwargs)
    init_sigma = config.init_sigma
    recorded = os.path.join(source, checkpoint.NETWORK_JSON)
    if os.path.isfile(recorded):   # a workdir records the level its generator was trained at (GDD: 80)
      init_sigma = checkpoint.read_json(recorded).get("init_sigma", init_sigma)
    fn = sampling.with_weights(lambda v, z, y: sampling.generate(denoiser, v, z, y, init_sigma), net.variables)
    what = f"one-step generator from {source}"
  res, ch = int(net.init_kwargs["img_resolution"]), int(net.init_kwargs["img_channels"])
  return fn, (res, res, ch), denoiser.label_dim, what


def sample(config, workdir):
  """PNGs under workdir/samples and samples.npz (uint8 images, seeds, labels) for config.sample.seeds; with
  config.sample.prompts (text-to-image) image i gets prompt i mod their number (stored as `prompts`)."""
  seeds = sampling.parse_seeds(config.sample.seeds)
  if config.sample.prompts:
    images, prompts, what = _text_to_image_samples(config, workdir, seeds)
    extra = {"prompts": prompts}
  else:
    generate, image_shape, label_dim, what = _generator(config, workdir)
    images = np.concatenate(list(evaluation.generated_batches(generate, seeds, image_shape, label_dim,
                                                              config.sample.batch_size, config.sample.rng)))
    _, labels = sampling.seed_noise(seeds, image_shape, label_dim, config.sample.rng)
    extra = {"labels": labels} if labels is not None else {}
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  if config.sample.write_png:
    for seed, img in zip(seeds, images):
      PIL.Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
          os.path.join(out_dir, f"{seed:06d}.png"))
  tmp = os.path.join(out_dir, "samples.tmp.npz")
  np.savez(tmp, images=images, seeds=np.asarray(seeds), **extra)
  os.replace(tmp, os.path.join(out_dir, "samples.npz"))
  grid = loop.image_grid(images[:64])
  PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(os.path.join(out_dir, "grid.png"))
  logging.info("wrote %d images (%s) to %s", len(seeds), what, out_dir)


def evaluate(config, workdir):
  if config.eval.prompts:
    return _evaluate_text_to_image(config, workdir)
  generate, image_shape, label_dim, what = _generator(config, workdir)
  detector = evaluation.make_detector(config.eval.detector, config.eval.detector_path)
  reference = evaluation.reference_statistics(detector, config.eval.ref_stats, image_shape[0])
  results = evaluation.evaluate(generate, image_shape, label_dim, detector, reference, config.eval.num_images,
                                config.eval.batch_size, config.eval.seed_offset, config.eval.inception_score,
                                rng=config.sample.rng)
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
  net = checkpoint.load_network(source, key=config.teacher_key)
  if source.endswith(".pkl") or not config.convert.safetensors:
    checkpoint.save_network(workdir, net.class_name, net.init_kwargs, jax.device_get(net.variables))
    logging.info("converted %s (%s, %d parameters) to %s", source, net.class_name,
                 convert.count_params(net.variables), workdir)
  if config.convert.safetensors:
    safetensors.export_safetensors(net.module, jax.device_get(net.variables), config.convert.safetensors,
                                   metadata={"class_name": net.class_name})
    logging.info("wrote PyTorch state_dict names to %s", config.convert.safetensors)


def reference(config, workdir):
  """Reference statistics (mu, sigma) of the configured dataset under the configured detector."""
  dataset = run_lib.make_dataset(config.data.to_dict())
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


def pipeline(config, workdir):
  """The MNIST demo (configs/mnist.py): teacher → Heun FID-proxy → each method → plot and summary.

  Every stage resumes, and continues when its config grew (a larger total_kimg). When the teacher trains
  further, what was computed from the old one is stale: its FID-proxy is recomputed and each method's workdir
  is moved to `<method>.stale` and distilled again from the new teacher.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from sida_jax.train import preemption  # pylint: disable=import-outside-toplevel
  from sida_jax.train import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
  from sida_jax.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  methods = [m.strip() for m in config.methods.split(",") if m.strip()]
  for m in methods:
    if m not in config:
      raise ValueError(f"config.methods names {m!r} but the config has no {m!r} section")
  with workdir_lib.lock(workdir), preemption.stop_signals() as stop:

    def between_stages(done: str):
      if stop.requested:
        raise preemption.Interrupted(stop.signum, f"stopped by {stop.name} after {done}; run the same command "
                                     "to continue")

    summary_path = os.path.join(workdir, "summary.json")
    summary = checkpoint.read_json(summary_path) if os.path.isfile(summary_path) else {}

    def set_aside(m: str, why: str):
      m_dir = os.path.join(workdir, m)
      if os.path.isdir(m_dir):
        if os.path.isdir(m_dir + ".stale"):
          shutil.rmtree(m_dir + ".stale")
        os.replace(m_dir, m_dir + ".stale")
        logging.warning("%s: %s; moved to %s.stale, distilling again", m_dir, why, m_dir)
      summary.pop(m, None)

    # 1. Teacher: trained (further) to config.teacher.total_kimg.
    teacher_dir = os.path.join(workdir, "teacher")
    t0 = time.time()
    teacher_state = teacher_lib.train_teacher(config.teacher, teacher_dir)
    teacher_steps = int(jax.device_get(teacher_state.step))
    previous = summary.get("teacher", {})
    # Summaries written before steps were recorded hold the teacher's total_kimg.
    previous_steps = previous.get("steps", int(np.ceil(previous.get("kimg", 0) * 1000 / config.teacher.batch_size)))
    if not previous or previous_steps != teacher_steps:
      if previous:
        for m in sorted(set(methods) | {k for k in summary if k != "teacher"}):
          set_aside(m, f"distilled from the teacher at step {previous_steps}, which now trained to {teacher_steps}")
      summary["teacher"] = {"kimg": teacher_steps * config.teacher.batch_size / 1000, "steps": teacher_steps,
                            "train_seconds": previous.get("train_seconds", 0.0) + time.time() - t0}
      checkpoint.write_json(summary_path, summary)
    network_dir = os.path.join(teacher_dir, "network")
    between_stages("the teacher")

    # 2. The teacher's own FID-proxy with EDM's Heun sampler.
    if "fid" not in summary["teacher"]:
      t_config = config.teacher.copy_and_resolve_references()
      with t_config.unlocked():
        t_config.teacher = network_dir
        t_config.sample.teacher_steps = config.teacher_heun_steps
      t0 = time.time()
      generate, image_shape, label_dim, _ = _generator(t_config, teacher_dir)
      detector = evaluation.make_detector(t_config.eval.detector, t_config.eval.detector_path)
      reference = evaluation.reference_statistics(detector, t_config.eval.ref_stats, image_shape[0])
      results = evaluation.evaluate(generate, image_shape, label_dim, detector, reference,
                                    t_config.eval.num_images, t_config.eval.batch_size, inception_score=False,
                                    rng=t_config.sample.rng)
      summary["teacher"].update(fid=float(results["fid"]), nfe=2 * config.teacher_heun_steps - 1,
                                eval_seconds=time.time() - t0)
      images = np.concatenate(list(evaluation.generated_batches(generate, list(range(64)), image_shape,
                                                                label_dim, 64, t_config.sample.rng)))
      _save_grid(os.path.join(workdir, "grid_teacher.png"), images)
      checkpoint.write_json(summary_path, summary)
      between_stages("the teacher's evaluation")

    # 3. Each method, resumable, with its periodic FID-proxy.
    for m in methods:
      m_config = config[m].copy_and_resolve_references()
      with m_config.unlocked():
        m_config.teacher = network_dir
      m_dir = os.path.join(workdir, m)
      if summary.get(m, {}).get("teacher_steps", teacher_steps) != teacher_steps:
        set_aside(m, "distilled from an older teacher")
      summary.setdefault(m, {})["teacher_steps"] = teacher_steps
      checkpoint.write_json(summary_path, summary)
      t0 = time.time()
      state = loop.train_and_evaluate(m_config, m_dir, evaluate_fn=_periodic_evaluator(m_config))
      history = _read_history(os.path.join(m_dir, loop.EVAL_HISTORY))
      # A re-run continues the method's workdir (e.g. to a larger total_kimg): wall-clock accumulates.
      previous = summary[m].get("train_seconds", 0.0)
      summary[m].update({"kimg": m_config.total_kimg, "train_seconds": previous + time.time() - t0,
                         "fid_history": history, "final_fid": history[-1]["fid"] if history else None,
                         "best_fid": min((h["fid"] for h in history), default=None)})
      run = run_lib.build_run(m_config)
      ema = {"params": state.generator_ema, **state.generator.buffers}
      generate = run.generate
      images = np.concatenate(list(evaluation.generated_batches(lambda z, y: generate(ema, z, y),
                                                                list(range(64)), run.image_shape, 0, 64,
                                                                m_config.sample.rng)))
      _save_grid(os.path.join(workdir, f"grid_{m}.png"), images)
      checkpoint.write_json(summary_path, summary)
      between_stages(m)

    _plot(os.path.join(workdir, "fid_vs_kimg.png"), summary, methods)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(_summary_table(summary, methods))
    logging.info("MNIST demo done:\n%s", _summary_table(summary, methods))


MODES = {"train": train, "teacher": train_teacher, "pipeline": pipeline, "sample": sample, "eval": evaluate,
         "convert": convert_network, "ref": reference, "plan": plan_lib.plan}


def _read_history(path: str) -> list:
  import json  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    return []
  by_kimg = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_kimg[row["kimg"]] = row   # a re-run after a crash may repeat a point: keep the last
  return [by_kimg[k] for k in sorted(by_kimg)]


def _save_grid(path: str, images: np.ndarray) -> None:
  grid = loop.image_grid(images)
  PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def _plot(path: str, summary: dict, methods: list) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for m in methods:
    hist = summary.get(m, {}).get("fid_history", [])
    if hist:
      ax.plot([h["kimg"] for h in hist], [h["fid"] for h in hist], marker="o", label=f"{m} (1 step)")
  teacher = summary.get("teacher", {})
  if "fid" in teacher:
    ax.axhline(teacher["fid"], color="k", linestyle="--", label=f"teacher (Heun, NFE {teacher['nfe']})")
  ax.set_xlabel("kimg (generated images seen / 1000)")
  ax.set_ylabel("FID-proxy (MNIST features)")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _summary_table(summary: dict, methods: list) -> str:
  t = summary.get("teacher", {})
  rows = ["| model | NFE | FID-proxy | kimg | wall-clock (s) |", "|---|---|---|---|---|",
          f"| teacher (EDM, Heun) | {t.get('nfe', '')} | {t.get('fid', float('nan')):.3f} | "
          f"{t.get('kimg', '')} | {t.get('train_seconds', 0):.0f} train + {t.get('eval_seconds', 0):.0f} sample/eval |"]
  for m in methods:
    s = summary.get(m, {})
    if s.get("final_fid") is not None:
      rows.append(f"| {m} (one step) | 1 | {s['final_fid']:.3f} (best {s['best_fid']:.3f}) | {s['kimg']} | "
                  f"{s['train_seconds']:.0f} |")
  return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Text-to-image (a Stable Diffusion pipeline folder as config.teacher).


def _refuse_text_to_image(path, key):
  """A text-to-image teacher folder or workdir on a path for image-only networks: name the missing setting."""
  from sida_jax.train import t2i  # pylint: disable=import-outside-toplevel
  if t2i.is_pipeline_folder(path) or t2i.is_text_to_image_workdir(path):
    raise ValueError(f"{key}: {path} is text-to-image, its generator needs prompts")


def _text_to_image_samples(config, workdir, seeds):
  """(uint8 images, their prompts, description) of a text-to-image workdir's EMA generator."""
  from sida_jax import text_to_image  # pylint: disable=import-outside-toplevel
  from sida_jax.text import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  from sida_jax.train import t2i  # pylint: disable=import-outside-toplevel
  gen = t2i.load_generator(config.sample.source or workdir, config.teacher, run_lib.compute_dtype(config.dtype),
                           config.data.resolution)
  prompts = prompts_lib.read_prompts(config.sample.prompts).prompts
  images = np.concatenate(list(text_to_image.generated_images(gen.generate, gen.text, gen.latent_shape, seeds,
                                                              prompts, config.sample.batch_size,
                                                              config.sample.rng)))
  return images, np.asarray([prompts[i % len(prompts)] for i in range(len(seeds))]), gen.description


def _text_to_image_fid(config):
  """fid(generate, text, latent_shape) -> results on config.eval.prompts; detector and reference read once."""
  from sida_jax import text_to_image  # pylint: disable=import-outside-toplevel
  from sida_jax.text import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  if not config.eval.ref_stats:
    raise ValueError("config.eval.ref_stats: the reference statistics (.npz with mu, sigma) of the evaluation "
                     "images (e.g. COCO-2014 val at 256²) are required")
  detector = evaluation.make_detector(config.eval.detector, config.eval.detector_path)
  reference = evaluation.reference_statistics(detector, config.eval.ref_stats, config.eval.resolution)
  prompts = prompts_lib.read_prompts(config.eval.prompts).prompts

  def fid(generate, text, latent_shape):
    return text_to_image.evaluate(generate, text, latent_shape, prompts, detector, reference,
                                  config.eval.num_images, config.eval.batch_size, config.eval.seed_offset,
                                  config.eval.resolution, config.sample.rng)
  return fid


def _text_to_image_evaluator(config):
  fid = _text_to_image_fid(config)
  return lambda run, ema_variables: fid(lambda z, y: run.generate(ema_variables, z, y), run.text, run.image_shape)


def _evaluate_text_to_image(config, workdir):
  """FID of a text-to-image workdir's EMA generator on config.eval.prompts against config.eval.ref_stats."""
  from sida_jax.train import t2i  # pylint: disable=import-outside-toplevel
  gen = t2i.load_generator(config.sample.source or workdir, config.teacher, run_lib.compute_dtype(config.dtype),
                           config.data.resolution)
  results = {k: float(v) for k, v in _text_to_image_fid(config)(gen.generate, gen.text, gen.latent_shape).items()}
  results.update(source=gen.description, detector=config.eval.detector, num_images=config.eval.num_images,
                 prompts=config.eval.prompts, resolution=config.eval.resolution)
  checkpoint.write_json(os.path.join(workdir, "eval.json"), results)
  logging.info("evaluation of %s: %s", gen.description, results)
