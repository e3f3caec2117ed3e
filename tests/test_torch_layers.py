"""PyTorch-convention layers: numpy transcriptions of the torch definitions, and torch itself when installed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax.models.backbones import torch_layers


def _torch():
  return pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')


def _resize_reference(x, size, align_corners):
  """torch's bilinear rule, pixel by pixel: source = (dst + ½)·in/out − ½ clamped at 0, or with
  align_corners dst·(in−1)/(out−1)."""
  n, h, w, c = x.shape
  out = np.zeros((n, size[0], size[1], c), np.float64)

  def source(dst, in_size, out_size):
    if align_corners:
      return dst * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return max((dst + 0.5) * in_size / out_size - 0.5, 0.0)

  for i in range(size[0]):
    sy = source(i, h, size[0])
    y0 = min(int(np.floor(sy)), h - 1)
    y1, ly = min(y0 + 1, h - 1), sy - y0
    for j in range(size[1]):
      sx = source(j, w, size[1])
      x0 = min(int(np.floor(sx)), w - 1)
      x1, lx = min(x0 + 1, w - 1), sx - x0
      out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                      + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


@pytest.mark.parametrize('size,align_corners', [((11, 4), False), ((11, 4), True), ((3, 14), False), ((10, 14), True)])
def test_resize_bilinear_matches_torch_rule(size, align_corners):
  x = np.random.RandomState(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
  ours = torch_layers.resize_bilinear(jnp.asarray(x), size, align_corners)
  np.testing.assert_allclose(ours, _resize_reference(x.astype(np.float64), size, align_corners), atol=1e-6)


def test_adaptive_avg_pool_bins():
  x = np.random.RandomState(1).standard_normal((2, 5, 9, 3)).astype(np.float32)
  ref = np.zeros((2, 7, 4, 3))
  for i in range(7):
    hs, he = (i * 5) // 7, -((-(i + 1) * 5) // 7)
    for j in range(4):
      ws, we = (j * 9) // 4, -((-(j + 1) * 9) // 4)
      ref[:, i, j] = x[:, hs:he, ws:we].mean((1, 2))
  np.testing.assert_allclose(torch_layers.adaptive_avg_pool(jnp.asarray(x), (7, 4)), ref, atol=1e-6)


def test_max_pool_routes_gradient_to_first_maximum():
  x = np.random.RandomState(2).standard_normal((1, 5, 4, 2)).astype(np.float32)
  x[0, 0, 0, 0] = x[0, 1, 1, 0] = x[0, 0, 1, 0] = 10.0   # a three-way tie in the first window
  ref = x[:, :4].reshape(1, 2, 2, 2, 2, 2).max((2, 4))
  np.testing.assert_array_equal(torch_layers.max_pool_2x2(jnp.asarray(x)), ref)
  grad = jax.grad(lambda v: torch_layers.max_pool_2x2(v)[0, 0, 0, 0])(jnp.asarray(x))
  expected = np.zeros_like(x)
  expected[0, 0, 0, 0] = 1.0  # row-major first of the tied maxima, as torch
  np.testing.assert_array_equal(grad, expected)


def test_conv_transpose_definition():
  rng = np.random.RandomState(3)
  x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
  b = rng.standard_normal(6).astype(np.float32)
  ref = np.zeros((2, 2 * 2 + 3, 3 * 2 + 3, 6))
  for i in range(3):
    for j in range(4):
      ref[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3] += np.einsum('nc,coab->nabo', x[:, i, j], w)
  ours = torch_layers.ConvTranspose2d(5, 6, 3, 2).apply({'params': {'weight': w, 'bias': b}}, x)
  np.testing.assert_allclose(ours, ref + b, atol=1e-5)


def test_same_padding_is_tensorflow_same():
  rng = np.random.RandomState(4)
  x = rng.standard_normal((1, 7, 8, 2)).astype(np.float32)
  w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
  ours = torch_layers.Conv2d(2, 3, 3, stride=2, padding='SAME', bias=False).apply({'params': {'weight': w}}, x)
  ref = []
  for size in (7, 8):  # TF: total = max((ceil(n/s) − 1)·s + k − n, 0), the extra pixel after
    total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
    ref.append((total // 2, total - total // 2))
  xp = np.pad(x, ((0, 0), ref[0], ref[1], (0, 0)))
  out = np.zeros((1, 4, 4, 3))
  for i in range(4):
    for j in range(4):
      out[:, i, j] = np.einsum('nabc,ocab->no', xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
  np.testing.assert_allclose(ours, out, atol=1e-5)


def test_batch_norm_training_groups_and_running_statistics():
  rng = np.random.RandomState(5)
  x = rng.standard_normal((4, 3, 3, 2)).astype(np.float32) * 2 + 1
  variables = {'params': {'weight': np.array([1.5, 0.5], np.float32), 'bias': np.array([0.1, -0.2], np.float32)},
               'buffers': {'running_mean': np.array([0.3, -0.1], np.float32),
                           'running_var': np.array([2.0, 0.5], np.float32)}}
  bn = torch_layers.BatchNorm2d(2)
  y, updates = bn.apply(variables, x, train=True, groups=2, mutable=['buffers'])
  ref, means, vars_ = [], [], []
  for g in (x[:2], x[2:]):  # each half normalised by its own statistics (biased variance)
    m, v = g.mean((0, 1, 2)), g.var((0, 1, 2))
    ref.append((g - m) / np.sqrt(v + 1e-5) * [1.5, 0.5] + [0.1, -0.2])
    means.append(m)
    vars_.append(v * 18 / 17)  # unbiased, 18 values per channel and group
  np.testing.assert_allclose(y, np.concatenate(ref), atol=1e-5)
  np.testing.assert_allclose(updates['buffers']['running_mean'], 0.9 * np.array([0.3, -0.1]) + 0.1 * np.mean(means, 0),
                             atol=1e-6)
  np.testing.assert_allclose(updates['buffers']['running_var'], 0.9 * np.array([2.0, 0.5]) + 0.1 * np.mean(vars_, 0),
                             atol=1e-6)
  y_eval = bn.apply(variables, x)
  np.testing.assert_allclose(y_eval, (x - [0.3, -0.1]) / np.sqrt(np.array([2.0, 0.5]) + 1e-5) * [1.5, 0.5]
                             + [0.1, -0.2], atol=1e-5)
  with pytest.raises(ValueError, match='does not split into 3'):
    bn.apply(variables, x, train=True, groups=3)


def test_spectral_norm_power_iteration():
  rng = np.random.RandomState(6)
  w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
  u = rng.standard_normal(4).astype(np.float32)
  v = rng.standard_normal(12).astype(np.float32)
  u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
  x = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
  layer = torch_layers.SpectralNormConv2d(3, 4, 2, bias=False)
  variables = {'params': {'weight_orig': w}, 'buffers': {'weight_u': u, 'weight_v': v}}
  mat = w.reshape(4, -1).astype(np.float64)
  v1 = mat.T @ u
  v1 /= np.linalg.norm(v1)
  u1 = mat @ v1
  u1 /= np.linalg.norm(u1)
  y, updates = layer.apply(variables, x, update=True, mutable=['buffers'])
  np.testing.assert_allclose(updates['buffers']['weight_u'], u1, atol=1e-6)
  np.testing.assert_allclose(updates['buffers']['weight_v'], v1, atol=1e-6)
  # One output pixel: the 2×2 kernel covers the whole input.
  np.testing.assert_allclose(y[0, 0, 0], mat @ x[0].transpose(2, 0, 1).reshape(-1) / (u1 @ mat @ v1), rtol=1e-5)
  y_eval = layer.apply(variables, x)  # evaluation: the stored vectors, no iteration
  np.testing.assert_allclose(y_eval[0, 0, 0], mat @ x[0].transpose(2, 0, 1).reshape(-1) / (u @ mat @ v), rtol=1e-5)


def test_load_state_dict_is_strict():
  template = torch_layers.variables_template(torch_layers.BatchNorm2d(3), jnp.zeros((1, 2, 2, 3)))
  good = {'weight': np.ones(3), 'bias': np.zeros(3), 'running_mean': np.zeros(3), 'running_var': np.ones(3)}
  loaded = torch_layers.load_state_dict(template, {**good, 'num_batches_tracked': np.array(5)}, 'bn')
  assert set(loaded) == {'params', 'buffers'} and loaded['buffers']['running_var'].shape == (3,)
  with pytest.raises(ValueError, match="bn: missing key\\(s\\) 'bias'"):
    torch_layers.load_state_dict(template, {k: v for k, v in good.items() if k != 'bias'}, 'bn')
  with pytest.raises(ValueError, match="unexpected key\\(s\\) 'extra'"):
    torch_layers.load_state_dict(template, {**good, 'extra': np.zeros(1)}, 'bn')
  with pytest.raises(ValueError, match="shape mismatch for 'weight': expected \\(3,\\), got \\(4,\\)"):
    torch_layers.load_state_dict(template, {**good, 'weight': np.ones(4)}, 'bn')


# ---------------------------------------------------------------------------------------------------------
# Against torch.

@pytest.mark.parametrize('in_size,out_size,align_corners', [(32, 224, False), (300, 224, False), (7, 14, True),
                                                            (14, 28, True), (5, 3, False)])
def test_resize_bilinear_parity(in_size, out_size, align_corners):
  torch = _torch()
  x = np.random.RandomState(7).standard_normal((2, 3, in_size, in_size)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_size, mode='bilinear',
                                        align_corners=align_corners).numpy().transpose(0, 2, 3, 1)
  ours = torch_layers.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (out_size, out_size), align_corners)
  # Exact up to torch's float32 source positions, which its CPU kernel rounds once (fused multiply-add) along
  # the width: a 1-ulp shift of the weights, ~1e-5 of the values on the 300 -> 224 case.
  np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


def test_conv_transpose_parity():
  torch = _torch()
  layer = torch.nn.ConvTranspose2d(6, 5, 4, stride=4)
  x = np.random.RandomState(8).standard_normal((2, 6, 3, 5)).astype(np.float32)
  with torch.no_grad():
    ref = layer(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  params = {'params': {k: v.detach().numpy() for k, v in layer.state_dict().items()}}
  ours = torch_layers.ConvTranspose2d(6, 5, 4, 4).apply(params, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max())


def test_spectral_norm_and_batch_norm_training_parity():
  """Two training-mode calls (power iterations, batch statistics) then one evaluation call, as torch."""
  torch = _torch()
  torch.manual_seed(0)
  conv = torch.nn.utils.spectral_norm(torch.nn.Conv2d(3, 5, 4, 2, 1))
  bn = torch.nn.BatchNorm2d(5)
  sd = {f'0.{k}': v.detach().numpy().copy() for k, v in conv.state_dict().items()}
  sd.update({f'1.{k}': v.detach().numpy().copy() for k, v in bn.state_dict().items()})

  class Pair(torch_layers.nn.Module):
    @torch_layers.nn.compact
    def __call__(self, x, train):
      x = torch_layers.SpectralNormConv2d(3, 5, 4, 2, 1, name='0')(x, update=train)
      return torch_layers.BatchNorm2d(5, name='1')(x, train=train)

  pair = Pair()
  variables = torch_layers.load_state_dict(torch_layers.variables_template(pair, jnp.zeros((1, 8, 8, 3)), False), sd,
                                           'pair')
  rng = np.random.RandomState(9)
  for train in (True, True, False):
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    conv.train(train), bn.train(train)
    with torch.no_grad():
      ref = bn(conv(torch.from_numpy(x))).numpy().transpose(0, 2, 3, 1)
    ours, updates = pair.apply(variables, x.transpose(0, 2, 3, 1), train, mutable=['buffers'])
    variables = {'params': variables['params'], 'buffers': updates['buffers']}
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max())
  torch_buffers = {k: v.numpy() for k, v in {**{f'0.{k}': v for k, v in conv.state_dict().items()},
                                            **{f'1.{k}': v for k, v in bn.state_dict().items()}}.items()}
  for name, (collection, path) in torch_layers.state_dict_names(variables).items():
    if collection == 'buffers':
      np.testing.assert_allclose(variables['buffers'][path[0]][path[1]], torch_buffers[name], atol=1e-5)
