"""SongUNet / DhariwalUNet: raw U-Net outputs, SiDA encoder logits, architecture sizes, label dropout."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_files
from sida_jax.models import convert, registry
from sida_jax.models.edm import unets as edm

NETWORK_CASES = fixture_files('edm', '*_kwargs.json', exclude='block_*')


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _load(kwargs_path):
  stem = kwargs_path.name[:-len('_kwargs.json')]
  kwargs = json.loads(kwargs_path.read_text())
  module = registry.build_network(kwargs['class_name'], kwargs['init_kwargs'])
  state = dict(np.load(kwargs_path.with_name(f'{stem}_state.npz')))
  return kwargs, module, convert.variables_from_state_dict(module, state), np.load(
      kwargs_path.with_name(f'{stem}_io.npz'))


def _case(io, case):
  get = lambda key: io[f'{case}/{key}'] if f'{case}/{key}' in io else None
  return _nhwc(io[f'{case}/x']), io[f'{case}/sigma'], get('class_labels'), get('augment_labels')


def _random_variables(module, seed, std=0.05):
  """N(0, std^2) values in the shape of `module`'s variables (cheap: no compiled init)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda leaf: jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype),
                                convert.variables_template(module))


def _rel_err(actual, ref):
  return np.abs(np.asarray(actual) - np.asarray(ref)).max() / np.abs(ref).max()


@pytest.mark.fixtures
@pytest.mark.parametrize('kwargs_path', NETWORK_CASES)
def test_raw_unet_output(kwargs_path):
  """The U-Net alone, fed c_in x and c_noise, reproduces the stored F."""
  kwargs, module, variables, io = _load(kwargs_path)
  cases = [c for c in kwargs['case_names'] if f'{c}/F' in io]
  assert cases, 'no case stores F'
  for case in cases:
    x, sigma, labels, augment = _case(io, case)
    c = module.coefficients(jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1, 1))
    unet_variables = {col: tree['model'] for col, tree in variables.items()}
    f_x = jax.jit(module.model.apply)(unet_variables, c.c_in * x, c.c_noise.reshape(-1), labels, augment)
    assert _rel_err(f_x, _nhwc(io[f'{case}/F'])) <= 1e-5


@pytest.mark.fixtures
@pytest.mark.parametrize('kwargs_path', NETWORK_CASES)
def test_encoder_modes_agree(kwargs_path):
  """'encoder' logits equal 'encoder_decoder' logits; its D equals 'decoder' D; logit shape rule."""
  kwargs, module, variables, io = _load(kwargs_path)
  x, sigma, labels, augment = _case(io, kwargs['case_names'][0])

  @jax.jit
  def run_all_modes(variables, *inputs):
    return {flag: module.apply(variables, *inputs, return_flag=flag) for flag in edm.RETURN_FLAGS}

  outputs = run_all_modes(variables, x, sigma, labels, augment)
  d_x, logits = outputs['encoder_decoder']
  np.testing.assert_array_equal(d_x, outputs['decoder'])
  np.testing.assert_allclose(outputs['encoder'], logits, rtol=0, atol=1e-6 * np.abs(logits).max())
  init = kwargs['init_kwargs']
  lowest = init['img_resolution'] >> (len(init['channel_mult']) - 1)
  assert logits.shape == (x.shape[0], lowest, lowest, 1) and logits.dtype == jnp.float32


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', fixture_files('sid', '*_step_io.npz'))
def test_fake_score_phase_outputs_match_official(io_path):
  """The fake score network of a recorded SiD/SiDA step, still the teacher when the fake phase calls it.

  Per the fixtures README it is a copy of the teacher called (dropout 0) on the fake input, SiDA in
  'encoder_decoder' mode and then in 'encoder' mode on the real input (its logits), before its Adam step.
  SiD calls it without augment labels, SiDA with zeros: the same output, as map_augment has no bias.
  """
  meta = json.loads(io_path.with_name(io_path.name.replace('_step_io.npz', '_step_meta.json')).read_text())
  io = np.load(io_path)
  init_kwargs = {k: v for k, v in meta['network_kwargs'].items() if k != 'class_name'}
  module = registry.build_network(meta['network_class'], init_kwargs)
  stem = meta['teacher_pickle'][:-len('.pkl')]
  state = dict(np.load(io_path.parent.parent / 'edm' / f'{stem}_state.npz'))
  variables = convert.variables_from_state_dict(module, state)
  labels = io['fake_phase/class_labels'] if init_kwargs.get('label_dim') else None
  sigma = io['fake_phase/sigma']
  augment = (np.zeros((sigma.shape[0], init_kwargs['augment_dim']), np.float32)
             if init_kwargs.get('augment_dim') else None)
  d_x, logit_fake = module.apply(variables, _nhwc(io['fake_phase/fake_score_input_x']), sigma, labels,
                                 augment, return_flag='encoder_decoder')
  assert _rel_err(d_x, _nhwc(io['fake_phase/fake_score_output'])) <= 1e-5
  if 'fake_phase/logit_fake' in io:
    assert _rel_err(logit_fake, _nhwc(io['fake_phase/logit_fake'])) <= 1e-5
    logit_real = module.apply(variables, _nhwc(io['fake_phase/fake_score_real_input_x']), sigma, labels,
                              augment, return_flag='encoder')
    assert _rel_err(logit_real, _nhwc(io['fake_phase/logit_real'])) <= 1e-5
  else:
    assert not meta['hyperparameters'].get('use_gan', False)


def _cifar10_ddpmpp(**overrides):
  kwargs = dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, model_type='SongUNet',
                embedding_type='positional', encoder_type='standard', decoder_type='standard',
                channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)
  return registry.build_network('EDMPrecond', dict(kwargs, **overrides))


def test_cifar10_ddpmpp_parameter_count():
  """The SiD/EDM CIFAR-10 DDPM++ teacher has 55.7M parameters (checked abstractly, no allocation)."""
  template = convert.variables_template(_cifar10_ddpmpp())
  assert round(convert.count_params(template) / 1e6, 1) == 55.7
  assert 'buffers' not in template
  assert template['params']['model']['enc.16x16_block0']['qkv']['weight'].shape == (768, 256, 1, 1)


def test_skip_encoder_and_decoder_follow_the_official_layout():
  """Encoder/decoder type 'skip' (no fixture): aux paths with the official names, shapes and buffers."""
  module = _cifar10_ddpmpp(model_channels=8, num_blocks=1, channel_mult=[1, 2], img_resolution=8,
                           attn_resolutions=[], embedding_type='fourier', channel_mult_noise=2,
                           resample_filter=[1, 3, 3, 1], encoder_type='skip', decoder_type='skip')
  variables = _random_variables(module, 0)
  shapes = {name: value.shape for name, value in
            convert.state_dict_from_variables(module, variables).items()}
  assert shapes['model.map_noise.freqs'] == (8,)
  assert shapes['model.enc.4x4_aux_skip.weight'] == (8, 3, 1, 1)
  for res, channels in ((4, 16), (8, 8)):
    assert shapes[f'model.dec.{res}x{res}_aux_conv.weight'] == (3, channels, 3, 3)
  # Kernel-0 resamplers have a filter buffer but no weight.
  for name in ('enc.4x4_aux_down', 'dec.8x8_aux_up'):
    assert shapes[f'model.{name}.resample_filter'] == (1, 1, 4, 4)
    assert f'model.{name}.weight' not in shapes
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  d_x = jax.jit(module.apply)(variables, x, jnp.array([0.5, 5.0]), jnp.eye(10)[:2], jnp.zeros((2, 9)))
  assert d_x.shape == x.shape and bool(jnp.all(jnp.isfinite(d_x)))


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_label_dropout_drops_whole_labels(model_type):
  """label_dropout=1 in training mode equals calling with all-zero labels; eval mode keeps labels."""
  kwargs = dict(img_resolution=8, img_channels=3, label_dim=4, model_type=model_type, model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
  module = registry.build_network('EDMPrecond', kwargs)
  dropping = registry.build_network('EDMPrecond', dict(kwargs, label_dropout=1.0))
  variables = _random_variables(module, 0, std=0.5)  # large enough for the labels to matter
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  sigma, labels = jnp.array([0.3, 3.0]), jnp.eye(4)[:2]
  apply, apply_dropping = jax.jit(module.apply), jax.jit(dropping.apply, static_argnames='train')
  dropped = apply_dropping(variables, x, sigma, labels, train=True, rngs={'dropout': jax.random.key(2)})
  unlabelled = apply(variables, x, sigma, jnp.zeros_like(labels))
  np.testing.assert_allclose(dropped, unlabelled, rtol=0, atol=1e-6 * np.abs(unlabelled).max())
  kept = apply_dropping(variables, x, sigma, labels)
  np.testing.assert_array_equal(kept, apply(variables, x, sigma, labels))
  assert np.abs(np.asarray(kept) - np.asarray(dropped)).max() > 1e-2 * np.abs(kept).max()


def test_invalid_architecture_options_are_rejected():
  with pytest.raises(ValueError, match="'wavelet'"):
    convert.variables_template(_cifar10_ddpmpp(embedding_type='wavelet'))
  with pytest.raises(ValueError, match="'residual'"):
    convert.variables_template(_cifar10_ddpmpp(decoder_type='residual'))


def test_encoder_logits_helper_is_channel_mean():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6)).astype(jnp.bfloat16)
  logits = edm.encoder_logits(x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits[..., 0], np.asarray(x, np.float32).mean(-1), rtol=1e-6)


def _residual_bytes(fn, variables):
  """Bytes autodiff keeps for the backward pass of fn (the residuals of jax.vjp, traced only)."""
  residuals = jax.eval_shape(lambda v: jax.vjp(fn, v)[1], variables)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals))


def _remat_case(model_type):
  kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, model_type=model_type, model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.3)
  module = registry.build_network('EDMPrecond', kwargs)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  sigma = jnp.array([0.5, 3.0])

  def loss_fn(network):
    def loss(variables):
      out = network.apply(variables, x, sigma, None, None, train=True, rngs={'dropout': jax.random.key(2)})
      return jnp.sum(out ** 2)
    return loss
  return module, registry.with_block_remat(module), loss_fn


@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_block_remat_keeps_the_variables_and_keeps_fewer_bytes_for_the_backward_pass(model_type):
  module, remat, loss_fn = _remat_case(model_type)
  assert remat.model.remat_blocks and not module.model.remat_blocks
  template = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), convert.variables_template(m))
  assert template(remat) == template(module)
  variables = jax.eval_shape(lambda: _random_variables(module, 0))
  assert _residual_bytes(loss_fn(remat), variables) < 0.7 * _residual_bytes(loss_fn(module), variables)


@pytest.mark.slow
def test_block_remat_keeps_outputs_and_gradients():
  """remat_blocks (config.remat='blocks'): the same loss and gradients in train mode (dropout masks are
  replayed in the recomputation)."""
  module, remat, loss_fn = _remat_case('SongUNet')
  variables = _random_variables(module, 0, std=0.2)
  plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss_fn(module)))(variables)
  remat_loss, remat_grads = jax.jit(jax.value_and_grad(loss_fn(remat)))(variables)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max() + 1e-30))
