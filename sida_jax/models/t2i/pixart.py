"""PixArt-α's diffusion transformer (diffusers `PixArtTransformer2DModel`) in Flax linen, NHWC.

    net = pixart.from_config(config)                       # the transformer's config.json as a dict
    variables = pixart.variables_from_state_dict(net, state_dict)
    out = net.apply(variables, latents_nhwc, timesteps, caption_embeddings, caption_mask)
    # out: [N, H, W, out_channels]; PixArt-α's 8 channels are ε (first 4) and the variance values.

Parameter names and layouts equal the diffusers `state_dict` (`pos_embed.proj.weight` OIHW,
`transformer_blocks.3.attn2.to_k.weight` [out, in], `adaln_single.emb.timestep_embedder.linear_1.bias`,
`scale_shift_table`, ...): module names contain dots, so flattening `variables['params']` with '.' gives
exactly those names. The 2-D sin-cos position embedding is a non-persistent buffer in diffusers; it is
recomputed here from the latent grid (base size sample_size / patch_size, `interpolation_scale`).

The network (PixArt's adaLN-single DiT):
  tokens  = patchify conv(x) + pos-embed;  captions = Linear → GELU(tanh) → Linear (caption_projection)
  t_emb   = MLP(sinusoid(t)) [+ resolution and aspect-ratio embeddings], mods = Linear(SiLU(t_emb))·6
  block   = x += gate·SelfAttn(LN(x)·(1+scale)+shift);  x += CrossAttn(x, captions, mask);
            x += gate·FF(LN(x)·(1+scale)+shift)   with per-block learned `scale_shift_table` + mods
  output  = Linear(LN(x)·(1+scale)+shift) with `scale_shift_table` + t_emb, unpatchified.
Layer norms carry no affine parameters (PixArt's `norm_elementwise_affine=False`; True is supported).
With `dtype=jnp.bfloat16` activations and matmuls run in bfloat16 while norm statistics, the timestep
sinusoids and attention softmax stay in float32; the output is float32.
"""
import functools
import math
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sida_jax.models.t2i.layers import Linear, dot_product_attention, layer_norm, strict_variables, torch_uniform

Array = jax.Array

# diffusers class names whose configs describe this network (`Transformer2DModel` is how PixArt-α's
# published checkpoints are recorded; diffusers remaps it when norm_type is 'ada_norm_single').
CLASS_NAMES = ('PixArtTransformer2DModel', 'Transformer2DModel')

_FREQ_CHANNELS = 256     # sinusoid width of the timestep / size embeddings
_MASK_BIAS = -10000.0    # diffusers turns a 0/1 caption mask into this additive bias


def timestep_sinusoid(t: Array, channels: int = _FREQ_CHANNELS) -> Array:
  """diffusers `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin], f32."""
  half = channels // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed(dim: int, height: int, width: int, base_size: int,
                     interpolation_scale: float) -> np.ndarray:
  """diffusers' 2-D sin-cos position embedding for a height x width token grid, [H·W, dim] float32.

  Token (i, j) (row-major) gets [sincos(j·s_w), sincos(i·s_h)] with s = base_size / size / scale: the
  first half encodes the column, the second the row, as diffusers' meshgrid does.
  """
  h = np.arange(height, dtype=np.float32) / np.float32(height / base_size) / np.float32(interpolation_scale)
  w = np.arange(width, dtype=np.float32) / np.float32(width / base_size) / np.float32(interpolation_scale)
  rows, cols = np.meshgrid(h, w, indexing='ij')
  emb = np.concatenate([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], 1)
  emb = emb.astype(np.float32)
  emb.flags.writeable = False
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers TimestepEmbedding: linear_1 → SiLU → linear_2."""
  in_channels: int
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.silu(Linear(self.in_channels, self.features, name='linear_1')(x))
    return Linear(self.features, self.features, name='linear_2')(x)


class Attention(nn.Module):
  """diffusers Attention (to_q, to_k, to_v, to_out.0) with 1/√head_dim scaling."""
  query_dim: int
  context_dim: int
  heads: int
  head_dim: int
  bias: bool

  @nn.compact
  def __call__(self, x: Array, context: Array, mask_bias: Optional[Array] = None) -> Array:
    inner = self.heads * self.head_dim
    n, lq, lk = x.shape[0], x.shape[1], context.shape[1]
    q = Linear(self.query_dim, inner, self.bias, name='to_q')(x).reshape(n, lq, self.heads, self.head_dim)
    k = Linear(self.context_dim, inner, self.bias, name='to_k')(context)
    v = Linear(self.context_dim, inner, self.bias, name='to_v')(context)
    k = k.reshape(n, lk, self.heads, self.head_dim)
    v = v.reshape(n, lk, self.heads, self.head_dim)
    y = dot_product_attention(q, k, v, 1.0 / math.sqrt(self.head_dim), mask_bias).reshape(n, lq, inner)
    return Linear(inner, self.query_dim, name='to_out.0')(y)


class BasicTransformerBlock(nn.Module):
  """diffusers BasicTransformerBlock with norm_type='ada_norm_single' (PixArt)."""
  dim: int
  heads: int
  head_dim: int
  cross_attention_dim: int
  attention_bias: bool
  approximate_gelu: bool
  norm_elementwise_affine: bool
  norm_eps: float

  def _norm(self, name: str, x: Array) -> Array:
    if not self.norm_elementwise_affine:
      return layer_norm(x, self.norm_eps)
    weight = self.param(f'{name}.weight', nn.initializers.ones, (self.dim,), jnp.float32)
    bias = self.param(f'{name}.bias', nn.initializers.zeros, (self.dim,), jnp.float32)
    return layer_norm(x, self.norm_eps, weight, bias)

  @nn.compact
  def __call__(self, x: Array, context: Array, mask_bias: Optional[Array], mods: Array) -> Array:
    d = self.dim
    table = self.param('scale_shift_table', lambda key, shape: jax.random.normal(key, shape) / d ** 0.5,
                       (6, d))
    # mods [N, 6·D] → six [N, 1, D] modulations, each offset by the block's learned table.
    mods = (table[None] + mods.reshape(-1, 6, d).astype(jnp.float32)).astype(x.dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=1)

    h = self._norm('norm1', x) * (1 + scale_msa) + shift_msa
    h = Attention(d, d, self.heads, self.head_dim, self.attention_bias, name='attn1')(h, h)
    x = x + gate_msa * h
    # PixArt's cross-attention reads the residual stream without a norm.
    x = x + Attention(d, self.cross_attention_dim, self.heads, self.head_dim, self.attention_bias,
                      name='attn2')(x, context, mask_bias)
    h = self._norm('norm2', x) * (1 + scale_mlp) + shift_mlp
    h = Linear(d, 4 * d, name='ff.net.0.proj')(h)
    h = jax.nn.gelu(h, approximate=self.approximate_gelu)
    h = Linear(4 * d, d, name='ff.net.2')(h)
    return x + gate_mlp * h


class PixArtTransformer2DModel(nn.Module):
  """PixArt-α / PixArt-Σ transformer: NHWC latents, timesteps and caption embeddings → NHWC output.

  Defaults are PixArt-XL-2-512x512's. `interpolation_scale` and `use_additional_conditions` are the
  resolved values (see `from_config` for diffusers' rules when a config leaves them unset).
  """
  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: int = 8
  num_layers: int = 28
  cross_attention_dim: int = 1152
  caption_channels: Optional[int] = 4096
  sample_size: int = 64
  patch_size: int = 2
  activation_fn: str = 'gelu-approximate'
  attention_bias: bool = True
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-6
  interpolation_scale: float = 1.0
  use_additional_conditions: bool = False
  dtype: Any = jnp.float32

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def _condition(self, timesteps: Array, added_cond_kwargs: Optional[Mapping[str, Array]], n: int) -> Array:
    """adaln_single.emb: the timestep embedding [+ resolution and aspect-ratio embeddings], [N, D]."""
    d = self.inner_dim
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (n,))
    emb = TimestepEmbedding(_FREQ_CHANNELS, d, name='adaln_single.emb.timestep_embedder')(
        timestep_sinusoid(t).astype(self.dtype))
    if not self.use_additional_conditions:
      return emb
    if not added_cond_kwargs or 'resolution' not in added_cond_kwargs or 'aspect_ratio' not in added_cond_kwargs:
      raise ValueError('PixArtTransformer2DModel: use_additional_conditions needs added_cond_kwargs with '
                       '"resolution" [N, 2] and "aspect_ratio" [N, 1]')
    resolution = jnp.asarray(added_cond_kwargs['resolution'], jnp.float32).reshape(-1)
    aspect_ratio = jnp.asarray(added_cond_kwargs['aspect_ratio'], jnp.float32).reshape(-1)
    res = TimestepEmbedding(_FREQ_CHANNELS, d // 3, name='adaln_single.emb.resolution_embedder')(
        timestep_sinusoid(resolution).astype(self.dtype)).reshape(n, -1)
    ar = TimestepEmbedding(_FREQ_CHANNELS, d // 3, name='adaln_single.emb.aspect_ratio_embedder')(
        timestep_sinusoid(aspect_ratio).astype(self.dtype)).reshape(n, -1)
    return emb + jnp.concatenate([res, ar], axis=1)

  @nn.compact
  def __call__(self, sample: Array, timesteps: Array, encoder_hidden_states: Array,
               encoder_attention_mask: Optional[Array] = None,
               added_cond_kwargs: Optional[Mapping[str, Array]] = None) -> Array:
    """sample [N, H, W, in_channels], timesteps [N] or scalar, encoder_hidden_states [N, S, caption_channels
    (or cross_attention_dim without a caption projection)], encoder_attention_mask [N, S] of 1 = keep,
    0 = padding → [N, H, W, out_channels] float32."""
    n, height, width, channels = sample.shape
    p, d = self.patch_size, self.inner_dim
    if channels != self.in_channels:
      raise ValueError(f'PixArtTransformer2DModel: sample has {channels} channels, expected {self.in_channels}')
    if height % p or width % p:
      raise ValueError(f'PixArtTransformer2DModel: sample size {height}x{width} is not a multiple of the '
                       f'patch size {p}')
    gh, gw = height // p, width // p

    # pos_embed: a p x p stride-p convolution, flattened row-major, plus the sin-cos embedding.
    init = torch_uniform(1.0 / math.sqrt(self.in_channels * p * p))
    kernel = self.param('pos_embed.proj.weight', init, (d, self.in_channels, p, p), jnp.float32)
    bias = self.param('pos_embed.proj.bias', init, (d,), jnp.float32)
    x = lax.conv_general_dilated(sample.astype(self.dtype), kernel.astype(self.dtype), (p, p), 'VALID',
                                 dimension_numbers=('NHWC', 'OIHW', 'NHWC'))
    pos = sincos_pos_embed(d, gh, gw, self.sample_size // p, float(self.interpolation_scale))
    x = (x.reshape(n, gh * gw, d).astype(jnp.float32) + bias + pos).astype(self.dtype)

    t_emb = self._condition(timesteps, added_cond_kwargs, n)
    mods = Linear(d, 6 * d, name='adaln_single.linear')(nn.silu(t_emb))

    context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
    if self.caption_channels is not None:
      context = Linear(self.caption_channels, d, name='caption_projection.linear_1')(context)
      context = jax.nn.gelu(context, approximate=True)
      context = Linear(d, d, name='caption_projection.linear_2')(context)
    mask_bias = None
    if encoder_attention_mask is not None:
      mask = jnp.asarray(encoder_attention_mask)
      if mask.shape != context.shape[:2]:
        raise ValueError(f'PixArtTransformer2DModel: encoder_attention_mask has shape {mask.shape}, '
                         f'expected {context.shape[:2]}')
      mask_bias = ((1 - mask.astype(jnp.float32)) * _MASK_BIAS)[:, None, None, :]

    for i in range(self.num_layers):
      x = BasicTransformerBlock(
          d, self.num_attention_heads, self.attention_head_dim, self.cross_attention_dim,
          self.attention_bias, self.activation_fn == 'gelu-approximate', self.norm_elementwise_affine,
          self.norm_eps, name=f'transformer_blocks.{i}')(x, context, mask_bias, mods)

    table = self.param('scale_shift_table', lambda key, shape: jax.random.normal(key, shape) / d ** 0.5, (2, d))
    shift, scale = jnp.split((table[None] + t_emb[:, None].astype(jnp.float32)).astype(x.dtype), 2, axis=1)
    x = layer_norm(x, 1e-6) * (1 + scale) + shift
    x = Linear(d, p * p * self.out_channels, name='proj_out')(x)
    # unpatchify: token (i, j) holds its p x p x C patch row-major.
    x = x.reshape(n, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, height, width, self.out_channels).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Building from a diffusers config.json, and the strict state_dict copy.

# Constructor defaults of the two diffusers classes for the fields this port reads.
_PIXART_DEFAULTS = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
    cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
    activation_fn='gelu-approximate', num_embeds_ada_norm=1000, norm_type='ada_norm_single',
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None, use_additional_conditions=None,
    caption_channels=None, attention_type='default')
_TRANSFORMER_2D_DEFAULTS = dict(
    _PIXART_DEFAULTS, attention_head_dim=88, in_channels=None, out_channels=None, num_layers=1,
    cross_attention_dim=None, attention_bias=False, sample_size=None, patch_size=None, activation_fn='geglu',
    num_embeds_ada_norm=None, norm_type='layer_norm', norm_elementwise_affine=True, norm_eps=1e-5,
    only_cross_attention=False, double_self_attention=False, num_vector_embeds=None)
# Entries that must keep one value (anything else changes the network in ways this port lacks).
_FIXED = dict(dropout=0.0, norm_type='ada_norm_single', attention_type='default', only_cross_attention=False,
              double_self_attention=False, num_vector_embeds=None)
# Entries without effect on a patched ada_norm_single network: `norm_num_groups` and
# `use_linear_projection` only shape Transformer2DModel's continuous-input path, `upcast_attention` is
# moot (the softmax is always float32), `num_embeds_ada_norm` is only checked to be set.
_IGNORED = ('norm_num_groups', 'use_linear_projection', 'upcast_attention', 'num_embeds_ada_norm')
_FIELDS = ('num_attention_heads', 'attention_head_dim', 'in_channels', 'out_channels', 'num_layers',
           'cross_attention_dim', 'caption_channels', 'sample_size', 'patch_size', 'activation_fn',
           'attention_bias', 'norm_elementwise_affine', 'norm_eps', 'interpolation_scale',
           'use_additional_conditions')


def from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> PixArtTransformer2DModel:
  """The network described by a diffusers `config.json` dict (`_class_name` one of `CLASS_NAMES`).

  Unset entries take the class's own constructor defaults, as diffusers' `from_config` would; an unknown
  key or a value this port does not implement is a ValueError naming the key.
  """
  class_name = config.get('_class_name', 'PixArtTransformer2DModel')
  if class_name not in CLASS_NAMES:
    raise ValueError(f'pixart.from_config: unsupported _class_name {class_name!r}')
  values = dict(_PIXART_DEFAULTS if class_name == 'PixArtTransformer2DModel' else _TRANSFORMER_2D_DEFAULTS)
  for key, value in config.items():
    if key.startswith('_'):
      continue
    if key not in values and key not in _IGNORED:
      raise ValueError(f'pixart.from_config: unknown key {key!r}')
    values[key] = value
  for key, value in _FIXED.items():
    if key in values and values[key] != value:
      raise ValueError(f'pixart.from_config: unsupported {key} {values[key]!r} (only {value!r})')
  if values.get('num_embeds_ada_norm') is None:
    raise ValueError('pixart.from_config: num_embeds_ada_norm must be set for ada_norm_single')
  for key in ('in_channels', 'sample_size', 'patch_size', 'cross_attention_dim'):
    if values[key] is None:
      raise ValueError(f'pixart.from_config: {key} must be set')
  if values['activation_fn'] not in ('gelu', 'gelu-approximate'):
    raise ValueError(f"pixart.from_config: unsupported activation_fn {values['activation_fn']!r}")
  if values['out_channels'] is None:
    values['out_channels'] = values['in_channels']
  if values['interpolation_scale'] is None:
    values['interpolation_scale'] = max(values['sample_size'] // 64, 1)
  if values['use_additional_conditions'] is None:
    values['use_additional_conditions'] = values['sample_size'] == 128
  inner_dim = values['num_attention_heads'] * values['attention_head_dim']
  if inner_dim % 4:
    raise ValueError(f'pixart.from_config: num_attention_heads x attention_head_dim = {inner_dim} must be a '
                     'multiple of 4 (2-D sin-cos position embedding)')
  if values['use_additional_conditions'] and inner_dim % 3:
    raise ValueError(f'pixart.from_config: use_additional_conditions needs an inner dim divisible by 3, '
                     f'got {inner_dim}')
  if values['caption_channels'] is not None and values['cross_attention_dim'] != inner_dim:
    raise ValueError(f"pixart.from_config: cross_attention_dim {values['cross_attention_dim']} must equal the "
                     f'inner dim {inner_dim} when captions are projected (caption_channels)')
  kwargs = {k: values[k] for k in _FIELDS}
  kwargs['interpolation_scale'] = float(kwargs['interpolation_scale'])
  kwargs['use_additional_conditions'] = bool(kwargs['use_additional_conditions'])
  return PixArtTransformer2DModel(**kwargs, dtype=dtype)


def example_inputs(net: PixArtTransformer2DModel, batch_size: int = 1) -> tuple:
  """Small zero inputs that create every parameter of `net` (one patch, one caption token)."""
  n, p = batch_size, net.patch_size
  context = net.caption_channels if net.caption_channels is not None else net.cross_attention_dim
  added = ({'resolution': jnp.zeros((n, 2)), 'aspect_ratio': jnp.zeros((n, 1))}
           if net.use_additional_conditions else None)
  return (jnp.zeros((n, p, p, net.in_channels)), jnp.zeros((n,)), jnp.zeros((n, 1, context)), None, added)


def params_template(net: PixArtTransformer2DModel) -> Any:
  """The abstract parameter tree (jax.ShapeDtypeStruct leaves), without allocating."""
  return jax.eval_shape(lambda: net.init(jax.random.key(0), *example_inputs(net)))['params']


def variables_from_state_dict(net: PixArtTransformer2DModel, state_dict: Mapping[str, Any]) -> dict:
  """Strict 1:1 copy of a diffusers state_dict (name → array) into `net`'s variables, float32."""
  return strict_variables(state_dict, params_template(net), 'PixArtTransformer2DModel state_dict')
