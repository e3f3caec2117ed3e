"""Writes the SiD-LSG text-to-image reference data: a tiny Stable-Diffusion-like pipeline folder whose U-Net
attends to the tiny text encoder (`tiny-lsg/`), and the official SiD-LSG loss values and gradients for two
perturbed copies of its U-Net as fake score network and generator (`perturbed_state`, which the test repeats).

The official functions are imported from a checkout of mingyuanzhou/SiD-LSG (nothing of it is copied here):
`training/sid_sd_util.py: sid_sd_sampler` (the one-step generator) and `sid_sd_denoise` (guided ε- and
x0-predictions through the diffusers scheduler); the loss lines of `training/sid_training_loop.py` (ε-MSE of
the fake score network, the SiD generator loss with its weight factor) are restated below. Run once with the
parity environment (torch, diffusers, transformers), from the repository root:

    python tests/data/t2i/make_lsg_reference.py --official PATH/TO/SiD-LSG
"""
import argparse
import json
import os
import pathlib
import shutil
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
PIPE = HERE / 'tiny-lsg'
SOURCE = HERE / 'tiny-sd'   # text encoder (32 wide), tokenizer, VAE and scheduler are shared with it

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
            up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32, attention_head_dim=2,
            norm_num_groups=4)
PROMPTS = ['a photo of a cat sitting on a wooden table', 'two dogs playing with a red ball in the park',
           'a bowl of fresh fruit', 'an astronaut riding a horse on the moon']
GENERATOR_PROMPTS = ['a red car parked in front of a white house', 'a bird on the branch of a tree',
                     'a train passing through a snowy mountain landscape', 'a plate of pasta']
CRITIC_T = [20, 979, 500, 625]
GENERATOR_T = [979, 20, 321, 700]
DROPPED = [True, False, False, False]   # critic-phase prompts replaced by "" (when κ1 or κ2 ≠ 1)
# (κ1, κ2 = κ3, κ4): SiD without guidance, and LSG with every scale different.
CASES = {'nocfg': (1.0, 1.0, 1.0), 'lsg': (2.5, 1.5, 3.0)}
INIT_TIMESTEP = 625
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', num_train_timesteps=1000)


def perturbed(module, seed, scale):
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))
  return module


def perturbed_state(state, seed, scale=0.02):
  """state + scale·N(0, 1) in float32, drawn by numpy in sorted-name order (the test repeats this)."""
  rng = np.random.default_rng(seed)
  return {k: (np.asarray(state[k], np.float32) + np.float32(scale) * rng.standard_normal(np.shape(state[k]))
              .astype(np.float32)) for k in sorted(state)}


def projections(gradients, seed):
  """Per tensor ⟨g, r⟩ with r ~ N(0, 1) drawn in sorted-name order, and ‖g‖: a compact gradient check."""
  rng = np.random.default_rng(seed)
  out = {}
  for k in sorted(gradients):
    out[k] = np.asarray([np.sum(gradients[k] * rng.standard_normal(gradients[k].shape)), np.linalg.norm(gradients[k])])
  return out


def write_pipeline():
  import diffusers
  import torch
  PIPE.mkdir(exist_ok=True)
  torch.manual_seed(11)
  unet = perturbed(diffusers.UNet2DConditionModel(**UNET), 12, 0.1).eval()
  unet.save_pretrained(PIPE / 'unet', safe_serialization=True)
  for part in ('text_encoder', 'tokenizer', 'vae'):
    link = PIPE / part
    if not link.is_symlink():
      link.symlink_to(pathlib.Path('..') / SOURCE.name / part, target_is_directory=True)
  (PIPE / 'scheduler').mkdir(exist_ok=True)
  shutil.copy(SOURCE / 'scheduler' / 'scheduler_config.json', PIPE / 'scheduler' / 'scheduler_config.json')
  shutil.copy(SOURCE / 'model_index.json', PIPE / 'model_index.json')
  return unet


def state_arrays(module, prefix=''):
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def grads(module):
  return {k: p.grad.detach().numpy().copy() for k, p in module.named_parameters()}


def store_gradients(ref, prefix, gradients, full):
  """Every gradient tensor (`full`), or per tensor its projection on a fixed random direction and its norm."""
  if full:
    ref.update({f'{prefix}/{k}': v for k, v in gradients.items()})
  else:
    ref.update({f'{prefix}_projection/{k}': v for k, v in projections(gradients, 3).items()})


def nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1).copy()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--official', required=True, help='a checkout of mingyuanzhou/SiD-LSG')
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.official))
  import diffusers
  import torch
  import transformers
  from training.sid_sd_util import sid_sd_denoise, sid_sd_sampler  # the official functions

  torch.set_grad_enabled(True)
  teacher = write_pipeline()
  teacher_state = {k: v.numpy() for k, v in teacher.state_dict().items()}
  critic, generator = (diffusers.UNet2DConditionModel.from_pretrained(PIPE / 'unet') for _ in range(2))
  critic.load_state_dict({k: torch.from_numpy(v) for k, v in perturbed_state(teacher_state, 1).items()})
  generator.load_state_dict({k: torch.from_numpy(v) for k, v in perturbed_state(teacher_state, 2).items()})
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(PIPE / 'tokenizer'), use_fast=False)
  text_encoder = transformers.CLIPTextModel.from_pretrained(str(PIPE / 'text_encoder')).eval()
  scheduler = diffusers.DDPMScheduler.from_pretrained(str(PIPE / 'scheduler'))
  common = dict(noise_scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, resolution=16,
                dtype=torch.float32)

  rng = np.random.default_rng(0)
  n, shape = len(PROMPTS), (4, 8, 8)
  draws = {name: rng.standard_normal((n, *shape)).astype(np.float32)
           for name in ('z_critic', 'noise_critic', 'z_generator', 'noise_generator')}
  ref = {name: v.transpose(0, 2, 3, 1).copy() for name, v in draws.items()}
  ref.update(critic_t=np.asarray(CRITIC_T), generator_t=np.asarray(GENERATOR_T), dropped=np.asarray(DROPPED),
             init_timestep=np.asarray(INIT_TIMESTEP), prompts=np.asarray(PROMPTS),
             generator_prompts=np.asarray(GENERATOR_PROMPTS),
             input_ids=tokenizer(PROMPTS + [''], padding='max_length', max_length=77, truncation=True,
                                 return_tensors='np').input_ids.astype(np.int32),
             sd_alphas_cumprod=diffusers.DDPMScheduler(**SD_SCHEDULE).alphas_cumprod.numpy())
  t = lambda v: torch.from_numpy(v)
  init = INIT_TIMESTEP * torch.ones((n,), dtype=torch.long)
  for case, (k1, k2, k4) in CASES.items():
    drop = k1 != 1 or k2 != 1
    contexts = ['' if (d and drop) else p for d, p in zip(DROPPED, PROMPTS)]
    # Fake score network phase: x_g without gradient, then Σ(ε̂_κ1 − n)² / B.
    with torch.no_grad():
      images = sid_sd_sampler(unet=generator, latents=t(draws['z_critic']), contexts=contexts, init_timesteps=init,
                              return_images=False, num_steps=1, **common)
    critic.zero_grad(set_to_none=True)
    eps = sid_sd_denoise(unet=critic, images=images, noise=t(draws['noise_critic']), contexts=contexts,
                         timesteps=torch.as_tensor(CRITIC_T), predict_x0=False, guidance_scale=k1, **common)
    loss = ((eps - t(draws['noise_critic'])) ** 2).sum() / n
    loss.backward()
    ref[f'{case}_x_g_critic'] = nhwc(images)
    ref[f'{case}_loss_critic'] = np.asarray(loss.item())
    store_gradients(ref, f'{case}_grad_critic', grads(critic), full=case == 'lsg')
    # Generator phase: x_g with gradient, x0-predictions of the (fixed) fake score network at κ2 and of the
    # teacher at κ4, Σ (y_real − y_fake)(y_fake − x_g)/w / B with w = mean|x_g − y_real| ≥ 1e-5 (α = 1).
    generator.zero_grad(set_to_none=True)
    images = sid_sd_sampler(unet=generator, latents=t(draws['z_generator']), contexts=GENERATOR_PROMPTS,
                            init_timesteps=init, return_images=False, num_steps=1, **common)
    noise = t(draws['noise_generator'])
    steps = torch.as_tensor(GENERATOR_T)
    y_fake = sid_sd_denoise(unet=critic, images=images, noise=noise, contexts=GENERATOR_PROMPTS, timesteps=steps,
                            guidance_scale=k2, **common)
    y_real = sid_sd_denoise(unet=teacher, images=images, noise=noise, contexts=GENERATOR_PROMPTS,
                            timesteps=steps, guidance_scale=k4, **common)
    with torch.no_grad():
      weight = (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    loss = ((y_real - y_fake) * (y_fake - images) / weight).sum() / n
    loss.backward()
    ref[f'{case}_x_g_generator'] = nhwc(images)
    ref[f'{case}_loss_generator'] = np.asarray(loss.item())
    store_gradients(ref, f'{case}_grad_generator', grads(generator), full=case == 'lsg')
  np.savez_compressed(HERE / 'lsg_reference.npz', **ref)
  with open(HERE / 'lsg_reference.json', 'w', encoding='utf-8') as f:
    json.dump({'cases': CASES, 'unet': UNET, 'diffusers': diffusers.__version__,
               'transformers': transformers.__version__, 'torch': torch.__version__}, f, indent=2)
  print({k: float(v) for k, v in ref.items() if k.endswith(('loss_critic', 'loss_generator'))})


if __name__ == '__main__':
  main()
