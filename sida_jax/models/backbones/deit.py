"""timm's distilled DeiT (`deit_base_distilled_patch16_224`) in Flax, evaluation mode.

Parameter names are timm's (`VisionTransformerDistilled`): `cls_token`, `dist_token`, `pos_embed`,
`patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`,
`head_dist`. LayerNorm eps 1e-6, exact GELU, no dropout.

The forward is Projected GAN's `forward_flex` (which GDD runs on the timm model): the position embedding's
grid is bilinearly resized (align_corners=False, no antialiasing) when the input's patch grid differs from
the trained one (an identity at 224×224), and the token sequences after the blocks in `taps` are returned
([N, 2 + H/16·W/16, D], class and distillation tokens first). Projected GAN taps blocks 2, 5, 8 and 11 of
the base model. With the head, the logits are timm's evaluation output (head(cls) + head_dist(dist)) / 2.

Weights: timm's `deit_base_distilled_patch16_224.fb_in1k` (`model.safetensors` of the hub repository
`timm/deit_base_distilled_patch16_224.fb_in1k`), or Facebook's `deit_base_distilled_patch16_224-df68dfff.pth`
whose 'model' entry holds the same names; converted with `variables_from_state_dict`.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sida_jax.models.backbones import torch_layers
from sida_jax.models.backbones.vgg import BackboneOutput

Array = jax.Array

PROJECTED_GAN_TAPS = (2, 5, 8, 11)
NUM_PREFIX_TOKENS = 2  # class and distillation tokens
_LN_EPS = 1e-6


class Attention(nn.Module):
  dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, t, d = x.shape
    head_dim = d // self.num_heads
    qkv = torch_layers.Linear(d, 3 * d, name='qkv')(x).reshape(n, t, 3, self.num_heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [N, heads, T, head_dim]
    weights = jax.nn.softmax(jnp.einsum('nhqd,nhkd->nhqk', q, k) * head_dim ** -0.5, axis=-1)
    out = jnp.einsum('nhqk,nhkd->nqhd', weights, v).reshape(n, t, d)
    return torch_layers.Linear(d, d, name='proj')(out)


class Mlp(nn.Module):
  dim: int
  hidden: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = torch_layers.gelu(torch_layers.Linear(self.dim, self.hidden, name='fc1')(x))
    return torch_layers.Linear(self.hidden, self.dim, name='fc2')(x)


class Block(nn.Module):
  dim: int
  num_heads: int
  mlp_ratio: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x + Attention(self.dim, self.num_heads, name='attn')(torch_layers.LayerNorm(self.dim, _LN_EPS, name='norm1')(x))
    mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), name='mlp')
    return x + mlp(torch_layers.LayerNorm(self.dim, _LN_EPS, name='norm2')(x))


class Blocks(nn.Module):
  """timm's `blocks`: runs the first `stop` blocks; returns (outputs after the blocks in `taps`, last output)."""
  dim: int
  num_heads: int
  mlp_ratio: float
  taps: Sequence[int]
  stop: int

  @nn.compact
  def __call__(self, x: Array) -> tuple:
    outputs = []
    for i in range(self.stop):
      x = Block(self.dim, self.num_heads, self.mlp_ratio, name=str(i))(x)
      if i in self.taps:
        outputs.append(x)
    return tuple(outputs), x


class PatchEmbed(nn.Module):
  patch_size: int
  dim: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    x = torch_layers.Conv2d(x.shape[-1], self.dim, p, stride=p, name='proj')(x)
    return x.reshape(x.shape[0], -1, self.dim)  # row-major patches, as torch's flatten(2).transpose(1, 2)


class DistilledVisionTransformer(nn.Module):
  """DeiT with distillation token; returns the tapped token sequences and, with the head, the logits."""
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  taps: Sequence[int] = PROJECTED_GAN_TAPS
  include_head: bool = True
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: Array) -> BackboneOutput:
    bad = [t for t in self.taps if not 0 <= t < self.depth]
    if bad:
      raise ValueError(f'DistilledVisionTransformer: taps {bad} outside the {self.depth} blocks')
    d, p = self.embed_dim, self.patch_size
    grid = self.img_size // p
    token_init = nn.initializers.normal(0.02)
    cls_token = self.param('cls_token', token_init, (1, 1, d))
    dist_token = self.param('dist_token', token_init, (1, 1, d))
    pos_embed = self.param('pos_embed', token_init, (1, NUM_PREFIX_TOKENS + grid * grid, d))
    n, h, w, _ = x.shape
    tokens = PatchEmbed(p, d, name='patch_embed')(x)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (n, 1, d)), jnp.broadcast_to(dist_token, (n, 1, d)), tokens], 1)
    x = x + resize_pos_embed(pos_embed, grid, (h // p, w // p))
    stop = self.depth if self.include_head else max(self.taps) + 1
    features, x = Blocks(d, self.num_heads, self.mlp_ratio, tuple(self.taps), stop, name='blocks')(x)
    if not self.include_head:
      return BackboneOutput(features, None)
    x = torch_layers.LayerNorm(d, _LN_EPS, name='norm')(x)
    logits = (torch_layers.Linear(d, self.num_classes, name='head')(x[:, 0])
              + torch_layers.Linear(d, self.num_classes, name='head_dist')(x[:, 1])) / 2
    return BackboneOutput(features, logits)


def resize_pos_embed(pos_embed: Array, grid: int, new_grid: Sequence[int]) -> Array:
  """Projected GAN's `_resize_pos_embed`: the patch part bilinearly resized (align_corners=False)."""
  prefix, patches = pos_embed[:, :NUM_PREFIX_TOKENS], pos_embed[:, NUM_PREFIX_TOKENS:]
  patches = patches.reshape(1, grid, grid, -1)
  patches = torch_layers.resize_bilinear(patches, new_grid, align_corners=False)
  return jnp.concatenate([prefix, patches.reshape(1, new_grid[0] * new_grid[1], -1)], 1)


def example_input(module: DistilledVisionTransformer) -> Array:
  return jnp.zeros((1, module.img_size, module.img_size, 3), jnp.float32)


def variables_from_state_dict(module: DistilledVisionTransformer, state_dict: Mapping[str, Any]) -> dict:
  """Strict copy of a timm distilled-DeiT state_dict (name -> numpy array) into `module`'s variables.

  A module without its head also takes the complete timm file; see `torch_layers.load_backbone`.
  """
  return torch_layers.load_backbone(module, state_dict, example_input(module), 'deit state_dict')
