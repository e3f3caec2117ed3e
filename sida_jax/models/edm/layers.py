"""EDM building blocks (NVlabs/edm `training/networks.py`) in Flax linen, NHWC.

Every parameter keeps the name, shape and layout of its PyTorch counterpart (Linear `weight` [out, in],
Conv2d `weight` OIHW), so a flattened variable tree equals the official `state_dict` names. Weights are
stored in float32 and cast to the activation dtype where they are used, as the official layers do.
"""
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_CONV_DIMENSIONS = ('NHWC', 'OIHW', 'NHWC')


@dataclasses.dataclass(frozen=True)
class WeightInit:
  """How a layer draws its fresh weights: EDM's `weight_init` mode times a gain for weight and bias."""
  mode: str = 'kaiming_normal'
  weight: float = 1.0
  bias: float = 0.0

  @classmethod
  def from_kwargs(cls, kwargs: Mapping[str, Any]) -> 'WeightInit':
    """Reads the official `dict(init_mode=..., init_weight=..., init_bias=...)` form."""
    names = {'init_mode': 'mode', 'init_weight': 'weight', 'init_bias': 'bias'}
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
      raise ValueError(f'WeightInit.from_kwargs: unknown key {unknown[0]!r}')
    values = {names[k]: v for k, v in kwargs.items()}
    if 'weight' in values:
      values['weight'] = float(values['weight'])
    if 'bias' in values:
      values['bias'] = float(values['bias'])
    return cls(**values)


def _initializer(init: WeightInit, fan_in: int, fan_out: int, gain: float):
  """A flax initialiser drawing EDM's xavier/kaiming uniform/normal values times `gain`."""
  if init.mode == 'xavier_uniform':
    draw, bound = 'uniform', math.sqrt(6 / (fan_in + fan_out))
  elif init.mode == 'xavier_normal':
    draw, bound = 'normal', math.sqrt(2 / (fan_in + fan_out))
  elif init.mode == 'kaiming_uniform':
    draw, bound = 'uniform', math.sqrt(3 / fan_in)
  elif init.mode == 'kaiming_normal':
    draw, bound = 'normal', math.sqrt(1 / fan_in)
  else:
    raise ValueError(f'unknown init mode {init.mode!r}')

  def init_fn(key: Array, shape: Sequence[int]) -> Array:
    if draw == 'uniform':
      values = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    else:
      values = jax.random.normal(key, shape, jnp.float32)
    return values * (bound * gain)
  return init_fn


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
  """The normalised separable FIR filter outer(r, r) / sum(r)^2 as float32 [len(r), len(r)]."""
  r = np.asarray(taps, dtype=np.float32)
  return np.outer(r, r) / np.square(r.sum())


def _is_box(taps: Sequence[float]) -> bool:
  """[a, a]: resampling by this filter is exact 2x2 averaging / nearest-neighbour repetition."""
  return len(taps) == 2 and taps[0] == taps[1]


def _downsample(x: Array, taps: Sequence[float], padding: int) -> Array:
  """Depthwise FIR filter with stride 2 (PyTorch `conv2d(groups=C, stride=2)`)."""
  n, h, w, c = x.shape
  if _is_box(taps) and padding == 0 and h % 2 == 0 and w % 2 == 0:
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  f = resample_filter_2d(taps)
  kernel = jnp.asarray(np.broadcast_to(f, (c, 1) + f.shape), x.dtype)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(2, 2), padding=[(padding, padding)] * 2,
      dimension_numbers=_CONV_DIMENSIONS, feature_group_count=c)


def _upsample(x: Array, taps: Sequence[float], padding: int) -> Array:
  """Depthwise transposed FIR filter (gain 4) with stride 2 (PyTorch `conv_transpose2d(groups=C)`)."""
  n, h, w, c = x.shape
  if _is_box(taps) and padding == 0:
    return jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
  f = resample_filter_2d(taps) * 4
  # A transposed convolution is a convolution of the 2x-dilated input with the flipped kernel.
  f = f[::-1, ::-1]
  edge = f.shape[0] - 1 - padding
  kernel = jnp.asarray(np.broadcast_to(f, (c, 1) + f.shape), x.dtype)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=[(edge, edge)] * 2, lhs_dilation=(2, 2),
      dimension_numbers=_CONV_DIMENSIONS, feature_group_count=c)


class Linear(nn.Module):
  """y = x W^T + b with W [out, in]."""
  in_features: int
  out_features: int
  bias: bool = True
  weight_init: WeightInit = WeightInit()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fans = dict(fan_in=self.in_features, fan_out=self.out_features)
    w = self.param('weight', _initializer(self.weight_init, gain=self.weight_init.weight, **fans),
                   (self.out_features, self.in_features))
    # Contract against W's input axis directly instead of materialising W^T.
    x = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
    if self.bias:
      b = self.param('bias', _initializer(self.weight_init, gain=self.weight_init.bias, **fans),
                     (self.out_features,))
      x = x + b.astype(x.dtype)
    return x


class Conv2d(nn.Module):
  """k x k convolution ("same" padding) with optional FIR up/down-sampling; kernel 0 = resample only.

  `fused_resample` reproduces EDM's fused order (down: conv then filter; up: filter then conv) with its
  padding rules. The `resample_filter` buffer of the official layer is not stored: it follows from
  `resample_filter` (see `resample_filter_2d`).
  """
  in_channels: int
  out_channels: int
  kernel: int
  bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  weight_init: WeightInit = WeightInit()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError('Conv2d: up and down are mutually exclusive')
    k = self.kernel
    fans = dict(fan_in=self.in_channels * k * k, fan_out=self.out_channels * k * k)
    w = b = None
    if k:
      w = self.param('weight', _initializer(self.weight_init, gain=self.weight_init.weight, **fans),
                     (self.out_channels, self.in_channels, k, k)).astype(x.dtype)
      if self.bias:
        b = self.param('bias', _initializer(self.weight_init, gain=self.weight_init.bias, **fans),
                       (self.out_channels,)).astype(x.dtype)
    w_pad = k // 2
    f_pad = (len(self.resample_filter) - 1) // 2 if (self.up or self.down) else 0
    taps = tuple(self.resample_filter)

    def conv(x, padding):
      return lax.conv_general_dilated(x, w, (1, 1), [(padding, padding)] * 2,
                                      dimension_numbers=_CONV_DIMENSIONS)

    if self.fused_resample and self.up and w is not None:
      x = _upsample(x, taps, max(f_pad - w_pad, 0))
      x = conv(x, max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and w is not None:
      x = conv(x, w_pad + f_pad)
      x = _downsample(x, taps, 0)
    else:
      if self.up:
        x = _upsample(x, taps, f_pad)
      if self.down:
        x = _downsample(x, taps, f_pad)
      if w is not None:
        x = conv(x, w_pad)
    if b is not None:
      x = x + b
    return x


class GroupNorm(nn.Module):
  """Group normalisation with EDM's group count min(num_groups, C // min_channels_per_group).

  Statistics are taken in float32 whatever the activation dtype; the result has the input's dtype.
  """
  num_channels: int
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.num_channels
    groups = min(self.num_groups, c // self.min_channels_per_group)
    if groups < 1 or c % groups:
      raise ValueError(f'GroupNorm: {c} channels cannot form {groups} groups')
    weight = self.param('weight', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    return group_norm(x, weight, bias, groups, self.eps)


def group_norm_two_pass(x: Array, weight: Array, bias: Array, groups: int, eps: float) -> Array:
  """Group normalisation as written: mean, then the variance of the centred values (two passes)."""
  n, h, w, c = x.shape
  y = x.astype(jnp.float32).reshape(n, h, w, groups, c // groups)
  mean = y.mean(axis=(1, 2, 4), keepdims=True)
  y = y - mean
  var = jnp.square(y).mean(axis=(1, 2, 4), keepdims=True)
  y = (y * lax.rsqrt(var + eps)).reshape(n, h, w, c)
  return (y * weight + bias).astype(x.dtype)


def group_norm_one_pass(x: Array, weight: Array, bias: Array, groups: int, eps: float) -> Array:
  """Group normalisation in one read of x: float32 sums of x and x² per group give the statistics, which
  fold with the affine parameters into a per-(sample, channel) scale and shift."""
  n, h, w, c = x.shape
  y = x.astype(jnp.float32).reshape(n, h * w, groups, c // groups)
  mean = y.mean(axis=(1, 3))
  var = jnp.maximum(jnp.square(y).mean(axis=(1, 3)) - jnp.square(mean), 0.0)
  inv = lax.rsqrt(var + eps)                                                     # [n, groups]
  scale = (inv[:, :, None] * weight.reshape(groups, -1)).reshape(n, 1, 1, c)
  shift = (bias.reshape(groups, -1) - (mean * inv)[:, :, None] * weight.reshape(groups, -1)).reshape(n, 1, 1, c)
  return (x.astype(jnp.float32) * scale + shift).astype(x.dtype)


# One pass: 16 % less XLA scratch in the CIFAR-10 SiD step and ~11 % faster on the small net (paired A/B,
# docs/speed.md); the golden tests pass with it. The two-pass form stays for benchmarks/ab_step.py.
group_norm = group_norm_one_pass


class UNetBlock(nn.Module):
  """EDM's unified residual block: norm-SiLU-conv, embedding injection, optional self-attention.

  `adaptive_scale` uses the embedding as (scale, shift) (ADM); otherwise it is added (DDPM++/NCSN++).
  The attention qkv 1x1 conv keeps the official interleaved channel layout
  (head, channel-within-head, q/k/v); scores and softmax are computed in float32.
  """
  in_channels: int
  out_channels: int
  emb_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[float] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init_default: WeightInit = WeightInit()
  init_zero: WeightInit = WeightInit(weight=0.0)
  init_attn: Optional[WeightInit] = None

  @property
  def heads(self) -> int:
    """Number of attention heads (0 = no attention), resolved as the official constructor does."""
    if not self.attention:
      return 0
    return self.num_heads if self.num_heads is not None else self.out_channels // self.channels_per_head

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    cin, cout = self.in_channels, self.out_channels
    resample = dict(resample_filter=self.resample_filter)
    orig = x
    x = GroupNorm(cin, eps=self.eps, name='norm0')(x)
    x = Conv2d(cin, cout, 3, up=self.up, down=self.down, weight_init=self.init_default, name='conv0',
               **resample)(nn.silu(x))
    params = Linear(self.emb_channels, cout * (2 if self.adaptive_scale else 1),
                    weight_init=self.init_default, name='affine')(emb)
    params = params[:, None, None, :].astype(x.dtype)
    norm1 = GroupNorm(cout, eps=self.eps, name='norm1')
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = nn.silu(shift + norm1(x) * (scale + 1))
    else:
      x = nn.silu(norm1(x + params))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Conv2d(cout, cout, 3, weight_init=self.init_zero, name='conv1')(x)
    if cout != cin or self.up or self.down:
      kernel = 1 if (self.resample_proj or cout != cin) else 0
      orig = Conv2d(cin, cout, kernel, up=self.up, down=self.down, weight_init=self.init_default,
                    name='skip', **resample)(orig)
    x = (x + orig) * self.skip_scale

    heads = self.heads
    if heads:
      n, h, w, _ = x.shape
      per_head = cout // heads
      qkv = Conv2d(cout, 3 * cout, 1, name='qkv',
                   weight_init=self.init_attn if self.init_attn is not None else self.init_default)(
                       GroupNorm(cout, eps=self.eps, name='norm2')(x))
      qkv = qkv.reshape(n, h * w, heads, per_head, 3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      k = k / np.sqrt(per_head).astype(k.dtype)
      logits = jnp.einsum('nqhc,nkhc->nhqk', q.astype(jnp.float32), k.astype(jnp.float32))
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      a = jnp.einsum('nhqk,nkhc->nqhc', weights, v).reshape(n, h, w, cout)
      x = (Conv2d(cout, cout, 1, weight_init=self.init_zero, name='proj')(a) + x) * self.skip_scale
    return x


class PositionalEmbedding(nn.Module):
  """Sinusoidal embedding [cos(x f), sin(x f)] with f_i = (1/max_positions)^(i / (C/2 - endpoint))."""
  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  def __call__(self, x: Array) -> Array:
    half = self.num_channels // 2
    # Computed in float32 like the official layer: at large noise labels (VP: up to 999) the phase is
    # sensitive to the last bit of the frequencies.
    freqs = jnp.arange(half, dtype=jnp.float32) / jnp.float32(half - (1 if self.endpoint else 0))
    freqs = jnp.power(jnp.float32(1 / self.max_positions), freqs)
    x = jnp.outer(x, freqs.astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """Random Fourier features [cos(2 pi x f), sin(2 pi x f)]; f ~ scale * N(0, 1) is a stored buffer."""
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    freqs = self.variable(
        'buffers', 'freqs',
        lambda: jax.random.normal(self.make_rng('params'), (self.num_channels // 2,)) * self.scale)
    x = jnp.outer(x, (jnp.float32(2 * np.pi) * freqs.value).astype(x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)
