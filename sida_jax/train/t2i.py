"""Text-to-image run assembly: a diffusers pipeline folder distilled into a one-step generator.

`build_run(config)` reads the pipeline (denoiser, text encoder and tokenizer, VAE, scheduler) and returns the
same frozen `Run` as EDM teachers get, so the shared step and loop run it unchanged. Two teachers:
  * Stable Diffusion (`unet`, CLIP) with SiD-LSG: the ε-prediction U-Net becomes an EDM-form `Denoiser`
    D(x; σ, c) (`models/t2i/ddpm.py`) whose condition c is the text embedding [N, 77, D] (the step's `labels`);
    SiD-LSG runs on the teacher's σ grid (`losses/lsg.py`, integer t, ε-MSE critic, t_init), with the empty
    prompt's embedding as the null condition (a constant of the compiled step, computed once here);
  * PixArt-α (`transformer`, T5) with SIM: the transformer in EDM form with iDDPM preconditioning
    (`models/t2i/iddpm.py`), conditioned on {'embedding': [N, 120, 4096], 'mask': [N, 120]}; SIM's
    text-to-image form (`losses/sim.py`: truncated log-normal σ in both phases, weights 1); the generator is
    D(σ_init z; σ_init) = σ_init z − σ_init·F(…), σ_init = config.init_sigma (t* = 2.5). No null prompt: SIM
    uses no guidance.
The batch carries prompt token ids (and T5's attention masks); `Run.device_batch` embeds them with the frozen
text encoder after they are split over the devices (`text_to_image.TextConditioning`).
Generator images live in the VAE's latent space: (resolution / 8)² × 4 for SD and PixArt.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, Optional

import jax
import ml_collections

from sida_jax import checkpoint, sampling, text_to_image
from sida_jax.formats import pretrained
from sida_jax.losses import lsg, sim
from sida_jax.losses import method as method_lib
from sida_jax.losses.method import Networks
from sida_jax.models.registry import Network
from sida_jax.models.t2i import ddpm, iddpm, pixart, sd_unet
from sida_jax.text import prompts as prompts_lib
from sida_jax.train import run as run_lib
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

UNET_CLASS = 'UNet2DConditionModel'
TRANSFORMER_CLASSES = pixart.CLASS_NAMES
# The method each teacher family is distilled with.
METHOD_OF_PART = {'unet': 'lsg', 'transformer': 'sim'}
TEACHER_NAME = {'unet': 'a Stable Diffusion teacher', 'transformer': 'a PixArt teacher'}
NETWORK_NAME = {'unet': 'the SD U-Net', 'transformer': 'the PixArt transformer'}


def is_pipeline_folder(path: str) -> bool:
  """Whether `path` is a diffusers pipeline folder (it has a model_index.json)."""
  return bool(path) and os.path.isfile(os.path.join(path, pretrained.MODEL_INDEX))


def is_text_to_image_workdir(path: str) -> bool:
  """Whether `path` is a workdir of a text-to-image run (its network.json names the SD U-Net or PixArt)."""
  recorded = os.path.join(path, checkpoint.NETWORK_JSON) if path else ''
  return (os.path.isfile(recorded) and
          checkpoint.read_json(recorded).get('class_name') in (UNET_CLASS, *TRANSFORMER_CLASSES))


def latent_shape(unet_config: dict, vae_config: dict, resolution: int) -> tuple:
  """(h, w, channels) of the generator's latents for `resolution`² images (0: the U-Net's sample_size)."""
  factor = 2 ** (len(vae_config.get('block_out_channels', (64,))) - 1)
  side = resolution // factor if resolution else int(unet_config.get('sample_size', 64))
  if resolution and resolution % factor:
    raise ValueError(f'config.data.resolution={resolution} is not a multiple of the VAE factor {factor}')
  return (side, side, int(unet_config.get('in_channels', 4)))


def text_denoiser(network, schedule: ddpm.DiscreteSchedule):
  """The SD U-Net or the PixArt transformer as an EDM-form Denoiser conditioned on text."""
  if isinstance(network, pixart.PixArtTransformer2DModel):
    if network.use_additional_conditions:
      raise ValueError('PixArt transformer with use_additional_conditions (resolution and aspect-ratio '
                       'embeddings, PixArt-XL-2-1024): not supported; use a 512 model (PixArt-XL-2-512x512)')
    width = int(network.caption_channels or network.cross_attention_dim)
    return lsg.embedding_denoiser(functools.partial(iddpm.edm_denoise, network, schedule), width)
  width = int(network.cross_attention_dim[0])
  return lsg.embedding_denoiser(functools.partial(ddpm.edm_denoise, network, schedule), width)


def _check(config: ml_collections.ConfigDict, part: str) -> None:
  """Settings that have no meaning for the pipeline's teacher, refused before its weights are read."""
  method, teacher = METHOD_OF_PART[part], TEACHER_NAME[part]
  if config.method != method:
    hint = ' (all κ = 1 is SiD)' if method == 'lsg' else ''
    raise ValueError(f"config.method={config.method!r}: {teacher} is distilled with {method!r}{hint}")
  if config.dropout > 0:
    raise ValueError(f'config.dropout={config.dropout}: {NETWORK_NAME[part]} has no dropout (keep the default -1)')
  if config.augment_p > 0:
    raise ValueError('config.augment_p: no augmentation for text-to-image runs')
  if config.generator_init:
    raise ValueError('config.generator_init: not supported for text-to-image runs')
  if config.loss.use_logvar:
    raise ValueError(f'config.loss.use_logvar: {NETWORK_NAME[part]} has no log-variance head')


def _method(config: ml_collections.ConfigDict, part: str, nets: Networks, schedule: ddpm.DiscreteSchedule,
            text: text_to_image.TextConditioning):
  if part == 'unet':
    return lsg.make(config, nets, lsg.embedding_null_condition(text.null_embedding), sigma_grid=schedule.sigmas)
  return sim.make(config, nets, sigma_range=(config.loss.sigma_min, config.loss.sigma_max))


def _schedule(part: str, scheduler_config: dict) -> ddpm.DiscreteSchedule:
  # PixArt's scheduler is a DPM-Solver config: only its ᾱ_t matter (no DDPMScheduler x0 clipping).
  return ddpm.from_scheduler_config(scheduler_config, x0_clipping=part == 'unet')


def _build_module(class_name: str, init_kwargs: dict, dtype: Any):
  if class_name == UNET_CLASS:
    return sd_unet.from_diffusers_config(init_kwargs, dtype)
  return pixart.from_config(init_kwargs, dtype)


def build_run(config: ml_collections.ConfigDict, pipeline: Optional[pretrained.Pipeline] = None,
              with_data: bool = True) -> run_lib.Run:
  """The Run of SiD-LSG (SD) or SIM (PixArt) on the pipeline folder `config.teacher` with prompts
  `config.data.prompts`.

  `pipeline` replaces reading the folder's weights (`text_to_image.read_pipeline(..., denoiser=True)`; the
  memory plan passes one read with `weights=False`, whose variables are ShapeDtypeStructs) and
  `with_data=False` reads no prompts.
  """
  method_lib.check_recipe_method(config)
  part = pretrained.denoiser_part(config.teacher)
  _check(config, part)
  mesh = run_lib.mesh_shape(config)
  if config.remat not in ("none", "full"):
    raise ValueError(f"config.remat={config.remat!r}: text-to-image runs support 'none' and 'full' "
                     "(block remat covers the EDM/EDM2 U-Nets)")
  dtype = run_lib.compute_dtype(config.dtype)
  if pipeline is None:
    pipeline = text_to_image.read_pipeline(config.teacher, dtype, denoiser=True)
  text = text_to_image.text_side(pipeline, dtype, config.mesh.min_shard_size)
  teacher_net = pipeline.denoiser
  schedule = _schedule(part, pipeline.scheduler)
  denoiser = text_denoiser(teacher_net.module, schedule)
  if text.embedding_shape[-1] != denoiser.label_dim:
    raise ValueError(f'{config.teacher}: the text encoder gives {text.embedding_shape[-1]}-wide embeddings, the '
                     f'{part} attends to {denoiser.label_dim}')
  nets = Networks(teacher=denoiser, critic=denoiser, generator=denoiser)
  method = _method(config, part, nets, schedule, text)
  prompts = None
  if config.data.prompts and with_data:
    prompts = prompts_lib.read_prompts(config.data.prompts, config.data.prompt_feature,
                                       config.data.data_dir, config.data.split)
  text = dataclasses.replace(text, prompts=prompts)
  image_shape = latent_shape(teacher_net.config, text.vae.config, config.data.resolution)
  o = config.optim
  spec = step_lib.StepSpec(
      method=method, nets=nets, batch_size=config.batch_size, image_shape=image_shape,
      init_sigma=method.init_sigma or config.init_sigma,
      generator_tx=state_lib.make_optimizer(o.generator_lr, o.generator_beta1, o.beta2, o.eps,
                                            clip_value=o.generator_grad_clip or None),
      critic_tx=state_lib.make_optimizer(o.critic_lr, o.critic_beta1, o.beta2, o.eps),
      ema_halflife_mimg=config.ema.halflife_mimg, ema_rampup_ratio=config.ema.rampup_ratio or None,
      grad_accum=config.grad_accum, checkpoint_generator_objective=config.remat == 'full')
  class_name = UNET_CLASS if part == 'unet' else teacher_net.class_name
  # As for image runs, the teacher waits on the host until the loop places it on the mesh.
  variables = jax.tree.map(lambda x: jax.device_get(x) if isinstance(x, jax.Array) else x, teacher_net.variables)
  teacher = Network(teacher_net.module, variables, class_name, dict(teacher_net.config))
  return run_lib.Run(teacher=teacher, train_kwargs=dict(teacher_net.config), generator_class=class_name,
                     generator_kwargs=dict(teacher_net.config), nets=nets, method=method, spec=spec,
                     dataset=None, image_shape=image_shape, batch_size=config.batch_size, seed=config.seed,
                     generator_init='', dtype=dtype, sample_rng=config.sample.rng, text=text, mesh=mesh,
                     min_shard_size=config.mesh.min_shard_size)


@dataclasses.dataclass(frozen=True)
class OneStepGenerator:
  """A distilled text-to-image generator ready to sample: generate(z, condition) -> latents, jitted (condition:
  `text.embed_prompts(prompts)`)."""
  generate: Callable
  text: text_to_image.TextConditioning
  latent_shape: tuple
  description: str


def load_generator(source: str, teacher: str, dtype: Any, resolution: int = 0) -> OneStepGenerator:
  """The EMA generator of a text-to-image workdir `source` (its latest checkpoint), with the text encoder,
  tokenizer, VAE and scheduler of its teacher's pipeline folder (the teacher's denoiser is not read)."""
  info = checkpoint.read_json(os.path.join(source, checkpoint.NETWORK_JSON))
  classes = (UNET_CLASS, *TRANSFORMER_CLASSES)
  if info['class_name'] not in classes:
    raise ValueError(f'{source}: a {info["class_name"]} generator, not a text-to-image ({" or ".join(classes)}) one')
  if not is_pipeline_folder(teacher):
    raise ValueError(f'config.teacher={teacher!r}: give the pipeline folder the generator was distilled from (its '
                     'text encoder, tokenizer, VAE and scheduler)')
  part = 'unet' if info['class_name'] == UNET_CLASS else 'transformer'
  if pretrained.denoiser_part(teacher) != part:
    raise ValueError(f'config.teacher={teacher!r}: the generator in {source} is a {info["class_name"]}, this '
                     f'pipeline folder has a {pretrained.denoiser_part(teacher)}')
  state, meta = checkpoint.restore_raw(os.path.join(source, 'checkpoints'))
  variables = {'params': state['generator_ema']}
  network = _build_module(info['class_name'], info['init_kwargs'], dtype)
  schedule = _schedule(part, pretrained.load_pipeline(teacher, parts=('scheduler',)).scheduler)
  denoiser = text_denoiser(network, schedule)
  init_sigma = float(info['init_sigma'])
  generate = sampling.with_weights(lambda v, z, y: sampling.generate(denoiser, v, z, y, init_sigma), variables)
  text = text_to_image.load_text_side(teacher, dtype)
  shape = latent_shape(info['init_kwargs'], text.vae.config, resolution)
  return OneStepGenerator(generate, text, shape,
                          f'one-step text-to-image generator from {source} (step {meta.get("step")})')
