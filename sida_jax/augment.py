"""EDM's AugmentPipe (NVlabs/edm `training/augment.py`) as a pure, jit-able JAX function, NHWC.

`augment(rng, images, config)` draws per-sample augmentations and returns the augmented images and
the non-leaking augmentation labels the EDM networks are conditioned on. Each enabled augmentation
adds its label columns in this order: xflip (1), yflip (1), rotate_int (2), translate_int (2),
scale (1), rotate_frac (2: cos - 1, sin), aniso (2: w cos r, w sin r), translate_frac (2),
brightness (1), contrast (1), lumaflip (1), hue (2), saturation (1). EDM's training preset
(`edm_config`) enables xflip, yflip, scale, rotate_frac, aniso and translate_frac: 9 labels.

Geometric transforms follow the official code step by step: reflect padding by a batch-wide margin,
2x upsampling with the sym6 wavelet, bilinear `grid_sample` with zeros outside, sym6 downsampling.
The margin depends on the drawn transforms, so to keep shapes static the image is reflect-padded by
the largest margin the official code can use (side - 1) and everything outside the official padded
image is masked to zero, which reproduces the official result up to float rounding.

Random numbers come from `jax.random`, so draws differ from torch's; the distributions are the same.
"""

from collections.abc import Mapping
import dataclasses

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Low-pass filter of the sym6 wavelet (the one EDM's AugmentPipe uses).
SYM6 = np.array([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
], np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """AugmentPipe's arguments and defaults: probability multipliers (0 = off) and magnitudes."""
  p: float = 1.0                     # Overall multiplier for every augmentation probability.
  # Pixel blitting.
  xflip: float = 0.0
  yflip: float = 0.0
  rotate_int: float = 0.0
  translate_int: float = 0.0
  translate_int_max: float = 0.125   # Relative to the image size.
  # Geometric transformations.
  scale: float = 0.0
  rotate_frac: float = 0.0
  aniso: float = 0.0
  translate_frac: float = 0.0
  scale_std: float = 0.2             # log2 std.
  rotate_frac_max: float = 1.0       # 1 = full circle.
  aniso_std: float = 0.2             # log2 std.
  aniso_rotate_prob: float = 0.5
  translate_frac_std: float = 0.125  # Relative to the image size.
  # Color transformations.
  brightness: float = 0.0
  contrast: float = 0.0
  lumaflip: float = 0.0
  hue: float = 0.0
  saturation: float = 0.0
  brightness_std: float = 0.2
  contrast_std: float = 0.5          # log2 std.
  hue_max: float = 1.0               # 1 = full circle.
  saturation_std: float = 1.0        # log2 std.


def edm_config(p: float) -> AugmentConfig:
  """The preset of EDM's `train.py --augment=p` (also used by SiD/SiDA): 9 augmentation labels."""
  return AugmentConfig(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def _as_config(config: AugmentConfig | Mapping) -> AugmentConfig:
  if isinstance(config, AugmentConfig):
    return config
  fields = {field.name for field in dataclasses.fields(AugmentConfig)}
  unknown = sorted(set(config.keys()) - fields)
  if unknown:
    raise ValueError(f'augment: unknown key {unknown[0]!r}')
  return AugmentConfig(**{key: float(config[key]) for key in config.keys()})


def augment_dim(config: AugmentConfig | Mapping) -> int:
  """Width of the augmentation labels `augment` returns for this config."""
  config = _as_config(config)
  widths = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                translate_frac=2, brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1)
  return sum(width for name, width in widths.items() if getattr(config, name) > 0)


# ---------------------------------------------------------------------------------------------
# Batched homogeneous matrices [N, k, k].


def _matrix(rows) -> jnp.ndarray:
  """Stacks rows of scalars or [N] arrays into [..., len(rows), len(rows[0])]."""
  shape = jnp.broadcast_shapes(*(jnp.shape(x) for row in rows for x in row))
  return jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape)
                               for x in row], -1) for row in rows], -2)


def _translate2d(tx, ty):
  return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def _scale2d(sx, sy):
  return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _rotate2d(theta):
  return _matrix([[jnp.cos(theta), -jnp.sin(theta), 0], [jnp.sin(theta), jnp.cos(theta), 0],
                  [0, 0, 1]])


def _translate3d(tx, ty, tz):
  return _matrix([[1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1]])


def _scale3d(sx, sy, sz):
  return _matrix([[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1]])


def _rotate3d(axis: np.ndarray, theta):
  vx, vy, vz = (float(v) for v in axis[:3])
  s, c = jnp.sin(theta), jnp.cos(theta)
  cc = 1 - c
  return _matrix([
      [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
      [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
      [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
      [0, 0, 0, 1]])


# ---------------------------------------------------------------------------------------------
# Geometric execution.


def _depthwise_conv(images, taps, axis: int, lhs_dilation: int, stride: int, padding: int):
  """1-D cross-correlation of every channel along spatial `axis` (1 = H, 2 = W) of NHWC images."""
  channels = images.shape[3]
  kernel_shape = (len(taps), 1, 1, channels) if axis == 1 else (1, len(taps), 1, channels)
  kernel = jnp.broadcast_to(jnp.asarray(taps, images.dtype).reshape(kernel_shape[:3] + (1,)),
                            kernel_shape)
  along = lambda value, other: (value, other) if axis == 1 else (other, value)
  return lax.conv_general_dilated(
      images, kernel, window_strides=along(stride, 1), padding=along((padding, padding), (0, 0)),
      lhs_dilation=along(lhs_dilation, 1), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=channels, precision=lax.Precision.HIGHEST)


def _bilinear_zeros(image, x, y):
  """grid_sample(bilinear, zeros, align_corners=False) of one HWC image at pixel coords x, y."""
  height, width = image.shape[:2]
  x0, y0 = jnp.floor(x), jnp.floor(y)
  result = 0.0
  for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
    xi, yi = x0 + dx, y0 + dy
    weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    pixels = image[jnp.clip(yi, 0, height - 1).astype(jnp.int32),
                   jnp.clip(xi, 0, width - 1).astype(jnp.int32)]
    result = result + pixels * jnp.where(inside, weight, 0.0)[..., None]
  return result


def apply_geometric(images: jnp.ndarray, g_inv: jnp.ndarray) -> jnp.ndarray:
  """Resamples NHWC images by per-sample inverse pixel transforms g_inv [N, 3, 3], as EDM does.

  g_inv maps output pixel coordinates (origin at the image centre) to input coordinates.
  """
  n, height, width, _ = images.shape
  if height < 2 or width < 2:
    raise ValueError(f'augment: geometric transforms need images of at least 2x2, got '
                     f'{height}x{width}')
  taps_pad = len(SYM6) // 4
  cx, cy = (width - 1) / 2, (height - 1) / 2
  g_inv = g_inv.astype(jnp.float32)

  # Batch-wide margin of the official code: where the transformed corners land, plus filter support.
  corners = jnp.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], jnp.float32)
  moved = g_inv @ corners.T  # [N, xyz, corner]
  xs, ys = moved[:, 0].reshape(-1), moved[:, 1].reshape(-1)
  margin = jnp.stack([(-xs).max(), (-ys).max(), xs.max(), ys.max()])
  margin = margin + jnp.array([2 * taps_pad - cx, 2 * taps_pad - cy] * 2, jnp.float32)
  margin = jnp.clip(margin, 0, jnp.array([width - 1, height - 1] * 2, jnp.float32))
  mx0, my0, mx1, my1 = jnp.ceil(margin).astype(jnp.int32)

  # Reflect-pad by the largest possible margin, then zero what the official padding would not have.
  pad_x, pad_y = width - 1, height - 1
  images = jnp.pad(images, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode='reflect')
  start_x, start_y = pad_x - mx0, pad_y - my0
  padded_width, padded_height = width + mx0 + mx1, height + my0 + my1
  cols = jnp.arange(images.shape[2])
  rows = jnp.arange(images.shape[1])
  keep = (((cols >= start_x) & (cols < start_x + padded_width))[None, :]
          & ((rows >= start_y) & (rows < start_y + padded_height))[:, None])
  images = images * keep[None, :, :, None]
  g_inv = _translate2d((mx0 - mx1) / 2, (my0 - my1) / 2) @ g_inv

  # 2x upsampling: zero insertion and the time-reversed sym6 filter, width first.
  up_pad = (len(SYM6) + 1) // 2
  images = _depthwise_conv(images, SYM6[::-1], axis=2, lhs_dilation=2, stride=1, padding=up_pad)
  images = _depthwise_conv(images, SYM6[::-1], axis=1, lhs_dilation=2, stride=1, padding=up_pad)
  cols = jnp.arange(images.shape[2])
  rows = jnp.arange(images.shape[1])
  keep = (((cols >= 2 * start_x) & (cols < 2 * (start_x + padded_width)))[None, :]
          & ((rows >= 2 * start_y) & (rows < 2 * (start_y + padded_height)))[:, None])
  images = images * keep[None, :, :, None]
  g_inv = _scale2d(2, 2) @ g_inv @ _scale2d(0.5, 0.5)
  g_inv = _translate2d(-0.5, -0.5) @ g_inv @ _translate2d(0.5, 0.5)

  # affine_grid + grid_sample (align_corners=False) into the output canvas, in normalised
  # coordinates of the official upsampled image (2 * padded size), then shifted into the buffer.
  out_height, out_width = (height + 2 * taps_pad) * 2, (width + 2 * taps_pad) * 2
  up_width, up_height = 2 * padded_width, 2 * padded_height
  g_inv = (_scale2d(2 / up_width, 2 / up_height) @ g_inv
           @ _scale2d(out_width / 2, out_height / 2))
  base_x = (2 * jnp.arange(out_width, dtype=jnp.float32) + 1) / out_width - 1
  base_y = (2 * jnp.arange(out_height, dtype=jnp.float32) + 1) / out_height - 1
  base_x, base_y = base_x[None, None, :], base_y[None, :, None]
  theta = g_inv[:, :2, :, None, None]
  grid_x = theta[:, 0, 0] * base_x + theta[:, 0, 1] * base_y + theta[:, 0, 2]
  grid_y = theta[:, 1, 0] * base_x + theta[:, 1, 1] * base_y + theta[:, 1, 2]
  pixel_x = ((grid_x + 1) * up_width - 1) / 2 + 2 * start_x
  pixel_y = ((grid_y + 1) * up_height - 1) / 2 + 2 * start_y
  images = jax.vmap(_bilinear_zeros)(images, pixel_x, pixel_y)

  # 2x downsampling with the sym6 filter, then crop the filter margin, width first.
  down_pad = (len(SYM6) - 1) // 2
  images = _depthwise_conv(images, SYM6, axis=2, lhs_dilation=1, stride=2, padding=down_pad)
  images = images[:, :, taps_pad:-taps_pad]
  images = _depthwise_conv(images, SYM6, axis=1, lhs_dilation=1, stride=2, padding=down_pad)
  return images[:, taps_pad:-taps_pad]


# ---------------------------------------------------------------------------------------------
# The pipeline.


def augment(rng: jax.Array, images: jnp.ndarray, config: AugmentConfig | Mapping
            ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """EDM's AugmentPipe on NHWC images in [-1, 1]; returns (images, labels [N, augment_dim])."""
  config = _as_config(config)
  n, height, width, channels = images.shape
  keys = iter(jax.random.split(rng, 32))
  labels = [jnp.zeros([n, 0], jnp.float32)]

  def gate(probability, value, shape=(n,)):
    """`value` where a uniform draw falls below probability * p, else 0 (the official gating)."""
    chosen = jax.random.uniform(next(keys), shape) < probability * config.p
    return jnp.where(chosen, value, jnp.zeros_like(value))

  def uniform_pm1(shape=(n,)):
    return jax.random.uniform(next(keys), shape) * 2 - 1

  per_image = lambda v: v[:, None, None, None]

  # Pixel blitting.
  if config.xflip > 0:
    w = gate(config.xflip, jax.random.randint(next(keys), (n,), 0, 2))
    images = jnp.where(per_image(w == 1), images[:, :, ::-1], images)
    labels.append(w)
  if config.yflip > 0:
    w = gate(config.yflip, jax.random.randint(next(keys), (n,), 0, 2))
    images = jnp.where(per_image(w == 1), images[:, ::-1], images)
    labels.append(w)
  if config.rotate_int > 0:
    if height != width:
      raise ValueError(f'augment: rotate_int needs square images, got {height}x{width}')
    w = gate(config.rotate_int, jax.random.randint(next(keys), (n,), 0, 4))
    images = jnp.where(per_image((w == 1) | (w == 2)), images[:, :, ::-1], images)
    images = jnp.where(per_image((w == 2) | (w == 3)), images[:, ::-1], images)
    images = jnp.where(per_image((w == 1) | (w == 3)), images.transpose(0, 2, 1, 3), images)
    labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
  if config.translate_int > 0:
    w = uniform_pm1((2, n))
    w = gate(config.translate_int, w, (1, n))
    tx = jnp.round(w[0] * (width * config.translate_int_max)).astype(jnp.int32)
    ty = jnp.round(w[1] * (height * config.translate_int_max)).astype(jnp.int32)
    # Mirror-reflect source indices, as the official flat-index gather (note: x - tx but y + ty).
    x = jnp.arange(width)[None, :] - tx[:, None]
    y = jnp.arange(height)[None, :] + ty[:, None]
    x = width - 1 - jnp.abs(width - 1 - x % (2 * width - 2))
    y = height - 1 - jnp.abs(height - 1 - y % (2 * height - 2))
    images = jnp.take_along_axis(images, y[:, :, None, None], axis=1)
    images = jnp.take_along_axis(images, x[:, None, :, None], axis=2)
    labels += [tx / (width * config.translate_int_max), ty / (height * config.translate_int_max)]

  # Geometric transformations: compose the inverse transform, then resample once.
  g_inv = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (n, 3, 3))
  if config.scale > 0:
    w = gate(config.scale, jax.random.normal(next(keys), (n,)))
    s = jnp.exp2(w * config.scale_std)
    g_inv = g_inv @ _scale2d(1 / s, 1 / s)
    labels.append(w)
  if config.rotate_frac > 0:
    w = gate(config.rotate_frac, uniform_pm1() * (np.pi * config.rotate_frac_max))
    g_inv = g_inv @ _rotate2d(w)  # rotate2d_inv(-w)
    labels += [jnp.cos(w) - 1, jnp.sin(w)]
  if config.aniso > 0:
    w = jax.random.normal(next(keys), (n,))
    r = uniform_pm1() * np.pi
    w = gate(config.aniso, w)
    r = jnp.where(jax.random.uniform(next(keys), (n,)) < config.aniso_rotate_prob, r, 0.0)
    s = jnp.exp2(w * config.aniso_std)
    g_inv = g_inv @ _rotate2d(-r) @ _scale2d(1 / s, s) @ _rotate2d(r)
    labels += [w * jnp.cos(r), w * jnp.sin(r)]
  if config.translate_frac > 0:
    w = gate(config.translate_frac, jax.random.normal(next(keys), (2, n)), (1, n))
    g_inv = g_inv @ _translate2d(-w[0] * (width * config.translate_frac_std),
                                 -w[1] * (height * config.translate_frac_std))
    labels += [w[0], w[1]]
  if max(config.scale, config.rotate_frac, config.aniso, config.translate_frac) > 0:
    images = apply_geometric(images, g_inv)

  # Color transformations: compose one affine color matrix per image.
  color = jnp.broadcast_to(jnp.eye(4, dtype=jnp.float32), (n, 4, 4))
  luma_axis = np.array([1, 1, 1, 0], np.float32) / np.sqrt(3)
  luma_outer = jnp.asarray(np.outer(luma_axis, luma_axis))
  if config.brightness > 0:
    w = gate(config.brightness, jax.random.normal(next(keys), (n,)))
    b = w * config.brightness_std
    color = _translate3d(b, b, b) @ color
    labels.append(w)
  if config.contrast > 0:
    w = gate(config.contrast, jax.random.normal(next(keys), (n,)))
    c = jnp.exp2(w * config.contrast_std)
    color = _scale3d(c, c, c) @ color
    labels.append(w)
  if config.lumaflip > 0:
    w = gate(config.lumaflip, jax.random.randint(next(keys), (n,), 0, 2))
    color = (jnp.eye(4) - 2 * luma_outer * w[:, None, None]) @ color
    labels.append(w)
  if config.hue > 0:
    w = gate(config.hue, uniform_pm1() * (np.pi * config.hue_max))
    color = _rotate3d(luma_axis, w) @ color
    labels += [jnp.cos(w) - 1, jnp.sin(w)]
  if config.saturation > 0:
    w = gate(config.saturation, jax.random.normal(next(keys), (n,)))
    factor = jnp.exp2(w * config.saturation_std)[:, None, None]
    color = (luma_outer + (jnp.eye(4) - luma_outer) * factor) @ color
    labels.append(w)
  if max(config.brightness, config.contrast, config.lumaflip, config.hue, config.saturation) > 0:
    if channels == 3:
      images = (jnp.einsum('nij,nhwj->nhwi', color[:, :3, :3], images,
                           precision=lax.Precision.HIGHEST) + color[:, None, None, :3, 3])
    elif channels == 1:
      mean_row = color[:, :3, :].mean(axis=1)  # [N, 4]: the gray image sees the average RGB row
      images = (images * mean_row[:, :3].sum(axis=1)[:, None, None, None]
                + mean_row[:, 3][:, None, None, None])
    else:
      raise ValueError(f'augment: color transforms need 1 or 3 channels, got {channels}')

  labels = jnp.concatenate([jnp.asarray(x, jnp.float32).reshape(n, -1) for x in labels], axis=1)
  return images, labels
