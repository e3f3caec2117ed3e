"""PixArt in EDM form (models/t2i/iddpm.py): D(x; σ, c) = x − σ·ε_θ(x/√(σ² + 1), t(σ), c)[:C] against diffusers'
transformer (reference data of tests/data/t2i/make_pixart_pipeline.py) and against our DiT's own output, the
rounding of σ to the scheduler's grid, and PixArt's DPM-Solver scheduler config."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax.formats import pretrained
from sida_jax.models.t2i import ddpm, iddpm

DATA = pathlib.Path(__file__).resolve().parent / 'data' / 't2i'
PIPE = DATA / 'tiny-pixart'


@pytest.fixture(scope='module')
def transformer():
  return pretrained.load_network(str(PIPE / 'transformer'))


@pytest.fixture(scope='module')
def schedule():
  config = json.loads((PIPE / 'scheduler' / 'scheduler_config.json').read_text())
  return ddpm.from_scheduler_config(config, x0_clipping=False)


def _grid64():
  betas = np.linspace(0.0001, 0.02, 1000).astype(np.float32)
  alphas = np.cumprod(np.float32(1) - betas, dtype=np.float32).astype(np.float64)
  return np.sqrt((1 - alphas) / alphas)


def test_pixart_scheduler_config_gives_the_linear_grid(schedule):
  np.testing.assert_allclose(schedule.sigmas, _grid64(), rtol=2e-6)
  np.testing.assert_allclose(schedule.sigmas[[0, -1]], [0.0100013, 157.4073], rtol=1e-5)   # the range docs quote
  # Read as SiD-LSG reads SD configs (DDPMScheduler, whose default clips x0), the config is refused by name.
  config = json.loads((PIPE / 'scheduler' / 'scheduler_config.json').read_text())
  with pytest.raises(ValueError, match='clip_sample=True'):
    ddpm.from_scheduler_config(config)


def test_sigma_rounds_to_the_nearest_level_in_sigma(schedule):
  grid = schedule.sigmas.astype(np.float64)
  rng = np.random.default_rng(0)
  sigma = np.concatenate([np.exp(rng.uniform(np.log(1e-3), np.log(1e3), 4000)), grid,
                          [0.01, 2.5, 156.6155]]).astype(np.float32)
  expected = np.abs(grid[None, :] - sigma.astype(np.float64)[:, None]).argmin(axis=1)
  got = np.asarray(jax.jit(schedule.nearest_timestep)(sigma))
  # Exact except within float32 rounding of a midpoint.
  mid = np.abs(np.abs(grid[expected] - sigma) - np.abs(grid[got] - sigma)) < 1e-6 * sigma
  assert np.all((got == expected) | mid) and np.mean(got == expected) > 0.999
  np.testing.assert_array_equal(got[4000:4000 + grid.size], np.arange(grid.size))   # grid points map to themselves
  assert got[-3] == 0 and got[-1] in (998, 999)
  # Not the log-σ rounding of SD's x0-prediction: they differ between the two midpoints.
  assert np.any(np.asarray(schedule.timestep(sigma)) != got)


def test_matches_diffusers_transformer_preconditioned_by_hand(transformer, schedule):
  ref = np.load(DATA / 'pixart_edm_reference.npz')
  condition = iddpm.text_condition(jnp.asarray(ref['embedding']), jnp.asarray(ref['mask']))
  np.testing.assert_array_equal(schedule.nearest_timestep(ref['sigma']), ref['timestep'])
  denoised = iddpm.edm_denoise(transformer.module, schedule, transformer.variables, jnp.asarray(ref['x']),
                               jnp.asarray(ref['sigma']), condition)
  scale = np.abs(ref['denoised']).max(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(denoised / scale, ref['denoised'] / scale, atol=2e-5)


def test_is_the_direct_computation_from_the_dit_output(transformer, schedule):
  """c_skip = 1, c_out = −σ at the unrounded σ, c_in = 1/√(σ² + 1), t the nearest level, the ε half kept."""
  rng = np.random.default_rng(3)
  n = 5
  sigma = np.array([0.02, 0.7, 2.5, 33.0, 140.0], np.float32)
  x = (rng.standard_normal((n, 8, 8, 4)) * np.sqrt(sigma ** 2 + 0.25)[:, None, None, None]).astype(np.float32)
  emb = rng.standard_normal((n, 7, 16)).astype(np.float32)
  mask = (np.arange(7)[None] < np.array([[1], [3], [7], [5], [2]])).astype(np.int32)
  t = np.abs(_grid64()[None, :] - sigma[:, None]).argmin(axis=1)
  x_in = x / np.sqrt(sigma.astype(np.float64) ** 2 + 1)[:, None, None, None]
  out = np.asarray(transformer.module.apply(transformer.variables, jnp.asarray(x_in, jnp.float32), jnp.asarray(t),
                                            jnp.asarray(emb), jnp.asarray(mask)), np.float64)
  assert out.shape == (n, 8, 8, 8)
  expected = x - sigma[:, None, None, None].astype(np.float64) * out[..., :4]
  got = iddpm.edm_denoise(transformer.module, schedule, transformer.variables, jnp.asarray(x), jnp.asarray(sigma),
                          iddpm.text_condition(jnp.asarray(emb), jnp.asarray(mask)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # The variance half and the mask both matter (the test would notice either being dropped).
  assert np.abs(out[..., 4:] - out[..., :4]).max() > 0.1
  unmasked = iddpm.edm_denoise(transformer.module, schedule, transformer.variables, jnp.asarray(x),
                               jnp.asarray(sigma), iddpm.text_condition(jnp.asarray(emb), jnp.ones_like(mask)))
  assert np.abs(np.asarray(unmasked) - np.asarray(got)).max() > 1e-3
  # A scalar σ is every sample's.
  same = iddpm.edm_denoise(transformer.module, schedule, transformer.variables, jnp.asarray(x), 2.5,
                           iddpm.text_condition(jnp.asarray(emb), jnp.asarray(mask)))
  full = iddpm.edm_denoise(transformer.module, schedule, transformer.variables, jnp.asarray(x),
                           jnp.full((n,), 2.5), iddpm.text_condition(jnp.asarray(emb), jnp.asarray(mask)))
  np.testing.assert_array_equal(same, full)


def test_preconditioning_coefficients():
  c_skip, c_out, c_in = iddpm.preconditioning(jnp.asarray([0.5, 2.5]))
  np.testing.assert_allclose(c_skip, [1, 1])
  np.testing.assert_allclose(c_out, [-0.5, -2.5])
  np.testing.assert_allclose(c_in, [1 / np.sqrt(1.25), 1 / np.sqrt(7.25)], rtol=1e-6)
