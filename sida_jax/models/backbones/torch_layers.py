"""PyTorch-convention layers for the ported feature networks (NHWC activations, PyTorch parameter layouts).

Every parameter keeps the name, shape and layout of its `torch.nn` counterpart (Conv2d `weight` OIHW,
ConvTranspose2d `weight` [in, out, k, k], Linear `weight` [out, in]); trainable tensors live in 'params',
batch-norm running statistics and spectral-norm vectors in 'buffers'. A flattened variable tree therefore
equals the PyTorch `state_dict`, and `load_state_dict` is a strict 1:1 copy.

Fresh weights follow PyTorch's default layer initialisation (uniform ±1/√fan_in for weights and biases),
which is what Projected GAN's randomly initialised mixing layers and heads use.
"""
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

Array = jax.Array
Variables = dict[str, Any]

COLLECTIONS = ('params', 'buffers')
_CONV_DIMENSIONS = ('NHWC', 'OIHW', 'NHWC')
_NORMALIZE_EPS = 1e-12  # F.normalize's default, used by torch's spectral norm


def torch_uniform(fan_in: int) -> Callable:
  """PyTorch's default init of Conv/Linear weights and biases: U(-1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _unit_normal_vector(key, shape, dtype=jnp.float32):
  """torch's spectral-norm start vector: normalize(N(0, 1))."""
  return _normalize(jax.random.normal(key, shape, dtype))


def _normalize(v: Array) -> Array:
  return v / jnp.maximum(jnp.linalg.norm(v), _NORMALIZE_EPS)


class Conv2d(nn.Module):
  """torch.nn.Conv2d: `padding` is an int (symmetric) or 'SAME' (TensorFlow's, as timm's Conv2dSame)."""
  in_channels: int
  out_channels: int
  kernel_size: int
  stride: int = 1
  padding: Union[int, str] = 0
  groups: int = 1
  bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    fan_in = self.in_channels // self.groups * k * k
    weight = self.param('weight', torch_uniform(fan_in), (self.out_channels, self.in_channels // self.groups, k, k))
    return _conv(x, weight, self.stride, self.padding, self.groups,
                 self.param('bias', torch_uniform(fan_in), (self.out_channels,)) if self.bias else None)


def _conv(x: Array, weight: Array, stride: int, padding: Union[int, str], groups: int,
          bias: Optional[Array]) -> Array:
  pad = padding if isinstance(padding, str) else [(padding, padding)] * 2
  y = lax.conv_general_dilated(x, weight.astype(x.dtype), (stride, stride), pad,
                               dimension_numbers=_CONV_DIMENSIONS, feature_group_count=groups)
  return y if bias is None else y + bias.astype(x.dtype)


class ConvTranspose2d(nn.Module):
  """torch.nn.ConvTranspose2d without padding: output size (H - 1)·stride + kernel."""
  in_channels: int
  out_channels: int
  kernel_size: int
  stride: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    fan_in = self.out_channels * k * k  # torch takes the fan from dim 1 of the [in, out, k, k] weight
    weight = self.param('weight', torch_uniform(fan_in), (self.in_channels, self.out_channels, k, k))
    bias = self.param('bias', torch_uniform(fan_in), (self.out_channels,))
    # A transposed convolution is a convolution of the stride-dilated input with the flipped kernel.
    kernel = jnp.flip(weight, (2, 3)).transpose(1, 0, 2, 3).astype(x.dtype)
    y = lax.conv_general_dilated(x, kernel, (1, 1), [(k - 1, k - 1)] * 2, lhs_dilation=(self.stride, self.stride),
                                 dimension_numbers=_CONV_DIMENSIONS)
    return y + bias.astype(x.dtype)


class Linear(nn.Module):
  """torch.nn.Linear: y = x Wᵀ + b with W [out, in]."""
  in_features: int
  out_features: int
  bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = torch_uniform(self.in_features)
    weight = self.param('weight', init, (self.out_features, self.in_features))
    y = lax.dot_general(x, weight.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
    return y + self.param('bias', init, (self.out_features,)).astype(x.dtype) if self.bias else y


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis."""
  features: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param('weight', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + self.eps) * weight + bias


class BatchNorm2d(nn.Module):
  """torch.nn.BatchNorm2d on NHWC input.

  Evaluation (`train=False`) normalises with the running statistics. Training normalises with the batch
  statistics (biased variance), taken separately over `groups` equal slices of the batch (one per device
  in data-parallel PyTorch, whose batch norm is per device), and, when 'buffers' is mutable, moves the
  running statistics by `momentum` towards the slices' mean statistics (unbiased variance, as torch).
  """
  features: int
  eps: float = 1e-5
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x: Array, train: bool = False, groups: int = 1) -> Array:
    weight = self.param('weight', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    running_mean = self.variable('buffers', 'running_mean', jnp.zeros, (self.features,))
    running_var = self.variable('buffers', 'running_var', jnp.ones, (self.features,))
    if not train:
      return (x - running_mean.value) * lax.rsqrt(running_var.value + self.eps) * weight + bias
    n = x.shape[0]
    if n % groups:
      raise ValueError(f'BatchNorm2d: batch of {n} does not split into {groups} statistics groups')
    xg = x.reshape(groups, n // groups, *x.shape[1:])
    mean = xg.mean((1, 2, 3), keepdims=True)
    var = jnp.square(xg - mean).mean((1, 2, 3), keepdims=True)
    y = ((xg - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape) * weight + bias
    if self.is_mutable_collection('buffers') and not self.is_initializing():
      count = xg[0].size // self.features
      group_mean = lax.stop_gradient(mean.reshape(groups, -1).mean(0))
      group_var = lax.stop_gradient(var.reshape(groups, -1).mean(0)) * count / max(count - 1, 1)
      running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * group_mean
      running_var.value = (1 - self.momentum) * running_var.value + self.momentum * group_var
    return y


class SpectralNormConv2d(nn.Module):
  """torch.nn.utils.spectral_norm(nn.Conv2d(...)) with one power iteration per training forward.

  Parameters `weight_orig` (OIHW) and `bias`; buffers `weight_u` [out] and `weight_v` [in·k·k]. With
  `update=True` (torch's training mode) u and v take one power-iteration step (stored back when 'buffers'
  is mutable); either way the kernel used is weight_orig / (uᵀ W v), differentiated through W only.
  """
  in_channels: int
  out_channels: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  bias: bool = True

  @nn.compact
  def __call__(self, x: Array, update: bool = False) -> Array:
    k = self.kernel_size
    fan_in = self.in_channels * k * k
    weight = self.param('weight_orig', torch_uniform(fan_in), (self.out_channels, self.in_channels, k, k))
    bias = self.param('bias', torch_uniform(fan_in), (self.out_channels,)) if self.bias else None
    u = self.variable('buffers', 'weight_u', lambda: _unit_normal_vector(self.make_rng('params'), (self.out_channels,)))
    v = self.variable('buffers', 'weight_v', lambda: _unit_normal_vector(self.make_rng('params'), (fan_in,)))
    matrix = weight.reshape(self.out_channels, -1)
    u_vec, v_vec = u.value, v.value
    if update:
      frozen = lax.stop_gradient(matrix)
      v_vec = _normalize(frozen.T @ u_vec)
      u_vec = _normalize(frozen @ v_vec)
      if self.is_mutable_collection('buffers') and not self.is_initializing():
        u.value, v.value = u_vec, v_vec
    sigma = jnp.dot(u_vec, matrix @ v_vec)
    return _conv(x, weight / sigma, self.stride, self.padding, 1, bias)


def leaky_relu(x: Array, slope: float = 0.2) -> Array:
  return jnp.where(x >= 0, x, slope * x)


def relu6(x: Array) -> Array:
  return jnp.clip(x, 0.0, 6.0)


def gelu(x: Array) -> Array:
  """torch.nn.GELU() (the exact erf form)."""
  return jax.nn.gelu(x, approximate=False)


def max_pool_2x2(x: Array) -> Array:
  """nn.MaxPool2d(2, 2) on NHWC input, odd edges dropped; the gradient goes to the first maximum of a window
  in row-major order, as torch's (jnp.max would split it among ties, and ties do occur on the replicated
  borders of upsampled images)."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
  windows = x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)
  first = jnp.argmax(windows, axis=-1)[..., None]
  return jnp.take_along_axis(windows, first, axis=-1)[..., 0]


def _source_indices(in_size: int, out_size: int, align_corners: bool, dtype: np.dtype) -> tuple:
  """Lower and upper source taps and the upper tap's weight of torch's linear interpolation.

  The arithmetic runs in the activation dtype, as torch's CPU kernel does (float32 source positions move
  the weights by ~1e-5 on large downsampling ratios).
  """
  dtype = np.dtype(dtype)
  out = np.arange(out_size).astype(dtype)
  if align_corners:
    scale = dtype.type((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    source = scale * out
  else:
    scale = dtype.type(in_size / out_size)
    source = np.maximum(scale * (out + dtype.type(0.5)) - dtype.type(0.5), dtype.type(0))
  lower = np.minimum(source.astype(np.int32), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, source - lower.astype(dtype)


def resize_bilinear(x: Array, size: Sequence[int], align_corners: bool) -> Array:
  """F.interpolate(x, size, mode='bilinear', align_corners=...) on NHWC input, without antialiasing.

  One axis at a time, as two-tap gathers: the separable form of torch's bilinear kernel.
  """
  dtype = np.float64 if x.dtype == jnp.float64 else np.float32
  for axis, out_size in zip((1, 2), size):
    in_size = x.shape[axis]
    if in_size == out_size:  # the identity in both modes
      continue
    lower, upper, frac = _source_indices(in_size, out_size, align_corners, dtype)
    frac = jnp.asarray(frac, x.dtype).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    x = jnp.take(x, lower, axis=axis) * (1 - frac) + jnp.take(x, upper, axis=axis) * frac
  return x


def adaptive_avg_pool(x: Array, size: Sequence[int]) -> Array:
  """nn.AdaptiveAvgPool2d(size) on NHWC input (bins [⌊i·in/out⌋, ⌈(i+1)·in/out⌉))."""
  for axis, out_size in zip((1, 2), size):
    in_size = x.shape[axis]
    if in_size == out_size:
      continue
    pool = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
      start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
      pool[i, start:end] = 1.0 / (end - start)
    x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(pool, x.dtype), ((axis,), (1,))), -1, axis)
  return x


# ---------------------------------------------------------------------------------------------------------
# State dicts.

def variables_template(module: nn.Module, *example_args: Any, **example_kwargs: Any) -> Variables:
  """Shapes of `module`'s variables (jax.ShapeDtypeStruct leaves), without computing anything."""
  return dict(jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args, **example_kwargs)))


def state_dict_names(variables: Variables) -> dict[str, tuple[str, tuple]]:
  """PyTorch name -> (collection, Flax path) of every leaf."""
  names = {}
  for collection, tree in variables.items():
    if collection not in COLLECTIONS:
      raise ValueError(f'unexpected variable collection {collection!r}')
    for path in traverse_util.flatten_dict(tree):
      names['.'.join(path)] = (collection, path)
  return names


def count_params(variables: Variables) -> int:
  """Number of entries in 'params' (templates work too): PyTorch's `sum(p.numel() for p in parameters())`."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables.get('params', {})))


def _is_batch_counter(name: str, targets: Mapping[str, Any]) -> bool:
  prefix = name[:-len('num_batches_tracked')]
  return (name.endswith('num_batches_tracked') and (not prefix or prefix.endswith('.'))
          and prefix + 'running_mean' in targets)


def load_state_dict(template: Variables, state_dict: Mapping[str, Any], what: str) -> Variables:
  """Strict copy of a PyTorch-named state_dict (numpy arrays) into variables shaped like `template`.

  Batch-norm `num_batches_tracked` counters are accepted and dropped (evaluation never reads them; old
  torchvision files lack them). Any other missing or unexpected key, or a shape mismatch, raises a
  ValueError naming the key and `what` was being loaded.
  """
  targets = state_dict_names(template)
  missing = sorted(set(targets) - set(state_dict))
  if missing:
    raise ValueError(f'{what}: missing key(s) {", ".join(map(repr, missing[:8]))}'
                     f'{f" and {len(missing) - 8} more" if len(missing) > 8 else ""}')
  unexpected = sorted(k for k in state_dict if k not in targets and not _is_batch_counter(k, targets))
  if unexpected:
    raise ValueError(f'{what}: unexpected key(s) {", ".join(map(repr, unexpected[:8]))}'
                     f'{f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""}')
  shapes = {collection: traverse_util.flatten_dict(tree) for collection, tree in template.items()}
  flat = {collection: {} for collection in template}
  for name, (collection, path) in targets.items():
    value = np.asarray(state_dict[name], np.float32)
    expected = tuple(shapes[collection][path].shape)
    if value.shape != expected:
      raise ValueError(f'{what}: shape mismatch for {name!r}: expected {expected}, got {value.shape}')
    flat[collection][path] = jnp.asarray(value)
  return {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in flat.items()}


def state_dict_from_variables(variables: Variables) -> dict[str, np.ndarray]:
  """The PyTorch state_dict (numpy arrays, dtypes kept) of `variables`."""
  flat = {collection: traverse_util.flatten_dict(tree) for collection, tree in variables.items()}
  return {name: np.asarray(flat[collection][path])
          for name, (collection, path) in state_dict_names(variables).items()}


def load_backbone(module: nn.Module, state_dict: Mapping[str, Any], example_input: Array, what: str) -> Variables:
  """Strict loading for a backbone with an `include_head` switch.

  The state_dict must hold exactly the module's names. A module built without its classification head
  also takes the complete file (the usual torchvision/timm checkpoint): the head's entries are then checked
  like all others against the full network and dropped.
  """
  template = variables_template(module, example_input)
  if module.include_head:
    return load_state_dict(template, state_dict, what)
  trunk = state_dict_names(template)
  extra = [k for k in state_dict if k not in trunk and not _is_batch_counter(k, trunk)]
  if not extra:
    return load_state_dict(template, state_dict, what)
  full_template = variables_template(module.clone(include_head=True), example_input)
  full = state_dict_names(full_template)
  unknown = sorted(k for k in extra if k not in full)
  if unknown:
    raise ValueError(f'{what}: unexpected key(s) {", ".join(map(repr, unknown[:8]))}'
                     f'{f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""}')
  loaded = load_state_dict(full_template, state_dict, what)
  return {collection: traverse_util.unflatten_dict(
      {path: leaf for path, leaf in traverse_util.flatten_dict(tree).items() if '.'.join(path) in trunk})
          for collection, tree in loaded.items()}
