"""Text-to-image run assembly: SiD-LSG distilling a Stable Diffusion pipeline folder into a one-step generator.

`build_run(config)` reads the pipeline (U-Net, CLIP text encoder and tokenizer, VAE, scheduler) and returns
the same frozen `Run` as EDM teachers get, so the shared step and loop run it unchanged:
  * the ε-prediction U-Net becomes an EDM-form `Denoiser` D(x; σ, c) (`models/t2i/ddpm.py`) whose condition c
    is the text embedding [N, 77, D] (the step's `labels`), for teacher, fake score network and generator;
  * the method is SiD-LSG on the teacher's σ grid (`losses/lsg.py`, integer t, ε-MSE critic, t_init), with the
    empty prompt's embedding as the null condition (a constant of the compiled step, computed once here);
  * the batch carries prompt token ids; `Run.device_batch` embeds them with the frozen text encoder after they
    are split over the devices (`text_to_image.TextConditioning`).
Generator images live in the VAE's latent space: (resolution / 8)² × 4 for SD.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from sida_jax import checkpoint, sampling, text_to_image
from sida_jax.formats import pretrained
from sida_jax.losses import lsg
from sida_jax.losses import method as method_lib
from sida_jax.losses.method import Networks
from sida_jax.models.registry import Network
from sida_jax.models.t2i import ddpm, sd_unet
from sida_jax.text import prompts as prompts_lib
from sida_jax.train import run as run_lib
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

UNET_CLASS = 'UNet2DConditionModel'


def is_pipeline_folder(path: str) -> bool:
  """Whether `path` is a diffusers pipeline folder (it has a model_index.json)."""
  return bool(path) and os.path.isfile(os.path.join(path, pretrained.MODEL_INDEX))


def is_text_to_image_workdir(path: str) -> bool:
  """Whether `path` is a workdir of a text-to-image run (its network.json names the SD U-Net)."""
  recorded = os.path.join(path, checkpoint.NETWORK_JSON) if path else ''
  return os.path.isfile(recorded) and checkpoint.read_json(recorded).get('class_name') == UNET_CLASS


def latent_shape(unet_config: dict, vae_config: dict, resolution: int) -> tuple:
  """(h, w, channels) of the generator's latents for `resolution`² images (0: the U-Net's sample_size)."""
  factor = 2 ** (len(vae_config.get('block_out_channels', (64,))) - 1)
  side = resolution // factor if resolution else int(unet_config.get('sample_size', 64))
  if resolution and resolution % factor:
    raise ValueError(f'config.data.resolution={resolution} is not a multiple of the VAE factor {factor}')
  return (side, side, int(unet_config.get('in_channels', 4)))


def text_denoiser(unet: sd_unet.UNet2DConditionModel, schedule: ddpm.DiscreteSchedule):
  """The SD U-Net as an EDM-form Denoiser conditioned on text embeddings."""
  width = int(unet.cross_attention_dim[0])
  return lsg.embedding_denoiser(functools.partial(ddpm.edm_denoise, unet, schedule), width)


def _check(config: ml_collections.ConfigDict) -> None:
  """Settings that have no meaning for a Stable Diffusion teacher, refused before anything is read."""
  if config.method != 'lsg':
    raise ValueError(f"config.method={config.method!r}: a Stable Diffusion teacher is distilled with 'lsg' "
                     '(all κ = 1 is SiD)')
  if config.dropout > 0:
    raise ValueError(f'config.dropout={config.dropout}: the SD U-Net has no dropout (keep the default -1)')
  if config.augment_p > 0:
    raise ValueError('config.augment_p: no augmentation for text-to-image runs')
  if config.generator_init:
    raise ValueError('config.generator_init: not supported for text-to-image runs')
  if config.loss.use_logvar:
    raise ValueError('config.loss.use_logvar: the SD U-Net has no log-variance head')


def build_run(config: ml_collections.ConfigDict) -> run_lib.Run:
  """The Run of SiD-LSG on the pipeline folder `config.teacher` with prompts `config.data.prompts`."""
  method_lib.check_recipe_method(config)
  _check(config)
  mesh = run_lib.mesh_shape(config)
  if config.remat not in ("none", "full"):
    raise ValueError(f"config.remat={config.remat!r}: text-to-image runs support 'none' and 'full' "
                     "(block remat covers the EDM/EDM2 U-Nets)")
  dtype = run_lib.compute_dtype(config.dtype)
  pipe = pretrained.load_pipeline(config.teacher, dtype, parts=('unet', 'scheduler'))
  if pipe.unet is None:
    raise ValueError(f'config.teacher={config.teacher}: SiD-LSG distils a U-Net pipeline (Stable Diffusion); '
                     'this folder has a transformer')
  text = text_to_image.load_text_side(config.teacher, dtype)
  unet = pipe.unet
  if text.embedding_shape[-1] != unet.module.cross_attention_dim[0]:
    raise ValueError(f'{config.teacher}: the text encoder gives {text.embedding_shape[-1]}-wide embeddings, the '
                     f'U-Net attends to {unet.module.cross_attention_dim[0]}')
  schedule = ddpm.from_scheduler_config(pipe.scheduler)
  denoiser = text_denoiser(unet.module, schedule)
  nets = Networks(teacher=denoiser, critic=denoiser, generator=denoiser)
  method = lsg.make(config, nets, lsg.embedding_null_condition(text.null_embedding), sigma_grid=schedule.sigmas)
  prompts = None
  if config.data.prompts:
    prompts = prompts_lib.read_prompts(config.data.prompts, config.data.prompt_feature,
                                       config.data.data_dir, config.data.split)
  text = dataclasses.replace(text, prompts=prompts)
  image_shape = latent_shape(unet.config, text.vae.config, config.data.resolution)
  o = config.optim
  spec = step_lib.StepSpec(
      method=method, nets=nets, batch_size=config.batch_size, image_shape=image_shape,
      init_sigma=method.init_sigma,
      generator_tx=state_lib.make_optimizer(o.generator_lr, o.generator_beta1, o.beta2, o.eps,
                                            clip_value=o.generator_grad_clip or None),
      critic_tx=state_lib.make_optimizer(o.critic_lr, o.critic_beta1, o.beta2, o.eps),
      ema_halflife_mimg=config.ema.halflife_mimg, ema_rampup_ratio=config.ema.rampup_ratio or None,
      grad_accum=config.grad_accum, checkpoint_generator_objective=config.remat == 'full')
  teacher = Network(unet.module, unet.variables, UNET_CLASS, dict(unet.config))
  return run_lib.Run(teacher=teacher, train_kwargs=dict(unet.config), generator_class=UNET_CLASS,
                     generator_kwargs=dict(unet.config), nets=nets, method=method, spec=spec,
                     dataset=None, image_shape=image_shape, batch_size=config.batch_size, seed=config.seed,
                     generator_init='', dtype=dtype, sample_rng=config.sample.rng, text=text, mesh=mesh,
                     min_shard_size=config.mesh.min_shard_size)


@dataclasses.dataclass(frozen=True)
class OneStepGenerator:
  """A distilled text-to-image generator ready to sample: generate(z, embeddings) -> latents, jitted."""
  generate: Callable
  text: text_to_image.TextConditioning
  latent_shape: tuple
  description: str


def load_generator(source: str, teacher: str, dtype: Any, resolution: int = 0) -> OneStepGenerator:
  """The EMA generator of a text-to-image workdir `source` (its latest checkpoint), with the text encoder,
  tokenizer, VAE and scheduler of its teacher's pipeline folder (the teacher U-Net is not read)."""
  info = checkpoint.read_json(os.path.join(source, checkpoint.NETWORK_JSON))
  if info['class_name'] != UNET_CLASS:
    raise ValueError(f'{source}: a {info["class_name"]} generator, not a text-to-image ({UNET_CLASS}) one')
  if not is_pipeline_folder(teacher):
    raise ValueError(f'config.teacher={teacher!r}: give the Stable Diffusion pipeline folder the generator was '
                     'distilled from (its text encoder, tokenizer, VAE and scheduler)')
  state, meta = checkpoint.restore_raw(os.path.join(source, 'checkpoints'))
  variables = {'params': state['generator_ema']}
  unet = sd_unet.from_diffusers_config(info['init_kwargs'], dtype)
  schedule = ddpm.from_scheduler_config(pretrained.load_pipeline(teacher, parts=('scheduler',)).scheduler)
  denoiser = text_denoiser(unet, schedule)
  init_sigma = float(info['init_sigma'])
  generate = jax.jit(lambda z, y: sampling.generate(denoiser, variables, z, y, init_sigma))
  text = text_to_image.load_text_side(teacher, dtype)
  shape = latent_shape(info['init_kwargs'], text.vae.config, resolution)
  return OneStepGenerator(generate, text, shape,
                          f'one-step text-to-image generator from {source} (step {meta.get("step")})')
