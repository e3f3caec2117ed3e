"""The FID Inception-v3 (TensorFlow graph `inception-2015-12-05`) in Flax, NHWC.

This is the detector behind EDM / EDM2 / SiD / stylegan2-ada FIDs. The body follows pytorch-fid's port
(`FIDInceptionA/C/E_1/E_2`: TF's average pools ignore padding; the last block max-pools), and
parameters keep the names and layouts of pytorch-fid's state dict
(`pt_inception-2015-12-05-6726825d.pth`): `Mixed_5b.branch1x1.conv.weight` (OIHW), `....bn.weight/bias`
in 'params', `....bn.running_mean/running_var` in 'buffers', `fc.weight` [1008, 2048], `fc.bias`.

Input handling is that of the reference detector, not pytorch-fid's: uint8-valued RGB at any
resolution, resized to 299×299 by the graph's own TF1 `ResizeBilinear` (source = dest · in/out, no
half-pixel offset, edge clamp; pytorch-fid's half-pixel `F.interpolate` differs slightly), then mapped
to [-1, 1) as (x - 128) / 128. Grayscale input is repeated to three channels, as EDM's `fid.py` does.

Outputs: the 2048-d pool3 features (FID, precision/recall) and the 1008 logits (Inception Score).
"""
import functools
import pathlib
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
_BN_EPS = 1e-3


def resize_like_tf1(images: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
  """Bilinear resize of NHWC images to size×size exactly as TF1's `ResizeBilinear` (align_corners=False)."""
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  for axis in (1, 2):
    in_size = images.shape[axis]
    if in_size == size:
      continue
    source = np.arange(size, dtype=np.float64) * (in_size / size)
    lower = np.floor(source).astype(np.int32)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = jnp.asarray(source - lower, images.dtype).reshape([-1 if a == axis else 1 for a in range(4)])
    images = jnp.take(images, lower, axis=axis) * (1 - frac) + jnp.take(images, upper, axis=axis) * frac
  return images


class _Conv(nn.Module):
  """Bias-free convolution; `weight` is OIHW as in PyTorch."""
  in_channels: int
  out_channels: int
  kernel_size: tuple[int, int]
  stride: int
  padding: tuple[int, int]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    weight = self.param("weight", nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0),
                        (self.out_channels, self.in_channels, *self.kernel_size))
    return jax.lax.conv_general_dilated(
        x, weight.astype(x.dtype), (self.stride, self.stride), [(p, p) for p in self.padding],
        dimension_numbers=("NHWC", "OIHW", "NHWC"))


class _BatchNorm(nn.Module):
  """Inference-mode batch norm; running statistics live in the 'buffers' collection."""
  features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    weight = self.param("weight", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.variable("buffers", "running_mean", lambda: jnp.zeros([self.features])).value
    var = self.variable("buffers", "running_var", lambda: jnp.ones([self.features])).value
    scale = weight * jax.lax.rsqrt(var + _BN_EPS)
    return x * scale + (bias - mean * scale)


class BasicConv2d(nn.Module):
  """conv → batch norm (eps 1e-3) → ReLU."""
  in_channels: int
  out_channels: int
  kernel_size: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = _Conv(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
              name="conv")(x)
    return nn.relu(_BatchNorm(self.out_channels, name="bn")(x))


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
  """3×3, stride 1, padding 1, averaging only over real pixels (TF's average pool)."""
  window, strides, pads = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
  count = jax.lax.reduce_window(jnp.ones([1, *x.shape[1:3], 1], x.dtype), 0.0, jax.lax.add, window,
                                strides, pads)
  return total / count


def _max_pool_3x3(x: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


class InceptionA(nn.Module):
  in_channels: int
  pool_features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = self.in_channels
    branch1x1 = BasicConv2d(c, 64, name="branch1x1")(x)
    branch5x5 = BasicConv2d(c, 48, name="branch5x5_1")(x)
    branch5x5 = BasicConv2d(48, 64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = BasicConv2d(c, 64, name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(64, 96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, 96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = BasicConv2d(c, self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  in_channels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    branch3x3 = BasicConv2d(self.in_channels, 384, (3, 3), stride=2, name="branch3x3")(x)
    branch3x3dbl = BasicConv2d(self.in_channels, 64, name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(64, 96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, 96, (3, 3), stride=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
  in_channels: int
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c, c7 = self.in_channels, self.channels_7x7
    row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
    branch1x1 = BasicConv2d(c, 192, name="branch1x1")(x)
    branch7x7 = BasicConv2d(c, c7, name="branch7x7_1")(x)
    branch7x7 = BasicConv2d(c7, c7, **row, name="branch7x7_2")(branch7x7)
    branch7x7 = BasicConv2d(c7, 192, **col, name="branch7x7_3")(branch7x7)
    branch7x7dbl = BasicConv2d(c, c7, name="branch7x7dbl_1")(x)
    branch7x7dbl = BasicConv2d(c7, c7, **col, name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, c7, **row, name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, c7, **col, name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, 192, **row, name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = BasicConv2d(c, 192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  in_channels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    branch3x3 = BasicConv2d(self.in_channels, 192, name="branch3x3_1")(x)
    branch3x3 = BasicConv2d(192, 320, (3, 3), stride=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = BasicConv2d(self.in_channels, 192, name="branch7x7x3_1")(x)
    branch7x7x3 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, 192, (3, 3), stride=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
  """`max_pool=True` is the graph's last block (pytorch-fid's `FIDInceptionE_2`), which max-pools."""
  in_channels: int
  max_pool: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = self.in_channels
    row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
    branch1x1 = BasicConv2d(c, 320, name="branch1x1")(x)
    branch3x3 = BasicConv2d(c, 384, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([BasicConv2d(384, 384, **row, name="branch3x3_2a")(branch3x3),
                                 BasicConv2d(384, 384, **col, name="branch3x3_2b")(branch3x3)], axis=-1)
    branch3x3dbl = BasicConv2d(c, 448, name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(448, 384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([BasicConv2d(384, 384, **row, name="branch3x3dbl_3a")(branch3x3dbl),
                                    BasicConv2d(384, 384, **col, name="branch3x3dbl_3b")(branch3x3dbl)],
                                   axis=-1)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
    branch_pool = BasicConv2d(c, 192, name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class _Linear(nn.Module):
  in_features: int
  out_features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, use_bias: bool = True) -> jnp.ndarray:
    weight = self.param("weight", nn.initializers.lecun_normal(in_axis=1, out_axis=0),
                        (self.out_features, self.in_features))
    bias = self.param("bias", nn.initializers.zeros, (self.out_features,))
    return x @ weight.T + bias if use_bias else x @ weight.T


class InceptionV3(nn.Module):
  """images [N, H, W, 1 or 3] with values in [0, 255] → (pool3 features [N, 2048], logits [N, 1008]).

  `dtype` is the compute dtype (float32 as the reference; float64 under x64 for exact comparisons).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, use_output_bias: bool = False
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`use_output_bias=False` drops `fc.bias` from the logits, as stylegan2-ada/SiD's `is50k` does."""
    if images.ndim != 4 or images.shape[3] not in (1, 3):
      raise ValueError(f"InceptionV3: expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    x = images.astype(self.dtype)
    if x.shape[3] == 1:
      x = jnp.repeat(x, 3, axis=3)
    x = (resize_like_tf1(x) - 128.0) / 128.0
    x = BasicConv2d(3, 32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(32, 64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = BasicConv2d(64, 80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(80, 192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = InceptionA(192, 32, name="Mixed_5b")(x)
    x = InceptionA(256, 64, name="Mixed_5c")(x)
    x = InceptionA(288, 64, name="Mixed_5d")(x)
    x = InceptionB(288, name="Mixed_6a")(x)
    x = InceptionC(768, 128, name="Mixed_6b")(x)
    x = InceptionC(768, 160, name="Mixed_6c")(x)
    x = InceptionC(768, 160, name="Mixed_6d")(x)
    x = InceptionC(768, 192, name="Mixed_6e")(x)
    x = InceptionD(768, name="Mixed_7a")(x)
    x = InceptionE(1280, max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(2048, max_pool=True, name="Mixed_7c")(x)
    features = x.mean(axis=(1, 2))
    fc = _Linear(FEATURE_DIM, NUM_CLASSES, name="fc")
    return features, fc(features, use_bias=use_output_bias)


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict:
  """{collection: {state-dict name: shape}} of the network's variables."""
  variables = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros([1, 8, 8, 3]))
  return {col: {name: tuple(leaf.shape)
                for name, leaf in flax.traverse_util.flatten_dict(tree, sep=".").items()}
          for col, tree in variables.items()}


def variables_from_state_dict(state_dict: dict) -> dict:
  """pytorch-fid state dict (name → array) → {'params', 'buffers'}, strictly checked.

  `*.num_batches_tracked` counters are ignored (unused at inference); any other missing or unexpected
  name, or a shape mismatch, raises ValueError.
  """
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
  expected = _expected_shapes()
  known = {name for shapes in expected.values() for name in shapes}
  missing, unexpected = sorted(known - set(state_dict)), sorted(set(state_dict) - known)
  if missing or unexpected:
    raise ValueError(f"Inception state dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                     f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
  variables = {}
  for col, shapes in expected.items():
    flat = {}
    for name, shape in shapes.items():
      value = np.asarray(state_dict[name])
      if value.shape != shape:
        raise ValueError(f"Inception state dict: '{name}' has shape {value.shape}, expected {shape}")
      flat[name] = jnp.asarray(value, jnp.float32)
    variables[col] = flax.traverse_util.unflatten_dict(flat, sep=".")
  return variables


def load_inception_variables(path) -> dict:
  """Variables from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or an `.npz` of the same names."""
  path = pathlib.Path(path)
  if path.suffix.lower() == ".npz":
    with np.load(path, allow_pickle=False) as data:
      state_dict = {name: data[name] for name in data.files}
  elif path.suffix.lower() in (".pth", ".pt"):
    from sida_jax.formats import torch_files  # pylint: disable=g-import-not-at-top  (torch-free reader)
    state_dict = torch_files.read_torch_file(path)
  else:
    raise ValueError(f"load_inception_variables: unknown file type '{path.suffix}' (expected .pth or .npz)")
  if not isinstance(state_dict, dict):
    raise ValueError(f"load_inception_variables: {path} does not hold a state dict")
  return variables_from_state_dict(state_dict)


def make_inception_fn(variables: dict, use_output_bias: bool = False) -> Callable:
  """Jitted `fn(images_uint8 [N, H, W, C]) -> (features [N, 2048], logits [N, 1008])`."""
  # Variables are an argument, not a closure, so the weights are not baked into the executable.
  apply_fn = jax.jit(functools.partial(InceptionV3().apply, use_output_bias=use_output_bias))
  return lambda images: apply_fn(variables, images)
