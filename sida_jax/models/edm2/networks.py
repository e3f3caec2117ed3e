"""EDM2 magnitude-preserving U-Net and preconditioner (Karras et al., 2024) in Flax linen, NHWC.

Parameter names and layouts mirror the official PyTorch `state_dict` (`unet.enc.8x8_conv.weight`,
`logvar_linear.weight`, ...): MPConv weights are [out, in] or [out, in, kh, kw], gains are 0-dim. The
MPFourier `freqs`/`phases` live in the 'buffers' collection.

Forced weight normalisation. The official `MPConv`, in train mode, first overwrites its stored weight
with normalize(weight) and then computes with normalize(weight) of that overwritten tensor, so a
train-mode forward uses normalize(normalize(w0)) and leaves normalize(w0) behind as the new weight.
The modules here never touch their parameters: every forward, train or eval, uses normalize(weight).
A training step reproduces the official behaviour with the pure projection `force_normalize`:

  params = force_normalize(params)                   # becomes the stored (and optimised) weight
  loss, grads = value_and_grad(loss_fn)(params, ...)  # loss_fn calls net.apply(..., train=True)

Frozen or eval-mode networks (teacher, EMA, the network not being updated in a phase) are never
projected, and runs with forced normalisation switched off (SiDA/SiD²A on EDM2-S) skip the projection.
Projecting only after optimiser updates is not equivalent: the initial weights are not unit-norm and
normalize is idempotent only up to its 1e-4 epsilon.
"""
import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_RETURN_FLAGS = ('decoder', 'encoder', 'encoder_decoder')

# Published ImageNet-512 configurations (`train_edm2.py` presets): SD-VAE latents 64x64x4, 1000 classes,
# channel_mult (1, 2, 3, 4), 3 blocks per level, attention at 16x16 and 8x8 (heads = channels / 64).
PRESETS = {
    name: dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=channels,
               channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), dropout=dropout)
    for name, channels, dropout in [
        ('xs', 128, 0.0), ('s', 192, 0.0), ('m', 256, 0.1),
        ('l', 320, 0.1), ('xl', 384, 0.1), ('xxl', 448, 0.1)]
}


def preset_config(name: str) -> dict:
  """`Precond` kwargs of a published EDM2 ImageNet-512 size ('xs', 's', 'm', 'l', 'xl', 'xxl')."""
  if name not in PRESETS:
    raise ValueError(f"preset_config: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return dict(PRESETS[name])


# ----------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.


def normalize(x: Array, axis: Optional[Sequence[int]] = None, eps: float = 1e-4) -> Array:
  """x / (eps + ‖x‖·√(n_norm/n_x)) over `axis` (default: all but the first); the norm is float32."""
  axes = tuple(range(1, x.ndim)) if axis is None else tuple(a % x.ndim for a in axis)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
  reduced = int(np.prod([x.shape[a] for a in axes]))
  norm = eps + norm * float(np.float32(np.sqrt(1.0 / reduced)))
  return x / norm.astype(x.dtype)


def mp_silu(x: Array) -> Array:
  return nn.silu(x) / 0.596


def _lerp(a: Array, b: Array, t: float) -> Array:
  # The two-sided form PyTorch's `lerp` uses, so results agree to the last bit more often.
  return a + t * (b - a) if t < 0.5 else b - (b - a) * (1.0 - t)


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
  """Magnitude-preserving blend (1−t)·a + t·b, rescaled to unit variance."""
  return _lerp(a, b, t) / float(np.sqrt((1 - t) ** 2 + t ** 2))


def mp_cat(a: Array, b: Array, t: float = 0.5) -> Array:
  """Magnitude-preserving concatenation along channels (last axis), `a` weighted by 1−t."""
  na, nb = a.shape[-1], b.shape[-1]
  scale = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
  wa = float(scale / np.sqrt(na) * (1 - t))
  wb = float(scale / np.sqrt(nb) * t)
  return jnp.concatenate([wa * a, wb * b], axis=-1)


def resample(x: Array, filt: Sequence[float] = (1, 1), mode: str = 'keep') -> Array:
  """'keep', or ×2 'down'/'up' with the separable filter outer(f, f)/Σf² (depthwise, NHWC)."""
  if mode == 'keep':
    return x
  if mode not in ('down', 'up'):
    raise ValueError(f"resample: unknown mode {mode!r}")
  f = np.asarray(filt, np.float32)
  if f.ndim != 1 or len(f) % 2:
    raise ValueError(f"resample: filter must be 1-D of even length, got {list(filt)}")
  pad = (len(f) - 1) // 2
  f = f / f.sum()
  channels = x.shape[-1]
  kernel = np.tile(np.outer(f, f)[:, :, None, None], (1, 1, 1, channels))  # HWIO, depthwise
  dims = ('NHWC', 'HWIO', 'NHWC')
  if mode == 'down':
    return lax.conv_general_dilated(
        x, jnp.asarray(kernel, x.dtype), (2, 2), [(pad, pad)] * 2, dimension_numbers=dims,
        feature_group_count=channels, precision=lax.Precision.HIGHEST)
  # Transposed convolution = dilated input, flipped kernel, padding k−1−pad.
  k = len(f)
  kernel = 4 * kernel[::-1, ::-1]
  return lax.conv_general_dilated(
      x, jnp.asarray(kernel, x.dtype), (1, 1), [(k - 1 - pad, k - 1 - pad)] * 2, lhs_dilation=(2, 2),
      dimension_numbers=dims, feature_group_count=channels, precision=lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------------
# Forced weight normalisation as a projection of the parameter tree.


def is_mpconv_weight(path) -> bool:
  """Whether a parameter path ('.'-joined string or key tuple/tree path) names an MPConv weight.

  In EDM2 every tensor called `weight` belongs to an MPConv; gains and Fourier buffers are named
  otherwise.
  """
  if isinstance(path, str):
    path = path.split('.')
  if not path:
    return False
  last = path[-1]
  return getattr(last, 'key', last) == 'weight'


def normalize_weight(w: Array, eps: float = 1e-4) -> Array:
  """Per-output-row weight normalisation w / (eps + ‖w_row‖/√fan_in), in float32, back to w's dtype."""
  return normalize(w.astype(jnp.float32), eps=eps).astype(w.dtype)


def force_normalize(params):
  """Projects every MPConv weight in a parameter (or variables) tree onto the normalised set.

  Gains, buffers and anything not named `weight` pass through unchanged. Apply it to the network being
  trained right before each of its train-mode forwards (see the module docstring).
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: normalize_weight(leaf) if is_mpconv_weight(path) else leaf, params)


# ----------------------------------------------------------------------------------------------------
# Layers.


class MPFourier(nn.Module):
  """Magnitude-preserving Fourier features √2·cos(x ⊗ freqs + phases); freqs/phases are buffers."""
  num_channels: int
  bandwidth: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    freqs = self.variable(
        'buffers', 'freqs', lambda: 2 * np.pi * self.bandwidth
        * jax.random.normal(self.make_rng('params'), (self.num_channels,), jnp.float32))
    phases = self.variable(
        'buffers', 'phases',
        lambda: 2 * np.pi * jax.random.uniform(self.make_rng('params'), (self.num_channels,), jnp.float32))
    y = jnp.outer(x.astype(jnp.float32), freqs.value.astype(jnp.float32))
    y = y + phases.value.astype(jnp.float32)
    return (jnp.cos(y) * float(np.sqrt(2))).astype(x.dtype)


class MPConv(nn.Module):
  """Bias-free linear (kernel ()) or 'same' convolution (kernel (k, k)) with a normalised weight.

  The weight is used as normalize(weight)·gain/√fan_in, computed in float32 and cast to x's dtype.
  """
  in_channels: int
  out_channels: int
  kernel: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: Array, gain: Any = 1.0) -> Array:
    shape = (self.out_channels, self.in_channels, *self.kernel)
    weight = self.param('weight', nn.initializers.normal(stddev=1.0), shape, jnp.float32)
    fan_in = int(np.prod(shape[1:]))
    w = normalize(weight.astype(jnp.float32))
    if isinstance(gain, (int, float)):
      scale = np.float32(gain / np.sqrt(fan_in))  # float64 then rounded, as PyTorch does
    else:
      scale = gain / np.float32(np.sqrt(fan_in))
    w = (w * scale).astype(x.dtype)
    if w.ndim == 2:
      return x @ w.T
    if w.ndim != 4:
      raise ValueError(f"MPConv: kernel must be () or (kh, kw), got {tuple(self.kernel)}")
    pad = w.shape[-1] // 2
    return lax.conv_general_dilated(
        x, w, (1, 1), [(pad, pad)] * 2, dimension_numbers=('NHWC', 'OIHW', 'NHWC'))


class Block(nn.Module):
  """EDM2 encoder ('enc') or decoder ('dec') block with optional cosine self-attention."""
  in_channels: int
  out_channels: int
  emb_channels: int
  flavor: str = 'enc'
  resample_mode: str = 'keep'
  resample_filter: Sequence[float] = (1, 1)
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    if self.flavor not in ('enc', 'dec'):
      raise ValueError(f"Block: unknown flavor {self.flavor!r}")
    num_heads = self.out_channels // self.channels_per_head if self.attention else 0
    emb_gain = self.param('emb_gain', nn.initializers.zeros, (), jnp.float32)
    cin_res0 = self.out_channels if self.flavor == 'enc' else self.in_channels
    conv_res0 = MPConv(cin_res0, self.out_channels, (3, 3), name='conv_res0')
    emb_linear = MPConv(self.emb_channels, self.out_channels, (), name='emb_linear')
    conv_res1 = MPConv(self.out_channels, self.out_channels, (3, 3), name='conv_res1')
    conv_skip = (MPConv(self.in_channels, self.out_channels, (1, 1), name='conv_skip')
                 if self.in_channels != self.out_channels else None)

    # Main branch.
    x = resample(x, self.resample_filter, self.resample_mode)
    if self.flavor == 'enc':
      if conv_skip is not None:
        x = conv_skip(x)
      x = normalize(x, axis=(-1,))  # pixel norm

    # Residual branch, modulated by the embedding.
    y = conv_res0(mp_silu(x))
    c = emb_linear(emb, gain=emb_gain) + 1
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    if self.dropout:
      y = nn.Dropout(rate=self.dropout, deterministic=not train)(y)
    y = conv_res1(y)

    if self.flavor == 'dec' and conv_skip is not None:
      x = conv_skip(x)
    x = mp_sum(x, y, t=self.res_balance)

    if num_heads:
      x = mp_sum(x, self._attention(x, num_heads), t=self.attn_balance)
    if self.clip_act is not None:
      x = jnp.clip(x, -self.clip_act, self.clip_act)
    return x

  def _attention(self, x: Array, num_heads: int) -> Array:
    n, h, w, c = x.shape
    y = MPConv(c, 3 * c, (1, 1), name='attn_qkv')(x)
    # Channel layout (head, channel-within-head, q/k/v), as the official reshape of NCHW.
    y = y.reshape(n, h * w, num_heads, c // num_heads, 3)
    y = normalize(y, axis=(3,))
    q, k, v = y[..., 0], y[..., 1], y[..., 2]
    logits = jnp.einsum('nqhc,nkhc->nhqk', q, k / float(np.sqrt(c // num_heads)))
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    y = jnp.einsum('nhqk,nkhc->nqhc', weights, v).reshape(n, h, w, c)
    return MPConv(c, c, (1, 1), name='attn_proj')(y)


@dataclasses.dataclass(frozen=True)
class _BlockOptions:
  resample_filter: tuple = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256
  remat: bool = False   # recompute the block in the backward pass (`train` static)


class _Layer(NamedTuple):
  name: str
  in_channels: int
  out_channels: int
  flavor: str          # 'conv' (the first 3x3 MPConv), 'enc' or 'dec'
  resample_mode: str
  attention: bool


def _unet_layers(img_resolution: int, img_channels: int, cblock: Sequence[int], num_blocks: int,
                 attn_resolutions: Sequence[int]) -> tuple:
  """The official `enc` and `dec` ModuleDicts as ordered layer lists."""
  enc = []
  cout = img_channels + 1  # the constant-ones channel
  for level, channels in enumerate(cblock):
    res = img_resolution >> level
    if level == 0:
      enc.append(_Layer(f'{res}x{res}_conv', cout, channels, 'conv', 'keep', False))
      cout = channels
    else:
      enc.append(_Layer(f'{res}x{res}_down', cout, cout, 'enc', 'down', False))
    for idx in range(num_blocks):
      enc.append(_Layer(f'{res}x{res}_block{idx}', cout, channels, 'enc', 'keep', res in attn_resolutions))
      cout = channels
  dec = []
  skips = [layer.out_channels for layer in enc]
  for level, channels in reversed(list(enumerate(cblock))):
    res = img_resolution >> level
    if level == len(cblock) - 1:
      dec.append(_Layer(f'{res}x{res}_in0', cout, cout, 'dec', 'keep', True))
      dec.append(_Layer(f'{res}x{res}_in1', cout, cout, 'dec', 'keep', False))
    else:
      dec.append(_Layer(f'{res}x{res}_up', cout, cout, 'dec', 'up', False))
    for idx in range(num_blocks + 1):
      dec.append(_Layer(f'{res}x{res}_block{idx}', cout + skips.pop(), channels, 'dec', 'keep',
                        res in attn_resolutions))
      cout = channels
  return tuple(enc), tuple(dec)


def _block(layer: _Layer, emb_channels: int, options: _BlockOptions) -> Block:
  kwargs = dataclasses.asdict(options)
  block = nn.remat(Block, static_argnums=(3,)) if kwargs.pop('remat') else Block
  return block(layer.in_channels, layer.out_channels, emb_channels, flavor=layer.flavor,
               resample_mode=layer.resample_mode, attention=layer.attention, name=layer.name, **kwargs)


class _Encoder(nn.Module):
  """The official `enc` ModuleDict; returns the last output and every module's output (skips)."""
  layers: tuple
  emb_channels: int
  options: _BlockOptions

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool) -> tuple:
    skips = []
    for layer in self.layers:
      if layer.flavor == 'conv':
        x = MPConv(layer.in_channels, layer.out_channels, (3, 3), name=layer.name)(x)
      else:
        x = _block(layer, self.emb_channels, self.options)(x, emb, train)
      skips.append(x)
    return x, skips


class _Decoder(nn.Module):
  """The official `dec` ModuleDict; every `*_block*` first concatenates the matching skip."""
  layers: tuple
  emb_channels: int
  options: _BlockOptions
  concat_balance: float

  @nn.compact
  def __call__(self, x: Array, emb: Array, skips: list, train: bool) -> Array:
    skips = list(skips)
    for layer in self.layers:
      if 'block' in layer.name:
        x = mp_cat(x, skips.pop(), t=self.concat_balance)
      x = _block(layer, self.emb_channels, self.options)(x, emb, train)
    return x


def _check_return_flag(return_flag: str) -> None:
  if return_flag not in _RETURN_FLAGS:
    raise ValueError(f"unknown return_flag {return_flag!r}; expected one of {_RETURN_FLAGS}")


class UNet(nn.Module):
  """EDM2 U-Net F(x, c_noise, labels); NHWC in and out.

  `return_flag`: 'decoder' → F; 'encoder' → logits; 'encoder_decoder' → (F, logits). The logits are the
  float32 channel mean [N, h, w, 1] of the last encoder module's output (SiDA's discriminator).
  """
  img_resolution: int
  img_channels: int
  label_dim: int
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_noise: Optional[int] = None
  channel_mult_emb: Optional[int] = None
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  resample_filter: Sequence[float] = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256
  remat_blocks: bool = False     # recompute each Block in the backward pass (saves activations)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               train: bool = False, return_flag: str = 'decoder'):
    _check_return_flag(return_flag)
    cblock = [self.model_channels * m for m in self.channel_mult]
    cnoise = (self.model_channels * self.channel_mult_noise if self.channel_mult_noise is not None
              else cblock[0])
    cemb = (self.model_channels * self.channel_mult_emb if self.channel_mult_emb is not None
            else max(cblock))
    out_gain = self.param('out_gain', nn.initializers.zeros, (), jnp.float32)
    options = _BlockOptions(tuple(self.resample_filter), self.channels_per_head, self.dropout,
                            self.res_balance, self.attn_balance, self.clip_act, self.remat_blocks)
    enc_layers, dec_layers = _unet_layers(self.img_resolution, self.img_channels, cblock,
                                          self.num_blocks, self.attn_resolutions)

    # Embedding (float32: it follows the dtype of the noise labels).
    emb = MPConv(cnoise, cemb, (), name='emb_noise')(MPFourier(cnoise, name='emb_fourier')(noise_labels))
    if self.label_dim:
      if class_labels is None:
        raise ValueError(f"UNet: class_labels [N, {self.label_dim}] required for a conditional net")
      labels = class_labels * float(np.sqrt(class_labels.shape[1]))
      emb = mp_sum(emb, MPConv(self.label_dim, cemb, (), name='emb_label')(labels), t=self.label_balance)
    emb = mp_silu(emb)

    x = x.astype(self.dtype)
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    x, skips = _Encoder(enc_layers, cemb, options, name='enc')(x, emb, train)
    logits = jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True)
    if return_flag == 'encoder' and not self.is_initializing():
      return logits

    x = _Decoder(dec_layers, cemb, options, self.concat_balance, name='dec')(x, emb, skips, train)
    out = MPConv(cblock[0], self.img_channels, (3, 3), name='out_conv')(x, gain=out_gain)
    if return_flag == 'encoder':
      return logits
    return out if return_flag == 'decoder' else (out, logits)


_UNET_FIELDS = tuple(f.name for f in dataclasses.fields(UNet)
                     if f.name not in ('parent', 'name', 'dtype'))


class Precond(nn.Module):
  """EDM2 preconditioned denoiser D(x, σ) = c_skip·x + c_out·F(c_in·x, ln σ / 4) with logvar head u(σ).

  Called as `apply(variables, x, sigma, class_labels=None, augment_labels=None, train=False,
  return_flag='decoder', return_logvar=False, rngs={'dropout': key})`; x is NHWC, sigma a scalar, [N] or
  [N, 1, 1, 1]. `augment_labels` is accepted for a uniform call signature and ignored: EDM2 has no
  augmentation input. `label_dropout` (classifier-free guidance training) zeroes each sample's label
  with that probability, only when `train`. `logvar_channels=0` builds no logvar head (the SiD EDM2
  generator). `dtype` is the U-Net compute dtype; σ math, the logvar head and outputs stay float32.
  """
  img_resolution: int
  img_channels: int
  label_dim: int
  sigma_data: float = 0.5
  logvar_channels: int = 128
  label_dropout: float = 0.0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_noise: Optional[int] = None
  channel_mult_emb: Optional[int] = None
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  resample_filter: Sequence[float] = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256
  remat_blocks: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, sigma: Any, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False,
               return_flag: str = 'decoder', return_logvar: bool = False):
    del augment_labels  # no augmentation conditioning in EDM2
    _check_return_flag(return_flag)
    if return_logvar and not self.logvar_channels:
      raise ValueError("Precond: return_logvar=True but this network has no logvar head")
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1, 1)
    if not self.label_dim:
      class_labels = None
    elif class_labels is None:
      class_labels = jnp.zeros((1, self.label_dim), jnp.float32)
    else:
      class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim)
      if train and self.label_dropout:
        keep = jax.random.uniform(self.make_rng('dropout'), (class_labels.shape[0], 1)) >= self.label_dropout
        class_labels = class_labels * keep.astype(jnp.float32)

    sd = self.sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / jnp.sqrt(sigma ** 2 + sd ** 2)
    c_in = 1 / jnp.sqrt(sd ** 2 + sigma ** 2)
    c_noise = jnp.log(sigma.reshape(-1)) / 4

    unet = UNet(**{k: getattr(self, k) for k in _UNET_FIELDS}, dtype=self.dtype, name='unet')
    out = unet((c_in * x).astype(self.dtype), c_noise, class_labels, train=train, return_flag=return_flag)
    if return_flag == 'encoder':
      result = (out,)
    elif return_flag == 'decoder':
      result = (c_skip * x + c_out * out.astype(jnp.float32),)
    else:
      result = (c_skip * x + c_out * out[0].astype(jnp.float32), out[1])

    if self.logvar_channels and (return_logvar or self.is_initializing()):
      fourier = MPFourier(self.logvar_channels, name='logvar_fourier')(c_noise)
      logvar = MPConv(self.logvar_channels, 1, (), name='logvar_linear')(fourier).reshape(-1, 1, 1, 1)
      if return_logvar:
        result = result + (logvar,)
    return result[0] if len(result) == 1 else result
