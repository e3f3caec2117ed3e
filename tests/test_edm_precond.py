"""EDM / VP / VE preconditioners: official network outputs, coefficient formulas, sigma shapes, bf16."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_files
from sida_jax.models import convert, registry
from sida_jax.models.edm import precond

NETWORK_CASES = fixture_files('edm', '*_io.npz', exclude='block_*')


def _load(io_path):
  stem = io_path.name[:-len('_io.npz')]
  kwargs = json.loads(io_path.with_name(f'{stem}_kwargs.json').read_text())
  module = registry.build_network(kwargs['class_name'], kwargs['init_kwargs'])
  state = dict(np.load(io_path.with_name(f'{stem}_state.npz')))
  return kwargs, module, convert.variables_from_state_dict(module, state), np.load(io_path)


def _case_inputs(io, case):
  get = lambda key: io[f'{case}/{key}'] if f'{case}/{key}' in io else None
  return (io[f'{case}/x'].transpose(0, 2, 3, 1), io[f'{case}/sigma'], get('class_labels'),
          get('augment_labels'))


def _assert_close_to_scale(actual, ref, rtol):
  actual, ref = np.asarray(actual), np.asarray(ref)
  assert actual.shape == ref.shape
  err = np.abs(actual - ref).max() / np.abs(ref).max()
  assert err <= rtol, f'max abs error {err:.3g} x max|ref| exceeds {rtol}'


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', NETWORK_CASES)
def test_official_outputs(io_path):
  """Every stored case (per-sample, scalar sigma, labels None, augment absent) reproduces D and c_noise."""
  kwargs, module, variables, io = _load(io_path)
  apply = jax.jit(module.apply)
  assert kwargs['case_names'], 'no case listed'
  for case in kwargs['case_names']:
    x, sigma, labels, augment = _case_inputs(io, case)
    d_x = apply(variables, x, sigma, labels, augment)
    _assert_close_to_scale(d_x, io[f'{case}/D'].transpose(0, 2, 3, 1), 1e-5)
    coefficients = module.coefficients(jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1, 1))
    _assert_close_to_scale(coefficients.c_noise.reshape(-1), io[f'{case}/c_noise'], 1e-6)


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', NETWORK_CASES[:1])
def test_sigma_shapes_agree(io_path):
  """sigma as [N], [N, 1, 1, 1] and (when constant) a scalar gives the same D."""
  kwargs, module, variables, io = _load(io_path)
  apply = jax.jit(module.apply)
  x, sigma, labels, augment = _case_inputs(io, kwargs['case_names'][0])
  reference = apply(variables, x, sigma, labels, augment)
  np.testing.assert_array_equal(apply(variables, x, sigma.reshape(-1, 1, 1, 1), labels, augment),
                                reference)
  constant = apply(variables, x, np.float32(sigma[1]), labels, augment)
  per_sample = apply(variables, x, np.full_like(sigma, sigma[1]), labels, augment)
  np.testing.assert_allclose(constant, per_sample, rtol=0, atol=1e-6 * np.abs(per_sample).max())


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', NETWORK_CASES)
def test_bfloat16_compute_is_close_to_float32(io_path):
  """dtype=bfloat16 runs the U-Net body in bfloat16 (attention, FIR resampling) with float32 outputs."""
  kwargs, module, variables, io = _load(io_path)
  low = registry.build_network(kwargs['class_name'], kwargs['init_kwargs'], dtype=jnp.bfloat16)
  x, sigma, labels, augment = _case_inputs(io, kwargs['case_names'][0])
  d32 = jax.jit(module.apply)(variables, x, sigma, labels, augment)
  d16, logits = jax.jit(functools.partial(low.apply, return_flag='encoder_decoder'))(
      variables, x, sigma, labels, augment)
  assert d16.dtype == jnp.float32 and logits.dtype == jnp.float32
  _assert_close_to_scale(d16, d32, 3e-2)
  assert np.abs(np.asarray(d16) - np.asarray(d32)).max() > 0  # really ran in bfloat16


def test_edm_coefficients_closed_form():
  sigma = np.array([0.002, 0.3, 1.0, 80.0])
  sd = 0.7
  c = precond.edm_coefficients(jnp.asarray(sigma, jnp.float32), sd)
  np.testing.assert_allclose(c.c_skip, sd ** 2 / (sigma ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c.c_out, sigma * sd / np.sqrt(sigma ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c.c_in, 1 / np.sqrt(sigma ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c.c_noise, np.log(sigma) / 4, rtol=1e-6)
  # EDM's identity between the skip and output scalings.
  np.testing.assert_allclose(np.square(c.c_out), c.c_skip * sigma ** 2, rtol=1e-5)


def test_vp_and_ve_coefficients_closed_form():
  t = np.array([0.01, 0.1, 0.5, 1.0])
  sigma = np.sqrt(np.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
  np.testing.assert_allclose(precond.vp_sigma(jnp.asarray(t, jnp.float32)), sigma, rtol=1e-5)
  c = precond.vp_coefficients(jnp.asarray(sigma, jnp.float32))
  np.testing.assert_allclose(c.c_noise, 999 * t, rtol=2e-4)
  np.testing.assert_allclose(c.c_in, 1 / np.sqrt(sigma ** 2 + 1), rtol=1e-6)
  np.testing.assert_allclose(c.c_out, -sigma, rtol=1e-6)
  c = precond.ve_coefficients(jnp.asarray(sigma, jnp.float32))
  np.testing.assert_allclose(c.c_noise, np.log(sigma / 2), rtol=1e-5)
  assert c.c_skip == 1.0 and c.c_in == 1.0


def test_noise_range_attributes():
  kwargs = dict(img_resolution=8, img_channels=3, model_type='SongUNet')
  vp = registry.build_network('VPPrecond', kwargs)
  np.testing.assert_allclose(vp.sigma_min, np.sqrt(np.expm1(0.5 * 19.9e-10 + 1e-6)), rtol=1e-5)
  np.testing.assert_allclose(vp.sigma_max, np.sqrt(np.exp(0.5 * 19.9 + 0.1) - 1), rtol=1e-5)
  ve = registry.build_network('VEPrecond', kwargs)
  assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
  edm = registry.build_network('EDMPrecond', dict(kwargs, sigma_data=0.6))
  assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.0, np.inf, 0.6)


def test_unknown_return_flag_is_rejected():
  module = registry.build_network('EDMPrecond', dict(img_resolution=8, img_channels=3, model_type='SongUNet'))
  with pytest.raises(ValueError, match="'logits'"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), *convert.example_inputs(module),
                                       return_flag='logits'))


def _official_gdd_forward(unet_fn, x, sigma, eps=2e-3, sigma_data=0.5):
  """Zyriix/GDD `GDDPrecond.forward` in numpy (float64 coefficients): D = c_skip x + c_out F(c_in x; c_noise)."""
  sigma = np.asarray(sigma, np.float64).reshape(-1, 1, 1, 1)
  c_skip = sigma_data ** 2 / ((sigma - eps) ** 2 + sigma_data ** 2)
  c_out = (sigma - eps) * sigma_data / np.sqrt(sigma ** 2 + sigma_data ** 2)
  c_in = 1 / np.sqrt(sigma_data ** 2 + sigma ** 2)
  c_noise = np.log(sigma) / 4
  f_x = np.asarray(unet_fn((c_in * x).astype(np.float32), c_noise.reshape(-1).astype(np.float32)), np.float64)
  return c_skip * x + c_out * f_x


def test_gdd_precond_on_a_ve_teachers_unet_matches_the_official_forward():
  """GDD's generator: the VE (NCSN++) teacher's U-Net and weights under GDDPrecond, called on 80·z at σ = 80
  (and elsewhere), against the official forward transcribed in numpy around the same U-Net."""
  kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', embedding_type='fourier',
                encoder_type='residual', decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9,
                dropout=0.0, sigma_min=0.02, sigma_max=100.0)
  teacher = registry.build_network('VEPrecond', kwargs)
  variables = convert.init_variables(teacher, jax.random.key(0))
  gdd_kwargs = registry.rewrap('VEPrecond', kwargs, 'GDDPrecond')
  assert 'sigma_min' not in gdd_kwargs and gdd_kwargs['model_type'] == 'SongUNet'
  generator = registry.build_network('GDDPrecond', gdd_kwargs)
  assert isinstance(generator, precond.GDDPrecond) and generator.epsilon == 0.002
  z = np.random.RandomState(0).standard_normal((3, 8, 8, 3)).astype(np.float32)
  sigma = np.array([80.0, 80.0, 2.5], np.float32)
  x = z * sigma.reshape(-1, 1, 1, 1)
  augment = np.zeros((3, 9), np.float32)
  ours = generator.apply(variables, x, sigma, None, augment)
  unet_variables = {collection: tree['model'] for collection, tree in variables.items()}
  unet = lambda x_in, c_noise: teacher.model.apply(unet_variables, x_in, c_noise, None, augment)
  _assert_close_to_scale(ours, _official_gdd_forward(unet, x.astype(np.float64), sigma), 1e-5)
  # At σ = 80 the output is essentially c_out·F (c_skip ≈ 3.9e-5), and not the teacher's own D = x + σ F(x).
  ve = teacher.apply(variables, x, sigma, None, augment)
  assert np.abs(np.asarray(ve) - np.asarray(ours)).max() > 0.1 * np.abs(np.asarray(ours)).max()


def test_gdd_coefficients_closed_form():
  sigma = np.array([0.002, 0.3, 1.0, 80.0])
  c = precond.gdd_coefficients(jnp.asarray(sigma, jnp.float32))
  np.testing.assert_allclose(c.c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c.c_out, (sigma - 0.002) * 0.5 / np.sqrt(sigma ** 2 + 0.25), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(c.c_in, 1 / np.sqrt(sigma ** 2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c.c_noise, np.log(sigma) / 4, rtol=1e-6)
  assert float(c.c_skip[0]) == 1.0 and float(c.c_out[0]) == 0.0   # D(x; ε) = x
