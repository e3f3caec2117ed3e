"""EDM layers against official block outputs and direct numpy re-derivations of PyTorch semantics."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_files
from sida_jax.models import convert
from sida_jax.models.edm import layers


# --- numpy references of the PyTorch ops (NHWC arrays, OIHW weights) ------------------------------

def np_conv2d(x, w, stride=1, padding=0, groups=1):
  """torch.nn.functional.conv2d on an NHWC array with an OIHW weight."""
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  n, h, width, c = x.shape
  out_c, in_per_group, kh, kw = w.shape
  out_per_group = out_c // groups
  ho, wo = (h - kh) // stride + 1, (width - kw) // stride + 1
  y = np.zeros((n, ho, wo, out_c))
  for g in range(groups):
    xs = x[..., g * in_per_group:(g + 1) * in_per_group]
    ws = w[g * out_per_group:(g + 1) * out_per_group]
    for i in range(ho):
      for j in range(wo):
        patch = xs[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
        y[:, i, j, g * out_per_group:(g + 1) * out_per_group] = np.einsum('nhwc,ochw->no', patch, ws)
  return y


def np_conv_transpose2d_depthwise(x, f, stride, padding):
  """torch.nn.functional.conv_transpose2d with weight f tiled to [C, 1, k, k] and groups=C."""
  n, h, w, c = x.shape
  k = f.shape[0]
  full = np.zeros((n, (h - 1) * stride + k, (w - 1) * stride + k, c))
  for i in range(h):
    for j in range(w):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k, :] += x[:, i, j, None, None, :] * f[
          None, :, :, None]
  return full[:, padding:full.shape[1] - padding, padding:full.shape[2] - padding, :]


def np_edm_conv(x, w, b, taps, up, down, fused):
  """The official Conv2d forward, branch by branch, in float64."""
  r = np.asarray(taps, np.float64)
  f = np.outer(r, r) / r.sum() ** 2
  c_in = x.shape[-1]
  w_pad = w.shape[-1] // 2 if w is not None else 0
  f_pad = (len(taps) - 1) // 2
  tiled = lambda c: np.broadcast_to(f, (c, 1) + f.shape)
  if fused and up and w is not None:
    x = np_conv_transpose2d_depthwise(x, 4 * f, 2, max(f_pad - w_pad, 0))
    x = np_conv2d(x, w, padding=max(w_pad - f_pad, 0))
  elif fused and down and w is not None:
    x = np_conv2d(x, w, padding=w_pad + f_pad)
    x = np_conv2d(x, tiled(x.shape[-1]), stride=2, groups=x.shape[-1])
  else:
    if up:
      x = np_conv_transpose2d_depthwise(x, 4 * f, 2, f_pad)
    if down:
      x = np_conv2d(x, tiled(c_in), stride=2, padding=f_pad, groups=c_in)
    if w is not None:
      x = np_conv2d(x, w, padding=w_pad)
  return x + b if b is not None else x


def _random(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# --- tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize('direction', ['up', 'down'])
@pytest.mark.parametrize('kernel,fused', [(0, False), (1, False), (3, False), (1, True), (3, True)])
def test_conv2d_resampling_matches_pytorch_semantics(taps, direction, kernel, fused):
  c_in, c_out = 3, (3 if kernel == 0 else 5)
  x = _random(0, (2, 6, 6, c_in))
  conv = layers.Conv2d(c_in, c_out, kernel, up=direction == 'up', down=direction == 'down',
                       resample_filter=taps, fused_resample=fused)
  params = {}
  w = b = None
  if kernel:
    w, b = _random(1, (c_out, c_in, kernel, kernel)), _random(2, (c_out,))
    params = {'weight': w, 'bias': b}
  y = conv.apply({'params': params}, x)
  ref = np_edm_conv(x.astype(np.float64), w, b, taps, direction == 'up', direction == 'down', fused)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_conv2d_same_padding_and_layout():
  x, w, b = _random(0, (2, 5, 5, 4)), _random(1, (6, 4, 3, 3)), _random(2, (6,))
  y = layers.Conv2d(4, 6, 3).apply({'params': {'weight': w, 'bias': b}}, x)
  np.testing.assert_allclose(y, np_conv2d(x, w, padding=1) + b, rtol=0, atol=1e-5)


def test_linear_uses_pytorch_layout():
  x, w, b = _random(0, (3, 4)), _random(1, (5, 4)), _random(2, (5,))
  y = layers.Linear(4, 5).apply({'params': {'weight': w, 'bias': b}}, x)
  np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-6, atol=1e-6)
  variables = jax.eval_shape(layers.Linear(4, 5, bias=False).init, jax.random.key(0), x)
  assert set(variables['params']) == {'weight'}


@pytest.mark.parametrize('channels,groups', [(16, 4), (256, 32), (12, 3)])
def test_group_norm_group_count_and_values(channels, groups):
  x = _random(0, (2, 3, 3, channels), scale=3.0) + 1.0
  weight, bias = _random(1, (channels,)), _random(2, (channels,))
  y = layers.GroupNorm(channels, eps=1e-6).apply({'params': {'weight': weight, 'bias': bias}}, x)
  xg = x.astype(np.float64).reshape(2, 3, 3, groups, channels // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = xg.var(axis=(1, 2, 4), keepdims=True)
  ref = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * weight + bias
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def test_group_norm_rejects_too_few_channels():
  with pytest.raises(ValueError, match='groups'):
    jax.eval_shape(layers.GroupNorm(2).init, jax.random.key(0), jnp.zeros((1, 2, 2, 2)))


@pytest.mark.parametrize('endpoint', [False, True])
def test_positional_embedding_closed_form(endpoint):
  x = np.array([-3.0, 0.0, 0.5, 7.0], np.float32)
  y = layers.PositionalEmbedding(12, endpoint=endpoint).apply({}, x)
  freqs = (1 / 10000) ** (np.arange(6) / (6 - endpoint))
  phase = np.outer(x, freqs)
  np.testing.assert_allclose(y, np.concatenate([np.cos(phase), np.sin(phase)], axis=1), atol=2e-6)


def test_fourier_embedding_buffer_and_closed_form():
  x = np.array([-1.0, 0.1, 2.0], np.float32)
  module = layers.FourierEmbedding(512)
  variables = module.init(jax.random.key(0), x)
  assert set(variables) == {'buffers'}
  freqs = np.asarray(variables['buffers']['freqs'], np.float64)
  assert freqs.shape == (256,) and 14 < freqs.std() < 18
  phase = 2 * np.pi * np.outer(x, freqs)
  ref = np.concatenate([np.cos(phase), np.sin(phase)], axis=1)
  np.testing.assert_allclose(module.apply(variables, x), ref, atol=5e-4)  # |phase| up to ~500


@pytest.mark.parametrize('mode', ['xavier_uniform', 'xavier_normal', 'kaiming_uniform', 'kaiming_normal'])
def test_weight_init_distributions(mode):
  cin, cout, k = 64, 32, 3
  init = layers.WeightInit(mode, weight=0.5, bias=2.0)
  variables = layers.Conv2d(cin, cout, k, weight_init=init).init(jax.random.key(0),
                                                                 jnp.zeros((1, 4, 4, cin)))
  w, b = np.asarray(variables['params']['weight']), np.asarray(variables['params']['bias'])
  fan_in, fan_out = cin * k * k, cout * k * k
  std = {'xavier_uniform': np.sqrt(2 / (fan_in + fan_out)), 'xavier_normal': np.sqrt(2 / (fan_in + fan_out)),
         'kaiming_uniform': np.sqrt(1 / fan_in), 'kaiming_normal': np.sqrt(1 / fan_in)}[mode]
  np.testing.assert_allclose(w.std(), 0.5 * std, rtol=0.03)
  np.testing.assert_allclose(b.std(), 2.0 * std, rtol=0.35)  # only 32 draws
  if mode.endswith('uniform'):
    assert np.abs(w).max() <= 0.5 * std * np.sqrt(3) * (1 + 1e-6)
  zero = layers.Conv2d(cin, cout, k, weight_init=layers.WeightInit(mode, weight=0.0)).init(
      jax.random.key(0), jnp.zeros((1, 4, 4, cin)))
  assert not np.any(np.asarray(zero['params']['weight'])) and not np.any(np.asarray(zero['params']['bias']))


def test_weight_init_from_official_kwargs():
  init = layers.WeightInit.from_kwargs({'init_mode': 'xavier_uniform', 'init_weight': np.float64(0.2)})
  assert init == layers.WeightInit('xavier_uniform', 0.2, 0.0)
  with pytest.raises(ValueError, match="'init_scale'"):
    layers.WeightInit.from_kwargs({'init_scale': 1})


def _block_from_fixture(kwargs):
  """UNetBlock from the official constructor kwargs (`init`, `init_zero`, `init_attn` dicts)."""
  renamed = {'init': 'init_default'}
  values = {}
  for key, value in kwargs.items():
    if key in ('init', 'init_zero', 'init_attn'):
      value = layers.WeightInit.from_kwargs(value)
    values[renamed.get(key, key)] = tuple(value) if isinstance(value, list) else value
  return layers.UNetBlock(**values)


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', fixture_files('edm', 'block_*_io.npz'))
def test_unet_block_matches_official(io_path):
  """Multi-head attention (interleaved qkv layout), up/down resampling, SongUNet and ADM options."""
  stem = io_path.name[:-len('_io.npz')]
  meta = json.loads(io_path.with_name(f'{stem}_kwargs.json').read_text())
  block = _block_from_fixture(meta['init_kwargs'])
  assert block.heads == meta['num_heads']
  state = dict(np.load(io_path.with_name(f'{stem}_state.npz')))
  # Strict: every official name and shape; resampling blocks' stored filters must equal the ones we compute.
  variables = convert.variables_from_state_dict(block, state)
  assert set(variables) == {'params'}
  io = np.load(io_path)
  y = block.apply(variables, io['x'].transpose(0, 2, 3, 1), io['emb'])
  assert y.shape == io['y'].transpose(0, 2, 3, 1).shape
  ref = io['y'].transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(y) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_unet_block_dropout_only_in_training():
  block = layers.UNetBlock(8, 8, 4, dropout=0.5, adaptive_scale=False,
                           init_zero=layers.WeightInit(weight=1.0))
  x, emb = _random(0, (2, 4, 4, 8)), _random(1, (2, 4))
  variables = block.init(jax.random.key(0), x, emb)
  evaluated = block.apply(variables, x, emb)
  np.testing.assert_array_equal(block.apply(variables, x, emb, train=False), evaluated)
  rngs = lambda seed: {'dropout': jax.random.key(seed)}
  first = block.apply(variables, x, emb, train=True, rngs=rngs(1))
  np.testing.assert_array_equal(block.apply(variables, x, emb, train=True, rngs=rngs(1)), first)
  assert np.abs(np.asarray(first) - np.asarray(evaluated)).max() > 1e-3
  assert np.abs(np.asarray(first) - np.asarray(block.apply(variables, x, emb, train=True,
                                                           rngs=rngs(2)))).max() > 1e-3


def test_unet_block_head_count_rule():
  assert layers.UNetBlock(8, 128, 4, attention=True).heads == 2  # out_channels // 64
  assert layers.UNetBlock(8, 16, 4, attention=True).heads == 0   # tiny ADM: no attention
  assert layers.UNetBlock(8, 16, 4, attention=True, num_heads=1).heads == 1
  assert layers.UNetBlock(8, 128, 4, attention=False, num_heads=1).heads == 0
