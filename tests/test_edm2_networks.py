"""EDM2 networks against the official PyTorch outputs, plus closed-form checks of force_normalize."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import fixture_files
from sida_jax.models.edm2 import convert as edm2_convert
from sida_jax.models.edm2 import networks as edm2

_BUFFER_NAMES = ('freqs', 'phases')


def _variables_from_state(state) -> dict:
  """A PyTorch state_dict (name → array) as {'params', 'buffers'}: split the names, transpose nothing."""
  params, buffers = {}, {}
  for name in state:
    target = buffers if name.rsplit('.', 1)[-1] in _BUFFER_NAMES else params
    target[tuple(name.split('.'))] = jnp.asarray(state[name])
  variables = {'params': traverse_util.unflatten_dict(params)}
  if buffers:
    variables['buffers'] = traverse_util.unflatten_dict(buffers)
  return variables


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep='.')


def _nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def _nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _assert_close(got, ref, rel=1e-5, what=''):
  """max|got − ref| ≤ rel · max|ref| (the fixtures README's "relative to scale")."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
  err = np.max(np.abs(got - ref))
  assert err <= rel * np.max(np.abs(ref)), f"{what}: max err {err:.3g} vs scale {np.max(np.abs(ref)):.3g}"


def _load_case(io_path):
  stem = io_path.name[:-len('_io.npz')]
  meta = json.loads((io_path.parent / f'{stem}_kwargs.json').read_text())
  return stem, meta, np.load(io_path)


def _precond_runner(module):
  """Jitted forward returning (outputs, c_noise handed to the U-Net, raw U-Net output F)."""

  def run(variables, x, sigma, labels, train):
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, edm2.UNet) and context.method_name == '__call__':
        seen['c_noise'], seen['F'] = args[1], out
      return out

    with nn.intercept_methods(interceptor):
      out = module.apply(variables, x, sigma, labels, train=train, return_logvar=True)
    return out, seen['c_noise'], seen['F']

  return jax.jit(run, static_argnums=4)


def _network_cases():
  return fixture_files('edm2', '*_io.npz', exclude='block_*')


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', _network_cases())
def test_state_names_shapes_and_count_match_init(io_path):
  stem, meta, _ = _load_case(io_path)
  module = edm2_convert.from_init_kwargs(meta['class_name'], meta['init_kwargs'])
  state = np.load(io_path.parent / f'{stem}_state_before.npz')
  res = module.img_resolution
  abstract = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, res, res, module.img_channels)), jnp.ones((1,)),
      jnp.zeros((1, module.label_dim))))
  init_flat = {f'{col}/{k}': v.shape for col in abstract for k, v in _flat(abstract[col]).items()}
  loaded = _variables_from_state(state)
  loaded_flat = {f'{col}/{k}': v.shape for col in loaded for k, v in _flat(loaded[col]).items()}
  assert init_flat == loaded_flat
  num_params = sum(int(np.prod(s)) for k, s in init_flat.items() if k.startswith('params/'))
  assert num_params == meta['construction']['num_parameters']


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', _network_cases())
def test_precond_eval_cases(io_path):
  stem, meta, io = _load_case(io_path)
  module = edm2_convert.from_init_kwargs(meta['class_name'], meta['init_kwargs'])
  variables = _variables_from_state(np.load(io_path.parent / f'{stem}_state_before.npz'))
  run = _precond_runner(module)
  assert meta['eval_case_names'], 'no case listed'
  for case in meta['eval_case_names']:
    labels = io[f'{case}/class_labels'] if f'{case}/class_labels' in io else None
    (d, logvar), c_noise, f = run(variables, _nhwc(io[f'{case}/x']), io[f'{case}/sigma'], labels, False)
    assert d.dtype == jnp.float32 and logvar.dtype == jnp.float32
    _assert_close(_nchw(d), io[f'{case}/D'], what=f'{case}/D')
    _assert_close(_nchw(f), io[f'{case}/F'], what=f'{case}/F')
    _assert_close(logvar, io[f'{case}/logvar'], what=f'{case}/logvar')
    _assert_close(c_noise, io[f'{case}/c_noise'], rel=1e-6, what=f'{case}/c_noise')
    if case == meta['eval_case_names'][0]:  # without return_logvar the same D comes back alone
      d_only = jax.jit(module.apply)(variables, _nhwc(io[f'{case}/x']), io[f'{case}/sigma'], labels)
      _assert_close(d_only, d, rel=1e-6, what=f'{case}/D without logvar')


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', _network_cases())
def test_precond_train_forward_is_double_normalisation(io_path):
  stem, meta, io = _load_case(io_path)
  module = edm2_convert.from_init_kwargs(meta['class_name'], meta['init_kwargs'])
  before = _variables_from_state(np.load(io_path.parent / f'{stem}_state_before.npz'))
  after_ref = np.load(io_path.parent / f'{stem}_state_after_train_forward.npz')
  run = _precond_runner(module)
  labels = io['train/class_labels'] if 'train/class_labels' in io else None  # unconditional: none passed
  x, sigma = _nhwc(io['train/x']), io['train/sigma']

  # The stored weights after one official train-mode forward = one projection of the weights before.
  step1_vars = edm2.force_normalize(before)
  after = _flat(step1_vars['params']) | _flat(step1_vars['buffers'])
  before_flat = _flat(before['params']) | _flat(before['buffers'])
  assert set(after) == set(after_ref.files)
  changed = sorted(k for k in after if not np.array_equal(np.asarray(after[k]), np.asarray(before_flat[k])))
  assert changed == sorted(meta['tensors_changed_by_train_forward'])
  for name in after_ref.files:
    _assert_close(after[name], after_ref[name], rel=1e-6, what=name)

  (d1, logvar1), c_noise1, f1 = run(step1_vars, x, sigma, labels, True)
  _assert_close(_nchw(d1), io['train/step1_D'], what='step1_D')
  _assert_close(_nchw(f1), io['train/step1_F'], what='step1_F')
  _assert_close(logvar1, io['train/step1_logvar'], what='step1_logvar')
  _assert_close(c_noise1, io['train/step1_c_noise'], rel=1e-6, what='step1_c_noise')

  (d2, logvar2), _, _ = run(edm2.force_normalize(step1_vars), x, sigma, labels, True)
  _assert_close(_nchw(d2), io['train/step2_D'], what='step2_D')
  _assert_close(logvar2, io['train/step2_logvar'], what='step2_logvar')

  # Eval forwards with the official stored weights and with our projection agree with the official one.
  after_keys = [k for k in io.files if k.endswith('/D_eval_after_one_train_forward')]
  assert after_keys
  for key in after_keys:
    case = key.split('/')[0]
    labels = io[f'{case}/class_labels'] if f'{case}/class_labels' in io else None
    for variables in (_variables_from_state(after_ref), step1_vars):
      (d_eval, _), _, _ = run(variables, _nhwc(io[f'{case}/x']), io[f'{case}/sigma'], labels, False)
      _assert_close(_nchw(d_eval), io[key], what=key)


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', fixture_files('edm2', 'block_*_io.npz'))
def test_block(io_path):
  stem, meta, io = _load_case(io_path)
  block = edm2.Block(**meta['init_kwargs'])
  # The official head count (our defaults for the kwargs left out must be the official ones).
  assert (block.out_channels // block.channels_per_head if block.attention else 0) == meta['num_heads']
  variables = _variables_from_state(np.load(io_path.parent / f'{stem}_state.npz'))
  y = jax.jit(block.apply)(variables, _nhwc(io['x']), jnp.asarray(io['emb']))
  _assert_close(_nchw(y), io['y'], what=stem)


def test_force_normalize_closed_form():
  rng = np.random.default_rng(0)
  eps = 1e-4
  tree = {'conv': {'weight': rng.normal(size=(6, 3, 3, 3)).astype(np.float32) * 3},
          'lin': {'weight': rng.normal(size=(5, 7)).astype(np.float32) * 0.2},
          'emb_gain': np.float32(0.7), 'freqs': rng.normal(size=(4,)).astype(np.float32)}
  once = edm2.force_normalize(tree)
  twice = edm2.force_normalize(once)
  for name in ('conv', 'lin'):
    w = tree[name]['weight'].astype(np.float64)
    rows = w.reshape(w.shape[0], -1)
    rms = np.linalg.norm(rows, axis=1) / np.sqrt(rows.shape[1])
    expect_once = rows / (eps + rms)[:, None]
    np.testing.assert_allclose(np.asarray(once[name]['weight']).reshape(rows.shape), expect_once, rtol=2e-6)
    # The projection is not idempotent: a second one rescales each row by 1/(eps + rms/(eps + rms)).
    rms1 = rms / (eps + rms)
    np.testing.assert_allclose(np.asarray(twice[name]['weight']).reshape(rows.shape),
                               expect_once / (eps + rms1)[:, None], rtol=2e-6)
    ratio = np.asarray(twice[name]['weight']) / np.asarray(once[name]['weight'])
    assert np.all(np.abs(ratio - 1) > 0.5 * eps)
    # Repeated projection converges to rows of RMS 1 − eps (the fixed point of r ↦ r/(eps + r)).
    w_k = once
    for _ in range(6):
      w_k = edm2.force_normalize(w_k)
    rows_k = np.asarray(w_k[name]['weight'], np.float64).reshape(rows.shape)
    np.testing.assert_allclose(np.linalg.norm(rows_k, axis=1) / np.sqrt(rows.shape[1]), 1 - eps, atol=2e-6)
  assert once['emb_gain'] is tree['emb_gain'] and once['freqs'] is tree['freqs']


def test_is_mpconv_weight():
  assert edm2.is_mpconv_weight('unet.enc.8x8_conv.weight')
  assert edm2.is_mpconv_weight(('logvar_linear', 'weight'))
  assert not edm2.is_mpconv_weight('unet.out_gain')
  assert not edm2.is_mpconv_weight('unet.emb_fourier.freqs')
  assert not edm2.is_mpconv_weight(())


def _tiny_precond(**overrides):
  kwargs = dict(img_resolution=8, img_channels=3, label_dim=5, model_channels=8, channel_mult=(1, 2),
                num_blocks=1, attn_resolutions=(4,), channels_per_head=8, logvar_channels=16)
  return edm2.Precond(**(kwargs | overrides))


def _tiny_setup(module, seed=0):
  """Inputs, and random variables with non-zero gains so every branch contributes (numpy: no init compile)."""
  rng = np.random.default_rng(seed)
  res, ch, dim = module.img_resolution, module.img_channels, module.label_dim
  x = jnp.asarray(rng.normal(size=(3, res, res, ch)), jnp.float32)
  sigma = jnp.asarray(np.exp(rng.normal(size=(3,))), jnp.float32)
  labels = jnp.asarray(np.eye(dim)[rng.integers(0, dim, size=3)], jnp.float32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), x, sigma, labels)
  variables = jax.tree.map(
      lambda leaf: jnp.asarray(rng.uniform(0.3, 1.0, leaf.shape) if leaf.ndim == 0
                               else rng.normal(size=leaf.shape), jnp.float32), abstract)
  return x, sigma, labels, variables


def _jit_apply(module):
  return jax.jit(module.apply, static_argnames=('train', 'return_flag', 'return_logvar'))


def test_return_flags_and_encoder_logits():
  module = _tiny_precond()
  x, sigma, labels, variables = _tiny_setup(module)

  @jax.jit
  def encoder_with_features(variables):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.module.name == 'enc' and context.method_name == '__call__':
        captured['enc_out'] = out[0]
      return out

    with nn.intercept_methods(interceptor):
      logits = module.apply(variables, x, sigma, labels, return_flag='encoder')
    return logits, captured['enc_out']

  logits, enc_out = encoder_with_features(variables)
  assert enc_out.shape == (3, 4, 4, 16)
  assert logits.shape == (3, 4, 4, 1) and logits.dtype == jnp.float32
  expect = np.mean(np.asarray(enc_out, np.float64), axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(logits), expect, rtol=1e-5, atol=1e-6)

  apply = _jit_apply(module)
  d = apply(variables, x, sigma, labels)
  d2, logits2 = apply(variables, x, sigma, labels, return_flag='encoder_decoder')
  d3, logits3, logvar = apply(variables, x, sigma, labels, return_flag='encoder_decoder', return_logvar=True)
  logits4, logvar4 = apply(variables, x, sigma, labels, return_flag='encoder', return_logvar=True)
  for a, b in [(d, d2), (d, d3), (logits, logits2), (logits, logits3), (logits, logits4), (logvar, logvar4)]:
    _assert_close(a, b, rel=1e-6)
  assert logvar.shape == (3, 1, 1, 1)
  with pytest.raises(ValueError, match='return_flag'):
    apply(variables, x, sigma, labels, return_flag='decode')


def test_dropout_and_label_dropout():
  module = _tiny_precond(dropout=0.5, label_dropout=1.0)
  plain = _tiny_precond()
  x, sigma, labels, variables = _tiny_setup(module)
  apply, apply_plain = _jit_apply(module), _jit_apply(plain)
  reference = apply_plain(variables, x, sigma, labels)
  # Eval mode ignores both dropouts: the plain network with the same weights is the reference.
  _assert_close(apply(variables, x, sigma, labels), reference, rel=1e-6)
  rngs = {'dropout': jax.random.key(3)}
  train_a = apply(variables, x, sigma, labels, train=True, rngs=rngs)
  train_b = apply(variables, x, sigma, labels, train=True, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_b))
  assert np.max(np.abs(np.asarray(train_a) - np.asarray(reference))) > 1e-3
  # label_dropout=1 drops every label: the same as the zero-label input, without dropout.
  labels_only = _tiny_precond(label_dropout=1.0)
  _assert_close(_jit_apply(labels_only)(variables, x, sigma, labels, train=True, rngs=rngs),
                apply_plain(variables, x, sigma, None, train=True), rel=1e-6)


def test_bfloat16_compute_matches_float32():
  module = _tiny_precond()
  x, sigma, labels, variables = _tiny_setup(module)
  d32, lv32 = _jit_apply(module)(variables, x, sigma, labels, return_logvar=True)
  d16, lv16 = _jit_apply(_tiny_precond(dtype=jnp.bfloat16))(variables, x, sigma, labels, return_logvar=True)
  assert d16.dtype == jnp.float32 and lv16.dtype == jnp.float32
  _assert_close(d16, d32, rel=5e-2, what='bf16 D')
  assert np.max(np.abs(np.asarray(d16) - np.asarray(d32))) > 1e-5  # the body really ran in bfloat16
  _assert_close(lv16, lv32, rel=1e-6, what='logvar')  # the logvar head stays float32


def test_from_init_kwargs_errors_and_variants():
  kwargs = dict(img_resolution=8, img_channels=4, label_dim=10, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], use_fp16=True)
  with pytest.raises(ValueError, match="unknown key 'bogus'"):
    edm2_convert.from_init_kwargs('training.networks_edm2.Precond', kwargs | {'bogus': 1})
  with pytest.raises(ValueError, match='unknown EDM2 class'):
    edm2_convert.from_init_kwargs('training.networks.EDMPrecond', kwargs)
  gen = edm2_convert.from_init_kwargs('sida_networks_edm2.EDM_2_Precond_Generator',
                                      kwargs | {'force_normalization': True, 'use_gan': True})
  x = jnp.zeros((1, 8, 8, 4))
  names = _flat(jax.eval_shape(lambda: gen.init(jax.random.key(0), x, jnp.ones(1)))['params'])
  assert not any(n.startswith('logvar') for n in names) and 'unet.out_conv.weight' in names
  unet = edm2_convert.from_init_kwargs('UNet', {k: v for k, v in kwargs.items() if k != 'use_fp16'})
  assert isinstance(unet, edm2.UNet) and unet.channel_mult == (1, 2)
  with pytest.raises(ValueError, match='unknown preset'):
    edm2.preset_config('xxxl')


# Published EDM2 ImageNet-512 sizes in millions of parameters (Karras et al. 2024, Table 2 "Mparams"; the
# edm2 README gives none, the SiD README quotes 125M/280M/498M/777M/1.1B/1.5B). Counted over all trainable
# parameters, logvar head included (128 weights: the U-Net alone rounds the same); buffers excluded.
_PUBLISHED_MPARAMS = {'xs': 125, 's': 280, 'm': 498, 'l': 777, 'xl': 1119, 'xxl': 1523}


@pytest.mark.parametrize('name', sorted(_PUBLISHED_MPARAMS))
def test_preset_parameter_counts(name):
  module = edm2.Precond(**edm2.preset_config(name))
  res, ch = module.img_resolution, module.img_channels
  abstract = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, res, res, ch)), jnp.ones((1,)), jnp.zeros((1, module.label_dim))))
  sizes = {k: int(np.prod(v.shape)) for k, v in _flat(abstract['params']).items()}
  total = sum(sizes.values())
  assert sizes['logvar_linear.weight'] == 128
  assert round(total / 1e6) == _PUBLISHED_MPARAMS[name], total


def _residual_bytes(fn, variables):
  """Bytes autodiff keeps for the backward pass of fn (the residuals of jax.vjp, traced only)."""
  residuals = jax.eval_shape(lambda v: jax.vjp(fn, v)[1], variables)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals))


@pytest.mark.slow
def test_block_remat_keeps_outputs_and_gradients():
  """remat_blocks (config.remat='blocks'): the same variables, output and gradients in train mode with dropout,
  with fewer bytes kept for the backward pass."""
  module = _tiny_precond(dropout=0.3)
  remat = module.clone(remat_blocks=True)
  x, sigma, labels, variables = _tiny_setup(module)
  remat_template = jax.eval_shape(remat.init, jax.random.key(0), x, sigma, labels)
  assert jax.tree.map(lambda a: a.shape, remat_template) == jax.tree.map(lambda a: a.shape, variables)

  def loss_fn(network):
    def loss(variables):
      out = network.apply(variables, x, sigma, labels, train=True, rngs={'dropout': jax.random.key(2)})
      return jnp.sum(out ** 2)
    return loss

  plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss_fn(module)))(variables)
  remat_loss, remat_grads = jax.jit(jax.value_and_grad(loss_fn(remat)))(variables)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max() + 1e-30))
  assert _residual_bytes(loss_fn(remat), variables) < 0.7 * _residual_bytes(loss_fn(module), variables)
