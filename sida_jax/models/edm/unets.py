"""EDM U-Nets in Flax, NHWC: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM).

Submodules carry the official `state_dict` names (`map_layer0`, `enc.16x16_block0`, `dec.8x8_in0`, ...),
so the flattened variable tree reproduces the PyTorch keys. Both U-Nets also serve as SiDA's shared
encoder/discriminator: `return_flag='encoder'` returns the channel mean of the last encoder output as
patch logits [N, h, w, 1] without running the decoder; 'encoder_decoder' returns (output, logits).
"""
import math
from collections.abc import Sequence
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sida_jax.models.edm.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding,
                                        UNetBlock, WeightInit)

Array = jax.Array
Output = Union[Array, tuple[Array, Array]]

RETURN_FLAGS = ('decoder', 'encoder', 'encoder_decoder')


def _check_return_flag(return_flag: str) -> None:
  if return_flag not in RETURN_FLAGS:
    raise ValueError(f'return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}')


def encoder_logits(x: Array) -> Array:
  """SiDA's discriminator output: the channel mean of an encoder feature map, float32 [N, h, w, 1]."""
  return x.astype(jnp.float32).mean(axis=-1, keepdims=True)


def _drop_labels(module: nn.Module, labels: Array, rate: float, batch: int) -> Array:
  """Zeroes whole label rows with probability `rate` (classifier-free guidance training)."""
  keep = jax.random.uniform(module.make_rng('dropout'), (batch, 1)) >= rate
  return labels * keep.astype(labels.dtype)


def block_class(remat: bool):
  """UNetBlock, or UNetBlock rematerialised: same parameters, activations recomputed in the backward pass
  (`train` is static)."""
  return nn.remat(UNetBlock, static_argnums=(3,)) if remat else UNetBlock


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net of Song et al. as re-implemented in EDM."""
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = 'positional'
  channel_mult_noise: int = 1
  encoder_type: str = 'standard'
  decoder_type: str = 'standard'
  resample_filter: Sequence[float] = (1, 1)
  remat_blocks: bool = False     # recompute each UNetBlock in the backward pass (saves activations)

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array],
               augment_labels: Optional[Array] = None, train: bool = False,
               return_flag: str = 'decoder') -> Output:
    _check_return_flag(return_flag)
    if self.embedding_type not in ('fourier', 'positional'):
      raise ValueError(f'SongUNet: unknown embedding_type {self.embedding_type!r}')
    if self.encoder_type not in ('standard', 'skip', 'residual'):
      raise ValueError(f'SongUNet: unknown encoder_type {self.encoder_type!r}')
    if self.decoder_type not in ('standard', 'skip'):
      raise ValueError(f'SongUNet: unknown decoder_type {self.decoder_type!r}')
    emb_channels = self.model_channels * self.channel_mult_emb
    noise_channels = self.model_channels * self.channel_mult_noise
    init = WeightInit('xavier_uniform')
    init_zero = WeightInit('xavier_uniform', weight=1e-5)
    init_attn = WeightInit('xavier_uniform', weight=math.sqrt(0.2))
    resample_filter = tuple(self.resample_filter)

    def block(cin, cout, name, **kwargs):
      return block_class(self.remat_blocks)(cin, cout, emb_channels, num_heads=1, dropout=self.dropout,
                       skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                       resample_proj=True, adaptive_scale=False, init_default=init, init_zero=init_zero,
                       init_attn=init_attn, name=name, **kwargs)

    # Mapping.
    if self.embedding_type == 'positional':
      emb = PositionalEmbedding(noise_channels, endpoint=True, name='map_noise')(noise_labels)
    else:
      emb = FourierEmbedding(noise_channels, name='map_noise')(noise_labels)
    half = noise_channels // 2
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=1)  # [sin, cos] order of DDPM++/NCSN++
    if self.label_dim:
      labels = class_labels
      if train and self.label_dropout:
        labels = _drop_labels(self, labels, self.label_dropout, x.shape[0])
      emb = emb + Linear(self.label_dim, noise_channels, weight_init=init, name='map_label')(
          labels * math.sqrt(self.label_dim))
    if self.augment_dim and augment_labels is not None:
      emb = emb + Linear(self.augment_dim, noise_channels, bias=False, weight_init=init,
                         name='map_augment')(augment_labels)
    emb = nn.silu(Linear(noise_channels, emb_channels, weight_init=init, name='map_layer0')(emb))
    emb = nn.silu(Linear(emb_channels, emb_channels, weight_init=init, name='map_layer1')(emb))

    # Encoder.
    skips = []
    aux = x
    cout = caux = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      prefix = f'enc.{res}x{res}'
      if level == 0:
        cin, cout = cout, self.model_channels
        x = Conv2d(cin, cout, 3, weight_init=init, name=f'{prefix}_conv')(x)
        skips.append(x)
      else:
        x = block(cout, cout, f'{prefix}_down', down=True)(x, emb, train)
        skips.append(x)
        if self.encoder_type == 'skip':
          aux = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter,
                       name=f'{prefix}_aux_down')(aux)
          x = skips[-1] = x + Conv2d(caux, cout, 1, weight_init=init, name=f'{prefix}_aux_skip')(aux)
        if self.encoder_type == 'residual':
          residual = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                            fused_resample=True, weight_init=init, name=f'{prefix}_aux_residual')
          x = skips[-1] = aux = (x + residual(aux)) / math.sqrt(2)
          caux = cout
      for idx in range(self.num_blocks):
        cin, cout = cout, self.model_channels * mult
        x = block(cin, cout, f'{prefix}_block{idx}', attention=res in self.attn_resolutions)(
            x, emb, train)
        skips.append(x)

    if return_flag == 'encoder':
      return encoder_logits(x)
    features = x

    # Decoder.
    aux = None
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      prefix = f'dec.{res}x{res}'
      if level == last:
        x = block(cout, cout, f'{prefix}_in0', attention=True)(x, emb, train)
        x = block(cout, cout, f'{prefix}_in1')(x, emb, train)
      else:
        x = block(cout, cout, f'{prefix}_up', up=True)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        skip = skips.pop()
        cin, cout = cout + skip.shape[-1], self.model_channels * mult
        x = jnp.concatenate([x, skip], axis=-1)
        attn = idx == self.num_blocks and res in self.attn_resolutions
        x = block(cin, cout, f'{prefix}_block{idx}', attention=attn)(x, emb, train)
      if self.decoder_type == 'skip' or level == 0:
        if self.decoder_type == 'skip' and level < last:
          aux = Conv2d(self.out_channels, self.out_channels, 0, up=True,
                       resample_filter=resample_filter, name=f'{prefix}_aux_up')(aux)
        tmp = GroupNorm(cout, eps=1e-6, name=f'{prefix}_aux_norm')(x)
        tmp = Conv2d(cout, self.out_channels, 3, weight_init=init_zero, name=f'{prefix}_aux_conv')(
            nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
    if return_flag == 'encoder_decoder':
      return aux, encoder_logits(features)
    return aux


class DhariwalUNet(nn.Module):
  """ADM U-Net of Dhariwal & Nichol as re-implemented in EDM."""
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  remat_blocks: bool = False     # recompute each UNetBlock in the backward pass (saves activations)

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array],
               augment_labels: Optional[Array] = None, train: bool = False,
               return_flag: str = 'decoder') -> Output:
    _check_return_flag(return_flag)
    emb_channels = self.model_channels * self.channel_mult_emb
    init = WeightInit('kaiming_uniform', weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
    init_zero = WeightInit('kaiming_uniform', weight=0.0, bias=0.0)

    def block(cin, cout, name, **kwargs):
      return block_class(self.remat_blocks)(cin, cout, emb_channels, channels_per_head=64, dropout=self.dropout,
                       init_default=init, init_zero=init_zero, name=name, **kwargs)

    # Mapping.
    emb = PositionalEmbedding(self.model_channels, name='map_noise')(noise_labels)
    if self.augment_dim and augment_labels is not None:
      emb = emb + Linear(self.augment_dim, self.model_channels, bias=False, weight_init=init_zero,
                         name='map_augment')(augment_labels)
    emb = nn.silu(Linear(self.model_channels, emb_channels, weight_init=init, name='map_layer0')(emb))
    emb = Linear(emb_channels, emb_channels, weight_init=init, name='map_layer1')(emb)
    if self.label_dim:
      labels = class_labels
      if train and self.label_dropout:
        labels = _drop_labels(self, labels, self.label_dropout, x.shape[0])
      label_init = WeightInit('kaiming_normal', weight=math.sqrt(self.label_dim))
      emb = emb + Linear(self.label_dim, emb_channels, bias=False, weight_init=label_init,
                         name='map_label')(labels)
    emb = nn.silu(emb)

    # Encoder.
    skips = []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      prefix = f'enc.{res}x{res}'
      if level == 0:
        cin, cout = cout, self.model_channels * mult
        x = Conv2d(cin, cout, 3, weight_init=init, name=f'{prefix}_conv')(x)
      else:
        x = block(cout, cout, f'{prefix}_down', down=True)(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        cin, cout = cout, self.model_channels * mult
        x = block(cin, cout, f'{prefix}_block{idx}', attention=res in self.attn_resolutions)(
            x, emb, train)
        skips.append(x)

    if return_flag == 'encoder':
      return encoder_logits(x)
    features = x

    # Decoder.
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      prefix = f'dec.{res}x{res}'
      if level == last:
        x = block(cout, cout, f'{prefix}_in0', attention=True)(x, emb, train)
        x = block(cout, cout, f'{prefix}_in1')(x, emb, train)
      else:
        x = block(cout, cout, f'{prefix}_up', up=True)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        skip = skips.pop()
        cin, cout = cout + skip.shape[-1], self.model_channels * mult
        x = jnp.concatenate([x, skip], axis=-1)
        x = block(cin, cout, f'{prefix}_block{idx}', attention=res in self.attn_resolutions)(
            x, emb, train)
    x = GroupNorm(cout, name='out_norm')(x)
    x = Conv2d(cout, self.out_channels, 3, weight_init=init_zero, name='out_conv')(nn.silu(x))
    if return_flag == 'encoder_decoder':
      return x, encoder_logits(features)
    return x
