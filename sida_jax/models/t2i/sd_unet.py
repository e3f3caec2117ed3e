"""diffusers' `UNet2DConditionModel` as Stable Diffusion 1.x / 2.x use it, in Flax linen, NHWC.

    unet = from_diffusers_config(config)            # config.json of a diffusers `unet/` folder
    variables = convert_diffusers_state(state, unet)  # its state_dict (name -> array), strictly checked
    eps = unet.apply(variables, latents_nhwc, timesteps, text_embeddings)

Parameter names equal the diffusers state_dict (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
.weight`, ...), layouts are PyTorch's (see `layers.py`), so conversion is a checked 1:1 copy.

Structure (diffusers names): sinusoidal `Timesteps` -> `time_embedding` MLP; `conv_in`; down blocks of
ResnetBlock2D (+ Transformer2DModel for CrossAttnDownBlock2D) and a stride-2 conv; the mid block
(resnet, transformer, resnet); up blocks that concatenate the skips, then nearest 2x + conv; GroupNorm,
SiLU, `conv_out`. Historic naming: diffusers reads `attention_head_dim` as the number of heads
(SD1: 8 heads everywhere; SD2: [5, 10, 20, 20], i.e. 64 channels per head).
"""
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sida_jax.models.t2i.layers import Conv2d, GroupNorm, LayerNorm, Linear, attention, strict_variables

Array = jax.Array

CROSS_DOWN, PLAIN_DOWN = 'CrossAttnDownBlock2D', 'DownBlock2D'
CROSS_UP, PLAIN_UP = 'CrossAttnUpBlock2D', 'UpBlock2D'


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Array:
  """diffusers `get_timestep_embedding`: [sin(t f), cos(t f)] (or [cos, sin]), f_i = P^(-i/(dim/2 - shift))."""
  half = dim // 2
  # Frequencies in float32 as diffusers computes them: at t ~ 1000 the phases depend on their last bit.
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  freqs = np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x: Array, size: tuple) -> Array:
  """torch `F.interpolate(mode='nearest')` to `size` (source index floor(i * in/out), in float32)."""
  n, h, w, c = x.shape
  if size == (2 * h, 2 * w):
    return jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
  rows = [min(int(np.floor(np.float32(i) * np.float32(h / size[0]))), h - 1) for i in range(size[0])]
  cols = [min(int(np.floor(np.float32(j) * np.float32(w / size[1]))), w - 1) for j in range(size[1])]
  return x[:, np.asarray(rows)][:, :, np.asarray(cols)]


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D ('default' time embedding: added after conv1; 1x1 conv shortcut)."""
  in_channels: int
  out_channels: int
  temb_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    cin, cout = self.in_channels, self.out_channels
    h = nn.silu(GroupNorm(self.groups, cin, self.eps, name='norm1')(x))
    h = Conv2d(cin, cout, name='conv1')(h)
    h = h + Linear(self.temb_channels, cout, name='time_emb_proj')(nn.silu(temb))[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, cout, self.eps, name='norm2')(h))
    h = Conv2d(cout, cout, name='conv2')(h)
    if cin != cout:
      x = Conv2d(cin, cout, kernel=1, padding=0, name='conv_shortcut')(x)
    y = x + h
    return y if self.output_scale_factor == 1 else y / self.output_scale_factor


class Attention(nn.Module):
  """diffusers Attention: bias-free q/k/v projections, `to_out.0` with bias; self-attention without context."""
  query_dim: int
  context_dim: int
  heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = Linear(self.query_dim, inner, use_bias=False, name='to_q')(x)
    k = Linear(self.context_dim, inner, use_bias=False, name='to_k')(context)
    v = Linear(self.context_dim, inner, use_bias=False, name='to_v')(context)
    return Linear(inner, self.query_dim, name='to_out.0')(attention(q, k, v, self.heads))


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention and GEGLU feed-forward (4x inner width), each residual."""
  dim: int
  heads: int
  head_dim: int
  cross_attention_dim: int

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    d = self.dim
    x = x + Attention(d, d, self.heads, self.head_dim, name='attn1')(LayerNorm(d, name='norm1')(x))
    x = x + Attention(d, self.cross_attention_dim, self.heads, self.head_dim, name='attn2')(
        LayerNorm(d, name='norm2')(x), context)
    h = Linear(d, 8 * d, name='ff.net.0.proj')(LayerNorm(d, name='norm3')(x))
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * nn.gelu(gate, approximate=False)
    return x + Linear(4 * d, d, name='ff.net.2')(h)


class Transformer2DModel(nn.Module):
  """GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or linear for SD2) -> transformer blocks -> proj_out, residual."""
  channels: int
  heads: int
  head_dim: int
  num_layers: int
  cross_attention_dim: int
  groups: int
  use_linear_projection: bool

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    n, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = GroupNorm(self.groups, c, 1e-6, name='norm')(x)
    if self.use_linear_projection:
      y = Linear(c, inner, name='proj_in')(y.reshape(n, h * w, c))
    else:
      y = Conv2d(c, inner, kernel=1, padding=0, name='proj_in')(y).reshape(n, h * w, inner)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(inner, self.heads, self.head_dim, self.cross_attention_dim,
                                name=f'transformer_blocks.{i}')(y, context)
    if self.use_linear_projection:
      y = Linear(inner, c, name='proj_out')(y).reshape(n, h, w, c)
    else:
      y = Conv2d(inner, c, kernel=1, padding=0, name='proj_out')(y.reshape(n, h, w, inner))
    return y + x


class UNet2DConditionModel(nn.Module):
  """ε-prediction U-Net: `(sample [N, H, W, C], timesteps [] or [N], encoder_hidden_states [N, L, D])`
  -> [N, H, W, out_channels] float32. Per-level sequences are indexed like `block_out_channels`
  (down order); `num_attention_heads` is the resolved head count per level. Parameters float32,
  activations in `dtype`."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  up_block_types: Sequence[str] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  layers_per_block: Sequence[int] = (2, 2, 2, 2)
  transformer_layers_per_block: Sequence[int] = (1, 1, 1, 1)
  num_attention_heads: Sequence[int] = (8, 8, 8, 8)
  cross_attention_dim: Sequence[int] = (768, 768, 768, 768)
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  time_embedding_dim: Optional[int] = None
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  center_input_sample: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  dtype: Any = jnp.float32

  def _transformer(self, level: int, channels: int, name: str) -> Transformer2DModel:
    heads = self.num_attention_heads[level]
    return Transformer2DModel(channels, heads, channels // heads, self.transformer_layers_per_block[level],
                              self.cross_attention_dim[level], self.norm_num_groups,
                              self.use_linear_projection, name=name)

  @nn.compact
  def __call__(self, sample: Array, timesteps: Array, encoder_hidden_states: Array) -> Array:
    chans = tuple(self.block_out_channels)
    levels = len(chans)
    groups, eps = self.norm_num_groups, self.norm_eps
    n = sample.shape[0]
    x = sample.astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1
    context = encoder_hidden_states.astype(self.dtype)

    temb_dim = self.time_embedding_dim or 4 * chans[0]
    t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (n,))
    temb = timestep_embedding(t, chans[0], self.flip_sin_to_cos, self.freq_shift).astype(self.dtype)
    temb = Linear(chans[0], temb_dim, name='time_embedding.linear_1')(temb)
    temb = Linear(temb_dim, temb_dim, name='time_embedding.linear_2')(nn.silu(temb))

    def resnet(x, cout, name, scale=1.0):
      return ResnetBlock2D(x.shape[-1], cout, temb_dim, groups, eps, scale, name=name)(x, temb)

    k = self.conv_in_kernel
    x = Conv2d(self.in_channels, chans[0], kernel=k, padding=(k - 1) // 2, name='conv_in')(x)
    skips = [x]
    for i, block_type in enumerate(self.down_block_types):
      prefix = f'down_blocks.{i}'
      for j in range(self.layers_per_block[i]):
        x = resnet(x, chans[i], f'{prefix}.resnets.{j}')
        if block_type == CROSS_DOWN:
          x = self._transformer(i, chans[i], f'{prefix}.attentions.{j}')(x, context)
        skips.append(x)
      if i < levels - 1:
        if self.downsample_padding == 0:  # diffusers pads right/bottom only, then a valid convolution
          x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = Conv2d(chans[i], chans[i], stride=2, padding=self.downsample_padding,
                   name=f'{prefix}.downsamplers.0.conv')(x)
        skips.append(x)

    x = resnet(x, chans[-1], 'mid_block.resnets.0', self.mid_block_scale_factor)
    x = self._transformer(levels - 1, chans[-1], 'mid_block.attentions.0')(x, context)
    x = resnet(x, chans[-1], 'mid_block.resnets.1', self.mid_block_scale_factor)

    # Sizes not divisible by 2^(levels-1): each upsampler targets the spatial size of the next skip.
    factor = 2 ** (levels - 1)
    exact = sample.shape[1] % factor == 0 and sample.shape[2] % factor == 0
    for i, block_type in enumerate(self.up_block_types):
      level = levels - 1 - i
      prefix = f'up_blocks.{i}'
      for j in range(self.layers_per_block[level] + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = resnet(x, chans[level], f'{prefix}.resnets.{j}')
        if block_type == CROSS_UP:
          x = self._transformer(level, chans[level], f'{prefix}.attentions.{j}')(x, context)
      if i < levels - 1:
        size = (2 * x.shape[1], 2 * x.shape[2]) if exact else tuple(skips[-1].shape[1:3])
        x = Conv2d(chans[level], chans[level], name=f'{prefix}.upsamplers.0.conv')(upsample_nearest(x, size))

    x = nn.silu(GroupNorm(groups, chans[0], eps, name='conv_norm_out')(x))
    k = self.conv_out_kernel
    x = Conv2d(chans[0], self.out_channels, kernel=k, padding=(k - 1) // 2, name='conv_out')(x)
    return x.astype(jnp.float32)

  def example_inputs(self, batch_size: int = 1) -> tuple:
    """Smallest inputs that create every parameter: (sample, timesteps, encoder_hidden_states)."""
    size = 2 ** (len(self.block_out_channels) - 1)
    return (jnp.zeros((batch_size, size, size, self.in_channels)), jnp.zeros((batch_size,)),
            jnp.zeros((batch_size, 1, self.cross_attention_dim[0])))


# ----------------------------------------------------------------------------------------------------
# diffusers config.json -> module.

# Config entries that switch on features this port does not have: accepted only at their "off" values.
_OFF_VALUES = {
    'act_fn': ('silu', 'swish'), 'mid_block_type': ('UNetMidBlock2DCrossAttn',),
    'time_embedding_type': ('positional',), 'resnet_time_scale_shift': ('default',),
    'class_embed_type': (None,), 'num_class_embeds': (None,), 'class_embeddings_concat': (False,),
    'projection_class_embeddings_input_dim': (None,), 'addition_embed_type': (None,),
    'addition_time_embed_dim': (None,), 'encoder_hid_dim': (None,), 'encoder_hid_dim_type': (None,),
    'time_cond_proj_dim': (None,), 'time_embedding_act_fn': (None,), 'timestep_post_act': (None,),
    'resnet_skip_time_act': (False,), 'resnet_out_scale_factor': (1.0,), 'dual_cross_attention': (False,),
    'only_cross_attention': (False,), 'mid_block_only_cross_attention': (None, False),
    'attention_type': ('default',), 'cross_attention_norm': (None,),
    'reverse_transformer_layers_per_block': (None,), 'num_attention_heads': (None,), 'dropout': (0.0,),
}
# Entries that do not shape the network: `sample_size` (training resolution), the head count of the
# (off) addition embedding, and `upcast_attention` (this port always takes attention scores in float32).
_IGNORED = ('sample_size', 'addition_embed_type_num_heads', 'upcast_attention')
_BLOCK_TYPES = {'down_block_types': (CROSS_DOWN, PLAIN_DOWN), 'up_block_types': (CROSS_UP, PLAIN_UP)}
# diffusers' constructor defaults for the entries this port reads.
DIFFUSERS_DEFAULTS = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=(CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
    up_block_types=(PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP), block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0, norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
    use_linear_projection=False, time_embedding_dim=None, conv_in_kernel=3, conv_out_kernel=3)


def _is_off(value: Any, allowed: tuple) -> bool:
  """Whether `value` (or every entry of a per-block list) is one of the allowed "off" values."""
  def matches(v, a):
    return v is a if a is None or isinstance(a, bool) else v == a
  values = value if isinstance(value, (list, tuple)) else [value]
  return all(any(matches(v, a) for a in allowed) for v in values)


def _per_level(config: Mapping[str, Any], key: str, levels: int) -> tuple:
  value = config[key]
  if isinstance(value, (list, tuple)):
    if len(value) != levels or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise ValueError(f'UNet2DConditionModel config: {key} must be an int or {levels} ints, got {value!r}')
    return tuple(value)
  if not isinstance(value, int) or isinstance(value, bool):
    raise ValueError(f'UNet2DConditionModel config: {key} must be an int or {levels} ints, got {value!r}')
  return (value,) * levels


def from_diffusers_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> UNet2DConditionModel:
  """The module for a diffusers `UNet2DConditionModel` config.json dict (SD 1.x / 2.x layouts).

  Missing entries take diffusers' defaults; an entry that needs a feature this port lacks (class or
  addition embeddings, other block types, ...) is a one-line ValueError naming it.
  """
  values = dict(DIFFUSERS_DEFAULTS)
  for key, value in config.items():
    if key.startswith('_') or key in _IGNORED:
      continue
    if key in _OFF_VALUES:
      if not _is_off(value, _OFF_VALUES[key]):
        raise ValueError(f'UNet2DConditionModel config: unsupported {key}={value!r}')
    elif key in values:
      values[key] = value
    else:
      raise ValueError(f'UNet2DConditionModel config: unknown key {key!r}')
  chans = tuple(values['block_out_channels'])
  levels = len(chans)
  for key, allowed in _BLOCK_TYPES.items():
    types = tuple(values[key])
    bad = [t for t in types if t not in allowed]
    if bad or len(types) != levels:
      raise ValueError(f'UNet2DConditionModel config: unsupported {key} {list(types)} '
                       f'(this port has {" / ".join(allowed)}, one per block_out_channels entry)')
    values[key] = types
  if values['norm_num_groups'] is None:
    raise ValueError('UNet2DConditionModel config: unsupported norm_num_groups=None')
  heads = _per_level(values, 'attention_head_dim', levels)  # diffusers' historic name for the head count
  for level, (c, h) in enumerate(zip(chans, heads)):
    if c % h:
      raise ValueError(f'UNet2DConditionModel config: attention_head_dim {h} does not divide {c} channels '
                       f'(level {level})')
  return UNet2DConditionModel(
      in_channels=values['in_channels'], out_channels=values['out_channels'], block_out_channels=chans,
      down_block_types=values['down_block_types'], up_block_types=values['up_block_types'],
      layers_per_block=_per_level(values, 'layers_per_block', levels),
      transformer_layers_per_block=_per_level(values, 'transformer_layers_per_block', levels),
      num_attention_heads=heads, cross_attention_dim=_per_level(values, 'cross_attention_dim', levels),
      use_linear_projection=bool(values['use_linear_projection']),
      norm_num_groups=int(values['norm_num_groups']), norm_eps=float(values['norm_eps']),
      flip_sin_to_cos=bool(values['flip_sin_to_cos']), freq_shift=values['freq_shift'],
      time_embedding_dim=values['time_embedding_dim'], downsample_padding=int(values['downsample_padding']),
      mid_block_scale_factor=float(values['mid_block_scale_factor']),
      center_input_sample=bool(values['center_input_sample']),
      conv_in_kernel=int(values['conv_in_kernel']), conv_out_kernel=int(values['conv_out_kernel']),
      dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# diffusers state_dict -> variables.


def params_template(unet: UNet2DConditionModel) -> dict:
  """Abstract `params` (shapes and dtypes) of `unet`, without allocating."""
  return jax.eval_shape(lambda: unet.init(jax.random.key(0), *unet.example_inputs()))['params']


def convert_diffusers_state(state: Mapping[str, Any], unet: UNet2DConditionModel) -> dict:
  """A diffusers UNet2DConditionModel state_dict (name -> array) as `unet`'s variables, float32.

  A missing, unexpected or mis-shaped key is a ValueError naming it.
  """
  return strict_variables(state, params_template(unet), 'UNet2DConditionModel state_dict')
