"""The DDPM-form wrapper: ᾱ_t of SD's scheduler against diffusers, σ ↔ t, D(x; σ) = x0-prediction in closed form,
and the refused scheduler settings."""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax.models.t2i import ddpm

DATA = pathlib.Path(__file__).resolve().parent / 'data' / 't2i'
# SD1.5 / SD2.1-base scheduler_config.json (a PNDMScheduler config; SiD-LSG reads it as a DDPMScheduler).
SD_SCHEDULER = {'_class_name': 'PNDMScheduler', 'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
                'beta_start': 0.00085, 'clip_sample': False, 'num_train_timesteps': 1000,
                'prediction_type': 'epsilon', 'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1,
                'trained_betas': None}


class LinearEps(nn.Module):
  """ε(x_t, t, c) = w·x_t + t/1000 + mean over tokens of c (c's width = channels)."""

  @nn.compact
  def __call__(self, x_t, t, condition):
    w = self.param('w', nn.initializers.constant(0.3), ())
    return w * x_t + t.reshape(-1, 1, 1, 1) / 1000 + condition.mean(axis=1)[:, None, None, :]


def test_sd_schedule_matches_diffusers():
  schedule = ddpm.from_scheduler_config(SD_SCHEDULER)
  reference = np.load(DATA / 'lsg_reference.npz')['sd_alphas_cumprod']   # diffusers DDPMScheduler, float32
  assert schedule.num_timesteps == 1000 and schedule.alphas_cumprod.dtype == np.float32
  np.testing.assert_allclose(schedule.alphas_cumprod, reference, rtol=2e-6)
  # Independent closed form: β_t = (√β0 + t/999 (√β1 − √β0))², ᾱ_t = Π(1 − β).
  t = np.arange(1000)
  betas = (np.sqrt(0.00085) + t / 999 * (np.sqrt(0.012) - np.sqrt(0.00085))) ** 2
  np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  sigmas = schedule.sigmas
  assert np.all(np.diff(sigmas) > 0)
  np.testing.assert_allclose(sigmas[625], np.sqrt((1 - reference[625]) / reference[625]), rtol=1e-6)
  linear = ddpm.from_scheduler_config({'beta_schedule': 'linear', 'clip_sample': False})
  np.testing.assert_allclose(linear.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)


def test_timestep_of_sigma_is_exact_on_the_grid():
  schedule = ddpm.from_scheduler_config(SD_SCHEDULER)
  t = np.arange(1000)
  np.testing.assert_array_equal(schedule.timestep(schedule.sigma(t)), t)
  between = np.sqrt(schedule.sigmas[:-1] * schedule.sigmas[1:]) * 0.999   # just below the log midpoint
  np.testing.assert_array_equal(schedule.timestep(jnp.asarray(between)), t[:-1])


def test_edm_denoise_is_the_x0_prediction():
  schedule = ddpm.from_scheduler_config(SD_SCHEDULER)
  net = LinearEps()
  variables = {'params': {'w': jnp.asarray(0.3)}}
  rng = np.random.default_rng(0)
  t = np.array([20, 625, 979])
  x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  noise = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  condition = rng.standard_normal((3, 5, 2)).astype(np.float32)
  ab = schedule.alphas_cumprod[t].astype(np.float64).reshape(-1, 1, 1, 1)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise                        # DDPM: add_noise
  eps = 0.3 * x_t + t.reshape(-1, 1, 1, 1) / 1000 + condition.mean(axis=1)[:, None, None, :]
  expected = (x_t - np.sqrt(1 - ab) * eps) / np.sqrt(ab)                   # step(...).pred_original_sample
  sigma = schedule.sigma(t)
  x = x0 + np.asarray(sigma).reshape(-1, 1, 1, 1) * noise                 # the same point in EDM form
  out = jax.jit(lambda x, s: ddpm.edm_denoise(net, schedule, variables, x, s, condition))(x, sigma)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('entry,message', [
    ({'prediction_type': 'v_prediction'}, "unsupported prediction_type='v_prediction'"),
    ({'clip_sample': True}, 'unsupported clip_sample=True'),
    ({'thresholding': True}, 'unsupported thresholding=True'),
    ({'beta_schedule': 'squaredcos_cap_v2'}, "unsupported beta_schedule='squaredcos_cap_v2'"),
    ({'trained_betas': [0.1, 0.2]}, 'trained_betas has 2 entries, num_train_timesteps is 1000'),
])
def test_refused_scheduler_settings(entry, message):
  with pytest.raises(ValueError, match=message):
    ddpm.from_scheduler_config(dict(SD_SCHEDULER, **entry))


def test_a_config_without_clip_sample_gets_ddpms_default_and_is_refused():
  with pytest.raises(ValueError, match='clip_sample=True'):
    ddpm.from_scheduler_config({k: v for k, v in SD_SCHEDULER.items() if k != 'clip_sample'})


def test_trained_betas():
  betas = np.linspace(0.001, 0.01, 10)
  schedule = ddpm.from_scheduler_config({'trained_betas': list(betas), 'num_train_timesteps': 10,
                                         'clip_sample': False})
  np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
