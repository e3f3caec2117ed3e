"""Tests for sida_jax.augment: closed forms and a NumPy transcription of EDM's AugmentPipe."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax import augment as aug

H = W = 16


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).uniform(-1, 1, size=(8, H, W, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted(config: aug.AugmentConfig):
  return jax.jit(lambda rng, x: aug.augment(rng, x, config))


def _run(config, images, seed=0):
  out, labels = _jitted(config)(jax.random.key(seed), jnp.asarray(images))
  return np.asarray(out), np.asarray(labels)


# ---------------------------------------------------------------------------------------------
# A literal NumPy (float64) transcription of the official geometric step, with its data-dependent
# padding size; the port instead pads to a fixed size and masks.


def _correlate(x, taps, axis, padding, stride=1):
  """torch conv2d with one 1-D depthwise kernel along `axis` of NCHW x (zero padding)."""
  pad = [(0, 0)] * 4
  pad[axis] = (padding, padding)
  x = np.pad(x, pad)
  length = (x.shape[axis] - len(taps)) // stride + 1
  out = 0
  for k, tap in enumerate(taps):
    out = out + tap * np.take(x, np.arange(length) * stride + k, axis=axis)
  return out


def _grid_sample_zeros(image, ix, iy):
  """Bilinear sampling of a CHW image at pixel coordinates, zeros outside."""
  c, h, w = image.shape
  out = np.zeros((c,) + ix.shape)
  x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
  for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
    weight = (1 - np.abs(ix - xi)) * (1 - np.abs(iy - yi))
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out += image[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)] * (weight * inside)
  return out


def _t2(tx, ty):
  return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def _s2(sx, sy):
  return np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], np.float64)


def _r2(theta):
  return np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                   [0, 0, 1]])


def _reference_geometric(images_nhwc, g_inv):
  x = images_nhwc.transpose(0, 3, 1, 2).astype(np.float64)
  n, c, h, w = x.shape
  hz = aug.SYM6.astype(np.float64)
  hz_pad = len(hz) // 4
  cx, cy = (w - 1) / 2, (h - 1) / 2
  cp = np.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]])
  cp = g_inv @ cp.T
  margin = cp[:, :2, :].transpose(1, 0, 2).reshape(2, -1)
  margin = np.concatenate([-margin, margin]).max(axis=1)
  margin = margin + np.array([hz_pad * 2 - cx, hz_pad * 2 - cy] * 2)
  margin = np.minimum(np.maximum(margin, 0), [w - 1, h - 1] * 2)
  mx0, my0, mx1, my1 = np.ceil(margin).astype(int)
  x = np.pad(x, ((0, 0), (0, 0), (my0, my1), (mx0, mx1)), mode='reflect')
  g = np.stack([_t2((mx0 - mx1) / 2, (my0 - my1) / 2) @ gi for gi in g_inv])
  # Upsample: interleave zeros (dropping the last), reversed filter, padding 6; width then height.
  z = np.zeros(x.shape[:3] + (2 * x.shape[3] - 1,))
  z[..., ::2] = x
  x = _correlate(z, hz[::-1], axis=3, padding=(len(hz) + 1) // 2)
  z = np.zeros(x.shape[:2] + (2 * x.shape[2] - 1, x.shape[3]))
  z[:, :, ::2] = x
  x = _correlate(z, hz[::-1], axis=2, padding=(len(hz) + 1) // 2)
  g = _s2(2, 2) @ g @ _s2(0.5, 0.5)
  g = _t2(-0.5, -0.5) @ g @ _t2(0.5, 0.5)
  out_h, out_w = (h + hz_pad * 2) * 2, (w + hz_pad * 2) * 2
  g = _s2(2 / x.shape[3], 2 / x.shape[2]) @ g @ _s2(out_w / 2, out_h / 2)
  base_x = ((2 * np.arange(out_w) + 1) / out_w - 1)[None, :]
  base_y = ((2 * np.arange(out_h) + 1) / out_h - 1)[:, None]
  sampled = []
  for i in range(n):
    gx = g[i, 0, 0] * base_x + g[i, 0, 1] * base_y + g[i, 0, 2]
    gy = g[i, 1, 0] * base_x + g[i, 1, 1] * base_y + g[i, 1, 2]
    ix, iy = ((gx + 1) * x.shape[3] - 1) / 2, ((gy + 1) * x.shape[2] - 1) / 2
    sampled.append(_grid_sample_zeros(x[i], ix, iy))
  x = np.stack(sampled)
  x = _correlate(x, hz, axis=3, padding=(len(hz) - 1) // 2, stride=2)[:, :, :, hz_pad:-hz_pad]
  x = _correlate(x, hz, axis=2, padding=(len(hz) - 1) // 2, stride=2)[:, :, hz_pad:-hz_pad, :]
  return x.transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------
# Tests.


def test_sym6_is_an_orthonormal_lowpass_filter():
  h = aug.SYM6.astype(np.float64)
  np.testing.assert_allclose(h.sum(), np.sqrt(2), atol=1e-6)
  for shift in range(0, 6):
    np.testing.assert_allclose(np.dot(h[:len(h) - 2 * shift], h[2 * shift:]), float(shift == 0),
                               atol=1e-6)


def test_p0_is_identity_with_zero_labels(images):
  out, labels = _run(aug.edm_config(0.0), images)
  assert labels.shape == (8, 9) and aug.augment_dim(aug.edm_config(0.0)) == 9
  np.testing.assert_array_equal(labels, 0.0)
  # The official code still resamples through the sym6 path, which is orthonormal: float error only.
  np.testing.assert_allclose(out, images, atol=2e-5)


def test_xflip_and_yflip_are_exact_mirrors_with_label_bits(images):
  out, labels = _run(aug.AugmentConfig(xflip=1, yflip=1), images, seed=3)
  assert labels.shape == (8, 2) and set(np.unique(labels)) <= {0.0, 1.0}
  assert 0 < labels[:, 0].sum() < 8 and 0 < labels[:, 1].sum() < 8
  for image, result, (fx, fy) in zip(images, out, labels):
    expected = image[:, ::-1] if fx else image
    expected = expected[::-1] if fy else expected
    np.testing.assert_array_equal(result, expected)


def test_rotate_int_is_an_exact_quarter_turn(images):
  out, labels = _run(aug.AugmentConfig(rotate_int=1), images, seed=1)
  turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}  # official (w==1|w==2, w==2|w==3) labels
  seen = set()
  for image, result, label in zip(images, out, labels):
    k = turns[tuple(label.astype(int))]
    seen.add(k)
    np.testing.assert_array_equal(result, np.rot90(image, k=[0, 1, 2, -1][k], axes=(0, 1)))
  assert len(seen) > 1


def test_integer_translation_is_an_exact_reflected_shift(images):
  config = aug.AugmentConfig(translate_int=1, translate_int_max=0.25)
  out, labels = _run(config, images, seed=2)
  steps = W * config.translate_int_max
  shifts = np.round(labels * steps).astype(int)
  np.testing.assert_allclose(shifts, labels * steps, atol=1e-5)  # labels are whole pixels / range
  assert np.abs(shifts).max() > 0
  for image, result, (tx, ty) in zip(images, out, shifts):
    padded = np.pad(image, ((H, H), (W, W), (0, 0)), mode='reflect')
    # Official indexing: output (y, x) reads input (y + ty, x - tx), mirrored at the borders.
    np.testing.assert_array_equal(result, padded[H + ty:2 * H + ty, W - tx:2 * W - tx])


def test_identity_transform_round_trips_through_sym6(images):
  # scale enabled with zero spread: the geometric path runs with G = I.
  out, labels = _run(aug.AugmentConfig(scale=1, scale_std=0.0), images)
  assert np.abs(labels).max() > 0
  np.testing.assert_allclose(out, images, atol=2e-5)


@pytest.mark.parametrize('case', ['mixed', 'zoom_out_clamped', 'zoom_out_past_margin'])
def test_apply_geometric_matches_official_transcription(images, case):
  if case == 'mixed':  # different transforms per image; the margin is shared by the batch
    g_inv = np.stack(
        [np.eye(3), _r2(0.3), _s2(1.3, 0.8) @ _t2(2.5, -1.25), _r2(-2.0) @ _s2(0.7, 0.7)] * 2)
  elif case == 'zoom_out_clamped':  # zoomed out 3x: the margin is clamped to side - 1, zeros appear
    g_inv = np.stack([_s2(3.0, 3.0) @ _r2(0.2 * i) for i in range(8)])
  else:
    # Zoomed out 2.45x on 32x32: the official margin (not clamped) is narrower than the sampled
    # area, so its zero padding shows through; this is what the port's masks reproduce.
    images = np.concatenate([images, images[:, ::-1]], axis=1)
    images = np.concatenate([images, images[:, :, ::-1]], axis=2)[:2]
    g_inv = np.stack([_s2(2.45, 2.45), np.eye(3)])
  got = jax.jit(aug.apply_geometric)(jnp.asarray(images), jnp.asarray(g_inv, jnp.float32))
  got = np.asarray(got)
  expected = _reference_geometric(images, g_inv)
  np.testing.assert_allclose(got, expected, atol=5e-5)


def test_edm_preset_labels_describe_the_applied_transform(images):
  """Rebuilds G from the 9 labels with the official formulas and compares images end to end."""
  config = aug.edm_config(1.0)
  out, labels = _run(config, images, seed=7)
  n = len(images)
  g_inv = []
  flipped = []
  for i in range(n):
    xflip, yflip, scale, cos1, sin, a_cos, a_sin, tx, ty = labels[i].astype(np.float64)
    image = images[i][:, ::-1] if xflip else images[i]
    flipped.append(image[::-1] if yflip else image)
    s = 2 ** (scale * config.scale_std)
    theta = np.arctan2(sin, cos1 + 1)
    # aniso labels (w cos r, w sin r) fix (w, r) only up to (w, r) -> (-w, r + pi), which is a
    # different transform: try both readings and keep the closer one.
    w = np.hypot(a_cos, a_sin)
    r = np.arctan2(a_sin, a_cos)
    g = _s2(1 / s, 1 / s) @ _r2(theta)
    candidates = [(w, r), (-w, r - np.pi if r > 0 else r + np.pi)]
    shift = _t2(-tx * W * config.translate_frac_std, -ty * H * config.translate_frac_std)
    g_inv.append([g @ _r2(-rr) @ _s2(2 ** -(ww * config.aniso_std), 2 ** (ww * config.aniso_std))
                  @ _r2(rr) @ shift for ww, rr in candidates])
  flipped = np.stack(flipped)
  for choice in range(2):  # the two aniso readings give two candidate images per sample
    expected = _reference_geometric(flipped, np.stack([g[choice] for g in g_inv]))
    if choice == 0:
      best = np.abs(out - expected).max(axis=(1, 2, 3))
    else:
      best = np.minimum(best, np.abs(out - expected).max(axis=(1, 2, 3)))
  np.testing.assert_array_less(best, 1e-4)


def test_color_transforms_closed_form(images):
  config = aug.AugmentConfig(brightness=1, contrast=1, lumaflip=1)
  out, labels = _run(config, images, seed=5)
  b = labels[:, 0] * config.brightness_std
  c = 2 ** (labels[:, 1] * config.contrast_std)
  flip = labels[:, 2]
  y = c[:, None, None, None] * (images + b[:, None, None, None])
  expected = y - (2 / 3) * flip[:, None, None, None] * y.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  gray, gray_labels = _run(config, images[..., :1], seed=5)
  y = c[:, None, None, None] * (images[..., :1] + b[:, None, None, None])
  # One channel sees the mean RGB row of the color matrix: the luma flip maps y to y - 2y = -y.
  np.testing.assert_allclose(gray_labels, labels)
  np.testing.assert_allclose(gray, y * (1 - 2 * flip[:, None, None, None]), rtol=1e-5, atol=1e-5)


def test_label_frequencies_follow_p():
  p, n = 0.4, 2048
  batch = jnp.zeros((n, 4, 4, 1))
  _, labels = _run(aug.edm_config(p), batch, seed=11)
  labels = np.asarray(labels)
  active = labels != 0
  # 2048 draws: standard errors <= 0.011; allow 4 of them.
  tol = 0.045
  np.testing.assert_allclose(active[:, 0].mean(), 0.5, atol=tol)  # xflip 1e8: always a fair coin
  np.testing.assert_allclose(active[:, 1].mean(), p / 2, atol=tol)  # yflip: p, then a fair coin
  for column in (2, 4, 5, 7, 8):  # scale, rotation sin, aniso w cos r, translation x / y
    np.testing.assert_allclose(active[:, column].mean(), p, atol=tol)
  np.testing.assert_allclose(active[:, 6].mean(), p * 0.5, atol=tol)  # aniso in a rotated frame
  drawn = labels[active[:, 2], 2]  # scale labels are standard normal where applied
  np.testing.assert_allclose([drawn.mean(), drawn.std()], [0, 1], atol=0.12)


def test_jit_is_deterministic_in_the_key_and_config_is_checked(images):
  first = _run(aug.edm_config(0.5), images, seed=4)
  again = _run(aug.edm_config(0.5), images, seed=4)
  other = _run(aug.edm_config(0.5), images, seed=5)
  np.testing.assert_array_equal(first[0], again[0])
  assert np.abs(first[1] - other[1]).max() > 0
  assert aug.augment_dim({'p': 1, 'xflip': 1, 'hue': 1}) == 3
  with pytest.raises(ValueError, match="unknown key 'xflp'"):
    aug.augment(jax.random.key(0), images, {'xflp': 1})
  with pytest.raises(ValueError, match='1 or 3 channels'):
    aug.augment(jax.random.key(0), np.zeros((2, 4, 4, 2), np.float32), {'brightness': 1})
