"""PyTorch state_dicts <-> Flax variables: templates, fresh init, parameter counts and the strict copy.

Parameter names and layouts of our networks equal the PyTorch `state_dict` (see `edm/layers.py`), so
conversion is a checked 1:1 copy: every Flax leaf is assigned exactly once with an equal shape, and
deterministic buffers (EDM's `resample_filter`) are recomputed rather than stored. Which module an
official class name builds is the business of `registry.py` and the families' `convert.py`.
"""
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sida_jax.models.edm import layers

Array = jax.Array
Variables = dict[str, Any]

# Collections of a network's variables (THE NETWORK CONVENTION): trainable params, stored buffers.
COLLECTIONS = ('params', 'buffers')


def example_inputs(module: nn.Module, batch_size: int = 1) -> tuple:
  """Positional inputs that exercise every parameter of `module` (zeros, float32).

  Preconditioners get (x, sigma, class_labels, augment_labels) from their `img_resolution`,
  `img_channels`, `label_dim` and `augment_dim`; a `UNetBlock` gets (x [N, 8, 8, C], emb).
  """
  n = batch_size
  if isinstance(module, layers.UNetBlock):
    return (jnp.zeros((n, 8, 8, module.in_channels)), jnp.zeros((n, module.emb_channels)))
  for attr in ('img_resolution', 'img_channels', 'label_dim'):
    if not hasattr(module, attr):
      raise TypeError(f'example_inputs: {type(module).__name__} has no attribute {attr!r}')
  res, channels = module.img_resolution, module.img_channels
  labels = jnp.zeros((n, module.label_dim)) if module.label_dim else None
  augment_dim = getattr(module, 'augment_dim', 0)
  augment = jnp.zeros((n, augment_dim)) if augment_dim else None
  inputs = (jnp.zeros((n, res, res, channels)), jnp.ones((n,)), labels)
  return inputs + (augment,) if augment is not None else inputs


def _is_resampling_conv(module: nn.Module) -> bool:
  return isinstance(module, layers.Conv2d) and (module.up or module.down)


def _trace(module: nn.Module) -> tuple[Variables, dict[str, np.ndarray]]:
  """Abstract variables of `module` and its recomputable buffers (state_dict name -> value)."""
  recomputed = {}

  def record_filters(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and _is_resampling_conv(context.module):
      path = '.'.join((*context.module.scope.path, 'resample_filter'))
      recomputed[path] = layers.resample_filter_2d(context.module.resample_filter)[None, None]
    return next_fun(*args, **kwargs)

  init = functools.partial(module.init, jax.random.key(0), *example_inputs(module))
  with nn.intercept_methods(record_filters):
    template = jax.eval_shape(init)
  return dict(template), recomputed


def variables_template(module: nn.Module) -> Variables:
  """Shapes and dtypes of `module`'s variables (jax.ShapeDtypeStruct leaves), without allocating."""
  return _trace(module)[0]


# Fresh inits are one-off runs of hundreds of random-number generators: optimising them costs far more compile
# time than it saves (shared with the projected-GAN discriminator's inits).
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


# Shared by every network of the same architecture (Flax modules compare and hash by their fields), so building
# a run again in one process (a resume, the next run) compiles no new init.
@functools.partial(jax.jit, static_argnums=0, compiler_options=INIT_COMPILER_OPTIONS)
def _init(module: nn.Module, rng: Array) -> Variables:
  return module.init(rng, *example_inputs(module))


def init_variables(module: nn.Module, rng: Array) -> Variables:
  """Freshly initialised variables with the official initialisers.

  Compiled without backend optimisation: the one-off run is cheap, while optimising the hundreds of
  random-number generators of a U-Net's init would cost several times longer compiles.
  """
  try:
    hash(module)
  except TypeError:   # a field that cannot be hashed (a list): a jit of its own
    return dict(jax.jit(module.init, compiler_options=INIT_COMPILER_OPTIONS)(rng, *example_inputs(module)))
  return dict(_init(module, rng))


def count_params(variables: Variables) -> int:
  """Number of trainable parameters (works on templates too)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables['params']))


def _named_leaves(variables: Variables) -> dict[str, tuple[str, tuple]]:
  """state_dict name -> (collection, flax path) for every leaf; names must be unique."""
  names = {}
  for collection in variables:
    if collection not in COLLECTIONS:
      raise ValueError(f'unexpected variable collection {collection!r}')
    for path in traverse_util.flatten_dict(variables[collection]):
      name = '.'.join(path)
      if name in names:
        raise ValueError(f'two variables share the state_dict name {name!r}')
      names[name] = (collection, path)
  return names


def variables_from_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> Variables:
  """Strict copy of a PyTorch-named state_dict into `module`'s variables, as float32.

  Raises ValueError naming the key for a missing key, an unexpected key, a shape mismatch, or a
  `resample_filter` that differs from the filter the module recomputes.
  """
  template, recomputed = _trace(module)
  targets = _named_leaves(template)
  missing = sorted(set(targets) - set(state_dict))
  if missing:
    raise ValueError(f'state_dict: missing key(s) {", ".join(map(repr, missing))}')
  unexpected = sorted(set(state_dict) - set(targets) - set(recomputed))
  if unexpected:
    raise ValueError(f'state_dict: unexpected key(s) {", ".join(map(repr, unexpected))}')
  for name, expected in recomputed.items():
    if name in state_dict:
      value = np.asarray(state_dict[name], np.float32)
      if value.shape != expected.shape or not np.array_equal(value, expected):
        raise ValueError(f'state_dict: {name!r} differs from the filter the module recomputes')
  shapes = {collection: traverse_util.flatten_dict(tree) for collection, tree in template.items()}
  flat = {collection: {} for collection in template}
  for name, (collection, path) in targets.items():
    value = np.asarray(state_dict[name], np.float32)
    leaf = shapes[collection][path]
    if value.shape != tuple(leaf.shape):
      raise ValueError(f'state_dict: shape mismatch for {name!r}: expected {tuple(leaf.shape)}, '
                       f'got {value.shape}')
    flat[collection][path] = jnp.asarray(value)
  return {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in flat.items()}


def state_dict_from_variables(module: nn.Module, variables: Variables) -> dict[str, np.ndarray]:
  """PyTorch state_dict (float32 numpy) of `variables`, recomputable buffers included.

  The result loads into the official class with `load_state_dict(strict=True)`.
  """
  flat = {collection: traverse_util.flatten_dict(tree) for collection, tree in variables.items()}
  state_dict = {name: np.asarray(flat[collection][path], np.float32)
                for name, (collection, path) in _named_leaves(variables).items()}
  state_dict.update(_trace(module)[1])
  return state_dict
