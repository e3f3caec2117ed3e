"""Writes tests/data/t2i/tiny-pixart: a tiny PixArt-α-like pipeline folder for the SIM text-to-image tests, and
pixart_edm_reference.npz: the EDM-form denoiser D(x; σ, c) computed with diffusers' transformer.

Run once with the parity environment (torch, diffusers), from the repo root:
    python tests/data/t2i/make_pixart_pipeline.py
The folder reuses the tiny T5 text encoder and SentencePiece tokenizer of tests/data/t2i_pixart and the tiny VAE of
tiny-sd (symbolic links); only the transformer is new: like PixArt-XL-2-512x512 it has no resolution / aspect-ratio
conditions (`use_additional_conditions=False`) and 8 output channels (ε and the learned-variance values). The
scheduler config is PixArt's (DPMSolverMultistepScheduler, linear β from 1e-4 to 0.02 over 1000 steps).

The reference applies PixArt's iDDPM-style EDM preconditioning by hand (ALGORITHMS.md §1.2, §4.6):
    D(x; σ, c) = x − σ·ε_θ(x/√(σ² + 1), t(σ), c)[:4],   t(σ) = argmin_t |σ_t − σ|,  σ_t = √((1 − ᾱ_t)/ᾱ_t).
"""
import json
import os
import pathlib

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

HERE = pathlib.Path(__file__).resolve().parent
FOLDER = HERE / 'tiny-pixart'
LINKS = {'text_encoder': '../../t2i_pixart/text_encoder', 'tokenizer': '../../t2i_pixart/tokenizer',
         'vae': '../tiny-sd/vae'}
MODEL_INDEX = {
    '_class_name': 'PixArtAlphaPipeline', '_diffusers_version': '0.42.1',
    'scheduler': ['diffusers', 'DPMSolverMultistepScheduler'], 'text_encoder': ['transformers', 'T5EncoderModel'],
    'tokenizer': ['transformers', 'T5Tokenizer'], 'transformer': ['diffusers', 'PixArtTransformer2DModel'],
    'vae': ['diffusers', 'AutoencoderKL'],
}


def perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
  """Random offsets so that no parameter keeps a trivial value (zero-initialised output layers, ones)."""
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))


def main():
  torch.manual_seed(1)
  rng = np.random.default_rng(1)
  FOLDER.mkdir(exist_ok=True)
  (FOLDER / 'model_index.json').write_text(json.dumps(MODEL_INDEX, indent=2) + '\n')
  for name, target in LINKS.items():
    link = FOLDER / name
    if not link.is_symlink():
      os.symlink(target, link)
  scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
                                          num_train_timesteps=1000, prediction_type='epsilon')
  scheduler.save_config(str(FOLDER / 'scheduler'))

  transformer = PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
      cross_attention_dim=24, caption_channels=16, sample_size=8, patch_size=2,
      use_additional_conditions=False).eval()
  perturb(transformer)
  transformer.save_pretrained(str(FOLDER / 'transformer'), safe_serialization=True)

  # D(x; σ, c) at σ on, between and off the grid, with T5-like embeddings and masks of several lengths.
  betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64).astype(np.float32)
  alphas_cumprod = np.cumprod(np.float32(1) - betas, dtype=np.float32)
  grid = np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float64)
  sigma = np.array([0.01, grid[3], 0.5 * (grid[10] + grid[11]) + 1e-4, 2.5, 14.0, 80.0, 156.6155, 300.0])
  n = sigma.size
  x = rng.normal(size=(n, 4, 8, 8)) * np.sqrt(sigma ** 2 + 0.25)[:, None, None, None]
  embedding = rng.normal(size=(n, 6, 16))
  mask = (np.arange(6)[None] < rng.integers(1, 7, size=(n, 1))).astype(np.int64)
  t = np.abs(grid[None, :] - sigma[:, None]).argmin(axis=1)
  x_in = x / np.sqrt(sigma ** 2 + 1)[:, None, None, None]
  with torch.no_grad():
    out = transformer(torch.from_numpy(x_in).float(), encoder_hidden_states=torch.from_numpy(embedding).float(),
                      timestep=torch.from_numpy(t).long(), added_cond_kwargs={'resolution': None,
                                                                              'aspect_ratio': None},
                      encoder_attention_mask=torch.from_numpy(mask).float()).sample.double().numpy()
  denoised = x - sigma[:, None, None, None] * out[:, :4]
  to_nhwc = lambda a: np.transpose(a, (0, 2, 3, 1)).astype(np.float32)
  np.savez_compressed(HERE / 'pixart_edm_reference.npz', sigma=sigma.astype(np.float32), x=to_nhwc(x),
                      embedding=embedding.astype(np.float32), mask=mask.astype(np.int32), timestep=t.astype(np.int32),
                      denoised=to_nhwc(denoised))
  print('wrote', FOLDER, 'and pixart_edm_reference.npz; timesteps', t.tolist(), 'torch', torch.__version__)


if __name__ == '__main__':
  main()
