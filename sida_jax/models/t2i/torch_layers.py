"""Layers with PyTorch names, layouts and default initialisers, shared by the text-to-image networks.

Linear weights are [out, in] and stored in float32; they are cast to the activation dtype where they
are used. `strict_variables` is the one copy rule for every converter: a PyTorch `state_dict`
(name → array) fills a module's parameter template exactly, or a ValueError names the key.
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
  """PyTorch's default Linear/Conv initialiser U(−bound, bound), bound = 1/√fan_in."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
  """torch.nn.Linear: y = x Wᵀ + b with weight [out, in], bias [out]."""
  in_features: int
  out_features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = torch_uniform(1.0 / np.sqrt(self.in_features))
    w = self.param('weight', init, (self.out_features, self.in_features), jnp.float32)
    y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
    if self.use_bias:
      y = y + self.param('bias', init, (self.out_features,), jnp.float32).astype(x.dtype)
    return y


def layer_norm(x: Array, eps: float, weight: Optional[Array] = None, bias: Optional[Array] = None) -> Array:
  """torch.nn.LayerNorm over the last axis with statistics in float32; result in x's dtype."""
  h = x.astype(jnp.float32)
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  h = (h - mean) * lax.rsqrt(var + eps)
  if weight is not None:
    h = h * weight
  if bias is not None:
    h = h + bias
  return h.astype(x.dtype)


def attention(q: Array, k: Array, v: Array, bias: Optional[Array], scale: float) -> Array:
  """Multi-head attention on [N, L, heads, head_dim] inputs; logits, bias and softmax in float32.

  `bias` broadcasts against the [N, heads, Lq, Lk] logits (masks enter as large negative values).
  """
  logits = jnp.einsum('nqhd,nkhd->nhqk', q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('nhqk,nkhd->nqhd', weights, v)


def flat_names(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A parameter tree as {state_dict name: leaf}; module names may themselves contain dots."""
  return {'.'.join(path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def strict_variables(template: Mapping[str, Any], state_dict: Mapping[str, Any], owner: str) -> dict:
  """{'params': ...} filled 1:1 from `state_dict`, float32; every key must match in name and shape.

  `template` is the module's abstract parameter tree (e.g. from `jax.eval_shape`). A missing key, an
  unexpected key or a shape mismatch raises ValueError naming the key.
  """
  expected = traverse_util.flatten_dict(template)
  names = {'.'.join(path): path for path in expected}
  missing = sorted(set(names) - set(state_dict))
  if missing:
    raise ValueError(f'{owner}: missing key {missing[0]!r}' + (f' (and {len(missing) - 1} more)'
                                                              if len(missing) > 1 else ''))
  unexpected = sorted(set(state_dict) - set(names))
  if unexpected:
    raise ValueError(f'{owner}: unexpected key {unexpected[0]!r}' + (f' (and {len(unexpected) - 1} more)'
                                                                    if len(unexpected) > 1 else ''))
  flat = {}
  for name, path in names.items():
    value = np.asarray(state_dict[name])
    if value.shape != tuple(expected[path].shape):
      raise ValueError(f'{owner}: {name!r} has shape {value.shape}, expected {tuple(expected[path].shape)}')
    flat[path] = jnp.asarray(value, jnp.float32)
  return {'params': traverse_util.unflatten_dict(flat)}
