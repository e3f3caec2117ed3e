"""PyTorch-named linen layers shared by the text-to-image ports (SD U-Net, CLIP, PixArt, T5) and the SD VAE.

Every parameter keeps the name, shape and layout of its PyTorch counterpart: Linear `weight` [out, in],
Conv2d `weight` [out, in, kh, kw], Embedding `weight` [num, dim]. Parameters are float32 and cast to the
activation dtype where they are used; normalisation statistics and attention softmax are float32.
`strict_variables` is the one copy rule of every converter: a PyTorch `state_dict` (name → array) fills a
module's parameter template exactly, or a ValueError names the key.
"""
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

Array = jax.Array


def torch_uniform(bound: float):
  """PyTorch's default initialiser for linear/conv weights and biases: U(−bound, bound), bound = 1/√fan_in."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
  """torch.nn.Linear: y = x Wᵀ + b, W [out, in]."""
  in_features: int
  out_features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = torch_uniform(1.0 / np.sqrt(self.in_features))
    w = self.param('weight', init, (self.out_features, self.in_features), jnp.float32)
    # Contract against W's input axis directly instead of materialising Wᵀ.
    y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
    if self.use_bias:
      y = y + self.param('bias', init, (self.out_features,), jnp.float32).astype(x.dtype)
    return y


class Conv2d(nn.Module):
  """torch.nn.Conv2d over NHWC inputs: weight [out, in, k, k], symmetric zero padding."""
  in_channels: int
  out_channels: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = torch_uniform(1.0 / np.sqrt(self.in_channels * self.kernel ** 2))
    w = self.param('weight', init, (self.out_channels, self.in_channels, self.kernel, self.kernel), jnp.float32)
    b = self.param('bias', init, (self.out_channels,), jnp.float32)
    y = lax.conv_general_dilated(x, w.astype(x.dtype), (self.stride, self.stride),
                                 [(self.padding, self.padding)] * 2,
                                 dimension_numbers=('NHWC', 'OIHW', 'NHWC'))
    return y + b.astype(x.dtype)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over NHWC, statistics in float32, result in the input dtype."""
  num_groups: int
  num_channels: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c, g = self.num_channels, self.num_groups
    if x.shape[-1] != c or c % g:
      raise ValueError(f'GroupNorm: {x.shape[-1]} channels (expected {c}) cannot form {g} groups')
    weight = self.param('weight', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
    axes = tuple(range(1, y.ndim - 2)) + (y.ndim - 1,)
    mean = y.mean(axis=axes, keepdims=True)
    y = y - mean
    var = jnp.square(y).mean(axis=axes, keepdims=True)
    y = (y * lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * weight + bias).astype(x.dtype)


def layer_norm(x: Array, eps: float, weight: Optional[Array] = None, bias: Optional[Array] = None) -> Array:
  """torch.nn.LayerNorm over the last axis with statistics in float32 (affine parts optional); result in
  x's dtype."""
  h = x.astype(jnp.float32)
  h = h - h.mean(axis=-1, keepdims=True)
  h = h * lax.rsqrt(jnp.square(h).mean(axis=-1, keepdims=True) + eps)
  if weight is not None:
    h = h * weight
  if bias is not None:
    h = h + bias
  return h.astype(x.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm with its affine `weight` and `bias`."""
  dim: int
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param('weight', nn.initializers.ones, (self.dim,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.dim,), jnp.float32)
    return layer_norm(x, self.eps, weight, bias)


class Embedding(nn.Module):
  """torch.nn.Embedding: weight [num_embeddings, dim] (initialised N(0, 1) as in PyTorch)."""
  num_embeddings: int
  dim: int

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    weight = self.param('weight', nn.initializers.normal(1.0), (self.num_embeddings, self.dim), jnp.float32)
    return jnp.take(weight, ids, axis=0)


def dot_product_attention(q: Array, k: Array, v: Array, scale: float, bias: Optional[Array] = None,
                          mask: Optional[Array] = None) -> Array:
  """Softmax attention on [N, L, heads, head_dim] inputs; logits, bias and softmax in float32.

  `bias` (additive) and `mask` (True = attend) broadcast against the [N, heads, Lq, Lk] logits.
  """
  logits = jnp.einsum('nqhd,nkhd->nhqk', q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('nhqk,nkhd->nqhd', weights, v)


def attention(q: Array, k: Array, v: Array, heads: int, mask: Optional[Array] = None) -> Array:
  """Multi-head attention on packed [N, L, heads · head_dim] projections, scaled by 1/√head_dim."""
  n, lq, inner = q.shape
  d = inner // heads
  split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, d)
  out = dot_product_attention(split(q), split(k), split(v), np.float32(1 / np.sqrt(d)), mask=mask)
  return out.reshape(n, lq, inner)


# ----------------------------------------------------------------------------------------------------
# Strict state_dict copy.


def param_shapes(template: Mapping[str, Any]) -> dict:
  """state_dict name -> shape of a (possibly abstract) `params` tree whose module names contain dots."""
  return {'.'.join(path): tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(template).items()}


def strict_variables(state: Mapping[str, Any], template: Mapping[str, Any], what: str) -> dict:
  """`{'params': ...}` from a state_dict (name -> array): every name of `template` (e.g. from `jax.eval_shape`)
  exactly once, nothing else, equal shapes; values become float32. Errors are one line naming the first
  offending key."""
  shapes = param_shapes(template)
  missing = sorted(set(shapes) - set(state))
  if missing:
    raise ValueError(f'{what}: {len(missing)} missing key(s), first {missing[0]!r}')
  unexpected = sorted(set(state) - set(shapes))
  if unexpected:
    raise ValueError(f'{what}: {len(unexpected)} unexpected key(s), first {unexpected[0]!r}')
  flat = {}
  for path in traverse_util.flatten_dict(template):
    name = '.'.join(path)
    value = np.asarray(state[name])
    if value.shape != shapes[name]:
      raise ValueError(f'{what}: {name!r} has shape {value.shape}, expected {shapes[name]}')
    flat[path] = jnp.asarray(value.astype(np.float32))
  return {'params': traverse_util.unflatten_dict(flat)}
