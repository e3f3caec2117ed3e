"""Stable Diffusion AutoencoderKL (`stabilityai/sd-vae-ft-mse`) in Flax linen, NHWC, and EDM2's latents.

Parameter names and layouts mirror the diffusers `state_dict` (`encoder.down_blocks.0.resnets.1.conv1.weight`,
`decoder.mid_block.attentions.0.to_out.0.bias`, ...): conv weights OIHW, linear weights [out, in]. Module
names contain dots, so flattening `variables['params']` with sep='.' yields exactly those names;
`convert_diffusers_state` copies a diffusers checkpoint (new `to_q/to_k/to_v/to_out.0` or old
`query/key/value/proj_attn` attention spellings) after strict name and shape checks; the file itself is
read by `sida_jax.formats.safetensors.load_diffusers_safetensors`.

EDM2 latent conventions (`training/encoders.py:StabilityVAEEncoder`):
* `encode_pixels`: uint8 pixels → x/255, i.e. the VAE sees [0, 1] (not [-1, 1]; NVlabs/edm2#9) → raw
  latents = concat(posterior mean, posterior std), 8 channels.
* `encode_latents`: z = mean + std·ε with fresh ε, then z·scale + bias, scale = final_std/raw_std and
  bias = final_mean − raw_mean·scale (final std 0.5, mean 0).
* `decode`: (z − bias)/scale → VAE decoder → clamp to [0, 1] → ·255 → uint8 (truncation).
"""
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sida_jax.models.t2i.layers import Conv2d, GroupNorm, Linear, attention

Array = jax.Array

# EDM2's assumed statistics of the sd-vae-ft-mse raw latents, and the target statistics.
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5

# sd-vae-ft-mse's diffusers config (the AutoencoderKL fields it sets).
SD_VAE_FT_MSE = dict(in_channels=3, out_channels=3, latent_channels=4,
                     block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)

_GN_EPS = 1e-6
_OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


# ----------------------------------------------------------------------------------------------------
# Blocks (PyTorch-named layers from models/t2i/layers.py).


def _group_norm(num_groups: int, channels: int, name: str) -> GroupNorm:
  """The VAE's GroupNorm (ε = 1e-6, where torch's default is 1e-5)."""
  return GroupNorm(num_groups, channels, _GN_EPS, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding (output scale 1)."""
  in_channels: int
  out_channels: int
  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(_group_norm(self.num_groups, self.in_channels, 'norm1')(x))
    h = Conv2d(self.in_channels, self.out_channels, name='conv1')(h)
    h = nn.silu(_group_norm(self.num_groups, self.out_channels, 'norm2')(h))
    h = Conv2d(self.out_channels, self.out_channels, name='conv2')(h)
    if self.in_channels != self.out_channels:
      x = Conv2d(self.in_channels, self.out_channels, kernel=1, padding=0, name='conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """diffusers single-head spatial self-attention with group norm and residual connection."""
  channels: int
  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    y = _group_norm(self.num_groups, c, 'group_norm')(x).reshape(n, h * w, c)
    q = Linear(c, c, name='to_q')(y)
    k = Linear(c, c, name='to_k')(y)
    v = Linear(c, c, name='to_v')(y)
    y = Linear(c, c, name='to_out.0')(attention(q, k, v, heads=1))
    return x + y.reshape(n, h, w, c)


class Encoder(nn.Module):
  in_channels: int
  latent_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  num_groups: int
  mid_block_add_attention: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chans = tuple(self.block_out_channels)
    x = Conv2d(self.in_channels, chans[0], name='conv_in')(x)
    cout = chans[0]
    for i, channels in enumerate(chans):
      for j in range(self.layers_per_block):
        x = ResnetBlock(cout, channels, self.num_groups, name=f'down_blocks.{i}.resnets.{j}')(x)
        cout = channels
      if i < len(chans) - 1:
        # diffusers pads right/bottom by one, then a stride-2 valid convolution.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = Conv2d(cout, cout, stride=2, padding=0, name=f'down_blocks.{i}.downsamplers.0.conv')(x)
    x = _mid_block(x, cout, self.num_groups, self.mid_block_add_attention)
    x = nn.silu(_group_norm(self.num_groups, cout, 'conv_norm_out')(x))
    return Conv2d(cout, 2 * self.latent_channels, name='conv_out')(x)


class Decoder(nn.Module):
  latent_channels: int
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  num_groups: int
  mid_block_add_attention: bool = True

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chans = tuple(reversed(tuple(self.block_out_channels)))
    cout = chans[0]
    x = Conv2d(self.latent_channels, cout, name='conv_in')(z)
    x = _mid_block(x, cout, self.num_groups, self.mid_block_add_attention)
    for i, channels in enumerate(chans):
      for j in range(self.layers_per_block + 1):
        x = ResnetBlock(cout, channels, self.num_groups, name=f'up_blocks.{i}.resnets.{j}')(x)
        cout = channels
      if i < len(chans) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest ×2
        x = Conv2d(cout, cout, name=f'up_blocks.{i}.upsamplers.0.conv')(x)
    x = nn.silu(_group_norm(self.num_groups, cout, 'conv_norm_out')(x))
    return Conv2d(cout, self.out_channels, name='conv_out')(x)


def _mid_block(x: Array, channels: int, num_groups: int, add_attention: bool) -> Array:
  """UNetMidBlock2D: resnet, (attention), resnet. Called inside an Encoder/Decoder compact method."""
  x = ResnetBlock(channels, channels, num_groups, name='mid_block.resnets.0')(x)
  if add_attention:
    x = Attention(channels, num_groups, name='mid_block.attentions.0')(x)
  return ResnetBlock(channels, channels, num_groups, name='mid_block.resnets.1')(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder: `encode` → (posterior mean, std); `decode` → image. NHWC, float32 by default.

  `init(key, x)` runs both halves (encode, then decode the mean) to create every parameter.
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.in_channels, self.latent_channels, self.block_out_channels,
                           self.layers_per_block, self.norm_num_groups, self.mid_block_add_attention)
    self.decoder = Decoder(self.latent_channels, self.out_channels, self.block_out_channels,
                           self.layers_per_block, self.norm_num_groups, self.mid_block_add_attention)
    c = self.latent_channels
    self.quant_conv = Conv2d(2 * c, 2 * c, kernel=1, padding=0) if self.use_quant_conv else None
    self.post_quant_conv = Conv2d(c, c, kernel=1, padding=0) if self.use_post_quant_conv else None

  def encode(self, x: Array) -> tuple:
    """Posterior mean and std (logvar clamped to [−30, 20]), float32."""
    moments = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z: Array) -> Array:
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    mean, _ = self.encode(x)
    return self.decode(mean)


# diffusers' AutoencoderKL constructor defaults for the fields that shape the network.
_DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(64,),
                           layers_per_block=1, norm_num_groups=32, mid_block_add_attention=True,
                           use_quant_conv=True, use_post_quant_conv=True)
# diffusers config entries that describe how the latents are used elsewhere, not the network; keys
# starting with '_' are diffusers' own bookkeeping.
_CONFIG_IGNORED = ('sample_size', 'scaling_factor', 'shift_factor', 'latents_mean', 'latents_std',
                   'force_upcast')


def from_diffusers_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> AutoencoderKL:
  """An `AutoencoderKL` from a diffusers `config.json` dict (only the plain KL architecture).

  Missing entries take diffusers' own defaults, as `AutoencoderKL.from_config` would.
  """
  kwargs = dict(_DIFFUSERS_DEFAULTS)
  num_levels = len(config.get('block_out_channels', kwargs['block_out_channels']))
  for key, value in config.items():
    if key in _CONFIG_IGNORED or key.startswith('_'):
      continue
    if key == 'act_fn':
      if value != 'silu':
        raise ValueError(f"from_diffusers_config: unsupported act_fn {value!r}")
    elif key in ('down_block_types', 'up_block_types'):
      expected = 'DownEncoderBlock2D' if key == 'down_block_types' else 'UpDecoderBlock2D'
      if len(value) != num_levels or any(t != expected for t in value):
        raise ValueError(f"from_diffusers_config: unsupported {key} {list(value)}")
    elif key in _DIFFUSERS_DEFAULTS:
      kwargs[key] = tuple(value) if isinstance(value, list) else value
    else:
      raise ValueError(f"from_diffusers_config: unknown key {key!r}")
  return AutoencoderKL(**kwargs, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Weights from the diffusers checkpoint.


def _modern_name(name: str) -> str:
  """Renames the old attention spellings (`attentions.0.query.weight` → `attentions.0.to_q.weight`)."""
  parts = name.split('.')
  if len(parts) >= 3 and 'attentions' in parts and parts[-2] in _OLD_ATTENTION_NAMES:
    return '.'.join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
  return name


def params_template(vae: AutoencoderKL) -> dict:
  """Abstract `params` (shapes and dtypes) of `vae`, without allocating."""
  return jax.eval_shape(lambda: vae.init(
      jax.random.key(0), jnp.zeros((1, 8, 8, vae.in_channels), jnp.float32)))['params']


def convert_diffusers_state(state: Mapping[str, Any], vae: AutoencoderKL) -> dict:
  """A diffusers AutoencoderKL state_dict (name → array) as this module's variables, strictly checked.

  Every expected name must be present exactly once (either attention spelling), nothing may be left
  over, and every shape must match; 1×1-conv attention weights [out, in, 1, 1] are accepted as linear.
  """
  template = params_template(vae)
  # Module names contain dots, so keep the template's own key paths rather than splitting names.
  expected = {'.'.join(path): leaf for path, leaf in traverse_util.flatten_dict(template).items()}
  renamed = {}
  for name, value in state.items():
    new_name = _modern_name(name)
    if new_name in renamed:
      raise ValueError(f"convert_diffusers_state: {name!r} duplicates {new_name!r}")
    renamed[new_name] = value
  missing = sorted(set(expected) - set(renamed))
  unexpected = sorted(set(renamed) - set(expected))
  if missing:
    raise ValueError(f"convert_diffusers_state: {len(missing)} missing keys, e.g. {missing[:3]}")
  if unexpected:
    raise ValueError(f"convert_diffusers_state: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
  flat = {}
  for path, leaf in traverse_util.flatten_dict(template).items():
    name = '.'.join(path)
    value = np.asarray(renamed[name])
    if value.ndim == 4 and value.shape[2:] == (1, 1) and len(leaf.shape) == 2:
      value = value.reshape(value.shape[:2])
    if value.shape != leaf.shape:
      raise ValueError(f"convert_diffusers_state: {name!r} has shape {value.shape}, expected {leaf.shape}")
    flat[path] = jnp.asarray(value, jnp.float32)
  return {'params': traverse_util.unflatten_dict(flat)}


# ----------------------------------------------------------------------------------------------------
# EDM2 latent conventions.


def edm2_scale_bias(raw_mean: Sequence[float] = EDM2_RAW_MEAN, raw_std: Sequence[float] = EDM2_RAW_STD,
                    final_mean: float = EDM2_FINAL_MEAN, final_std: float = EDM2_FINAL_STD) -> tuple:
  """Per-channel (scale, bias) mapping raw latents to final latents, float32 as EDM2 computes them."""
  scale = np.float32(final_std) / np.asarray(raw_std, np.float32)
  bias = np.float32(final_mean) - np.asarray(raw_mean, np.float32) * scale
  return scale, bias


def encode_pixels(vae: AutoencoderKL, variables, pixels: Array) -> Array:
  """uint8 pixels [N, H, W, 3] → raw latents concat(mean, std) [N, H/8, W/8, 8], VAE input in [0, 1]."""
  x = jnp.asarray(pixels).astype(jnp.float32) / 255
  mean, std = vae.apply(variables, x, method=AutoencoderKL.encode)
  return jnp.concatenate([mean, std], axis=-1)


def encode_latents(raw_latents: Array, rng: Array, scale: Optional[Sequence[float]] = None,
                   bias: Optional[Sequence[float]] = None) -> Array:
  """Raw latents (mean‖std) → final latents (mean + std·ε)·scale + bias, with fresh ε from `rng`."""
  if scale is None or bias is None:
    scale, bias = edm2_scale_bias()
  mean, std = jnp.split(jnp.asarray(raw_latents, jnp.float32), 2, axis=-1)
  z = mean + jax.random.normal(rng, mean.shape, jnp.float32) * std
  return z * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)


def decode(vae: AutoencoderKL, variables, latents: Array, scale: Optional[Sequence[float]] = None,
           bias: Optional[Sequence[float]] = None) -> Array:
  """Final latents → uint8 pixels: undo scale/bias, decode, clamp to [0, 1], ·255, truncate."""
  if scale is None or bias is None:
    scale, bias = edm2_scale_bias()
  z = (jnp.asarray(latents, jnp.float32) - jnp.asarray(bias, jnp.float32)) / jnp.asarray(scale, jnp.float32)
  x = vae.apply(variables, z, method=AutoencoderKL.decode)
  return (jnp.clip(x, 0, 1) * 255).astype(jnp.uint8)
