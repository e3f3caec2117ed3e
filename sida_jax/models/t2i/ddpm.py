"""Stable Diffusion's discrete DDPM form seen as an EDM denoiser D(x; σ, c).

A DDPM teacher noises x0 at integer times t ∈ {0, …, T−1} as x_t = a_t x0 + s_t ε with a_t = √ᾱ_t and
s_t = √(1 − ᾱ_t), and predicts ε. In EDM form the same point is x = x_t / a_t = x0 + σ_t ε with
σ_t = s_t / a_t, so

    D(x; σ_t, c) = (x_t − s_t ε_θ(x_t, t, c)) / a_t,   x_t = a_t x = x / √(σ_t² + 1),

which is diffusers' `DDPMScheduler.step(...).pred_original_sample` (SiD-LSG's x0-prediction): EDM's c_in =
1/√(σ² + 1), c_skip = 1, c_out = −σ, and c_noise = t. σ enters through the grid of the teacher's
`scheduler_config.json`: the network runs at the integer t whose σ_t is nearest to σ (in log σ), exact for
σ on the grid, which is where SiD-LSG evaluates it (training times and t_init).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# diffusers' DDPMScheduler defaults for the entries that shape ᾱ_t and the x0-prediction.
_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
                 trained_betas=None, prediction_type='epsilon', clip_sample=True, thresholding=False,
                 rescale_betas_zero_snr=False)
_SCHEDULES = ('linear', 'scaled_linear')


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
  """ᾱ_t of a DDPM teacher (float32 as diffusers computes it) and the EDM noise levels of its grid."""
  alphas_cumprod: np.ndarray   # [T] float32

  @property
  def num_timesteps(self) -> int:
    return int(self.alphas_cumprod.shape[0])

  @property
  def sigmas(self) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), increasing in t (float32)."""
    ab = self.alphas_cumprod
    return np.sqrt((np.float32(1) - ab) / ab).astype(np.float32)

  def sigma(self, t: Any) -> Array:
    """σ_t for integer times t (any shape)."""
    return jnp.asarray(self.sigmas)[jnp.asarray(t)]

  def timestep(self, sigma: Array) -> Array:
    """The integer t whose σ_t is nearest to σ in log σ (int32, σ's shape): the number of log-midpoints of
    the grid below log σ (a binary search, which XLA does not try to constant-fold)."""
    log_grid = np.log(self.sigmas.astype(np.float64))
    midpoints = ((log_grid[1:] + log_grid[:-1]) / 2).astype(np.float32)
    log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))
    return jnp.searchsorted(jnp.asarray(midpoints), log_sigma).astype(jnp.int32)

  def nearest_timestep(self, sigma: Array) -> Array:
    """The integer t whose σ_t is nearest to σ itself (|σ_t − σ|, as EDM's iDDPM `round_sigma`), int32: the
    number of midpoints (σ_t + σ_{t+1})/2 of the grid below σ. σ under σ_0 gives 0, over σ_{T−1} gives T − 1."""
    grid = self.sigmas.astype(np.float64)
    midpoints = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    return jnp.searchsorted(jnp.asarray(midpoints), jnp.asarray(sigma, jnp.float32)).astype(jnp.int32)


def from_scheduler_config(config: Mapping[str, Any], x0_clipping: bool = True) -> DiscreteSchedule:
  """The schedule of a diffusers `scheduler_config.json` read the way SiD-LSG reads it (`DDPMScheduler`'s
  fields, whatever the stored `_class_name`: SD folders ship a PNDMScheduler config).

  Refused, each in one line naming the entry: prediction types other than ε (v-prediction teachers such as
  SD2.1-768 are a different loss), `clip_sample` / `thresholding` of the x0-prediction (on in
  DDPMScheduler's defaults, off in every SD config), zero-terminal-SNR rescaling and other β schedules.
  `x0_clipping=False` reads only ᾱ_t and the prediction type, for teachers whose denoiser is not
  DDPMScheduler's x0-prediction (PixArt's folders ship a DPMSolverMultistepScheduler config without
  `clip_sample`, which DDPMScheduler's default would turn on).
  """
  values = dict(_DEFAULTS)
  values.update({k: v for k, v in config.items() if k in _DEFAULTS})
  if not x0_clipping:
    values.update(clip_sample=False, thresholding=False)
  for key, off in (('clip_sample', False), ('thresholding', False), ('rescale_betas_zero_snr', False)):
    if bool(values[key]) != off:
      raise ValueError(f'scheduler config: unsupported {key}={values[key]!r} (the x0-prediction is used '
                       'unclipped, as in Stable Diffusion\'s configs)')
  if values['prediction_type'] != 'epsilon':
    raise ValueError(f"scheduler config: unsupported prediction_type={values['prediction_type']!r} "
                     "(only ε-prediction teachers)")
  n = int(values['num_train_timesteps'])
  if values['trained_betas'] is not None:
    betas = np.asarray(values['trained_betas'], np.float32)
    if betas.shape != (n,):
      raise ValueError(f'scheduler config: trained_betas has {betas.size} entries, num_train_timesteps is {n}')
  elif values['beta_schedule'] == 'linear':
    betas = np.linspace(values['beta_start'], values['beta_end'], n).astype(np.float32)
  elif values['beta_schedule'] == 'scaled_linear':
    betas = np.square(np.linspace(values['beta_start'] ** 0.5, values['beta_end'] ** 0.5, n).astype(np.float32))
  else:
    raise ValueError(f"scheduler config: unsupported beta_schedule={values['beta_schedule']!r} "
                     f"(supported: {', '.join(_SCHEDULES)})")
  alphas_cumprod = np.cumprod(np.float32(1) - betas, dtype=np.float32)
  return DiscreteSchedule(alphas_cumprod)


def edm_denoise(network: nn.Module, schedule: DiscreteSchedule, variables: dict, x: Array, sigma: Array,
                condition: Array) -> Array:
  """D(x; σ, c) of an ε-prediction network `network.apply(variables, x_t, t, condition) -> ε` (NHWC)."""
  n = x.shape[0]
  t = schedule.timestep(jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,)))
  ab = jnp.asarray(schedule.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
  a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
  x_t = a * x.astype(jnp.float32)
  eps = network.apply(variables, x_t, t, condition).astype(jnp.float32)
  return (x_t - s * eps) / a
