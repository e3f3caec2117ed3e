"""PyTorch EDM/EDM2 networks <-> Flax: build from constructor kwargs, strict state_dict copy.

Parameter names and layouts of the Flax networks equal the PyTorch `state_dict` (see `layers.py`), so
conversion is a checked 1:1 copy: every Flax leaf is assigned exactly once with an equal shape, and
deterministic buffers (`resample_filter`) are recomputed rather than stored.
"""
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sida_jax.models.edm import layers, precond
from sida_jax.models.edm import unets as edm

Array = jax.Array
Variables = dict[str, Any]

# Collections of a network's variables (THE NETWORK CONVENTION): trainable params, stored buffers.
COLLECTIONS = ('params', 'buffers')

# Official class names (EDM, and SiDA's encoder/decoder variants of the same networks).
_PRECONDS = {'EDMPrecond': precond.EDMPrecond, 'VPPrecond': precond.VPPrecond,
             'VEPrecond': precond.VEPrecond, 'EDMPrecond_EncoderDecoder': precond.EDMPrecond}
_UNETS = {'SongUNet': edm.SongUNet, 'DhariwalUNet': edm.DhariwalUNet,
          'SongUNet_EncoderDecoder': edm.SongUNet, 'DhariwalUNet_EncoderDecoder': edm.DhariwalUNet}
_EDM2_CLASSES = ('Precond', 'EDM_2_Precond_EncoderDecoder', 'EDM_2_Precond_Generator')
# Constructor kwargs of the official preconditioners that are not U-Net kwargs, and default U-Nets.
_EDM_PRECOND_KWARGS = ('sigma_min', 'sigma_max', 'sigma_data')
_PRECOND_KWARGS = {
    'EDMPrecond': _EDM_PRECOND_KWARGS,
    'EDMPrecond_EncoderDecoder': _EDM_PRECOND_KWARGS,
    'VPPrecond': ('beta_d', 'beta_min', 'M', 'epsilon_t'),
    'VEPrecond': ('sigma_min', 'sigma_max'),
}
_PRECOND_DEFAULT_MODEL = {'EDMPrecond': 'DhariwalUNet', 'VPPrecond': 'SongUNet', 'VEPrecond': 'SongUNet',
                          'EDMPrecond_EncoderDecoder': 'SongUNet_EncoderDecoder'}


def _field_names(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}


def _as_static(value: Any) -> Any:
  """JSON/pickle values as hashable module attributes: lists become tuples, numpy scalars floats."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_static(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  return value


def _build_unet(model_type: str, kwargs: Mapping[str, Any]) -> nn.Module:
  if model_type not in _UNETS:
    raise ValueError(f'unknown model_type {model_type!r} (known: {", ".join(_UNETS)})')
  cls = _UNETS[model_type]
  unknown = sorted(set(kwargs) - _field_names(cls))
  if unknown:
    raise ValueError(f'{model_type}: unknown constructor kwarg {unknown[0]!r}')
  return cls(**{k: _as_static(v) for k, v in kwargs.items()})


def _build_unet_block(kwargs: Mapping[str, Any]) -> layers.UNetBlock:
  renamed = {'init': 'init_default'}
  fields = _field_names(layers.UNetBlock)
  values = {}
  for key, value in kwargs.items():
    name = renamed.get(key, key)
    if name not in fields:
      raise ValueError(f'UNetBlock: unknown constructor kwarg {key!r}')
    if name.startswith('init_') and value is not None:
      value = layers.WeightInit.from_kwargs(value)
    values[name] = _as_static(value)
  return layers.UNetBlock(**values)


def is_edm2_class(class_name: str) -> bool:
  """Whether an official class name (dotted or bare) is one of EDM2's preconditioners."""
  return class_name.rsplit('.', 1)[-1] in _EDM2_CLASSES


def build_network(class_name: str, init_kwargs: Mapping[str, Any],
                  dtype: jnp.dtype = jnp.float32) -> nn.Module:
  """The Flax module for an official class and its recorded constructor kwargs.

  `class_name` may be dotted (`training.networks.EDMPrecond`) or bare (`EDMPrecond`). EDM
  preconditioners wrap a U-Net built from the remaining kwargs; `use_fp16` is superseded by `dtype`.
  EDM2's `Precond` is built by `sida_jax.models.edm2.networks.from_init_kwargs`. `UNetBlock` is accepted as well.
  """
  name = class_name.rsplit('.', 1)[-1]
  if name in _EDM2_CLASSES:
    from sida_jax.models.edm2 import networks as edm2  # pylint: disable=import-outside-toplevel
    return edm2.from_init_kwargs(class_name, dict(init_kwargs), dtype)
  if name == 'UNetBlock':
    return _build_unet_block(init_kwargs)
  if name == 'ToyPrecond':   # sida_jax's small MLP denoiser (toys, fast tests)
    from sida_jax.models import toy  # pylint: disable=import-outside-toplevel
    kwargs = dict(init_kwargs)
    kwargs['features'] = tuple(kwargs.get('features', (64, 64)))
    return toy.ToyPrecond(**kwargs, dtype=dtype)
  if name not in _PRECONDS:
    raise ValueError(f'unsupported network class {class_name!r} '
                     f'(known: {", ".join([*_PRECONDS, "UNetBlock", *_EDM2_CLASSES])})')
  kwargs = dict(init_kwargs)
  missing = [k for k in ('img_resolution', 'img_channels') if k not in kwargs]
  if missing:
    raise ValueError(f'{name}: missing constructor kwarg {missing[0]!r}')
  kwargs.pop('use_fp16', None)
  img_channels = kwargs.pop('img_channels')
  precond_kwargs = {k: float(kwargs.pop(k)) if k != 'M' else int(kwargs.pop(k))
                    for k in _PRECOND_KWARGS[name] if k in kwargs}
  model_type = kwargs.pop('model_type', _PRECOND_DEFAULT_MODEL[name])
  model = _build_unet(model_type, dict(kwargs, in_channels=img_channels, out_channels=img_channels))
  return _PRECONDS[name](model=model, dtype=dtype, **precond_kwargs)


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


def init_variables(module: nn.Module, rng: Array) -> Variables:
  """Freshly initialised variables with the official initialisers.

  Compiled without backend optimisation: the one-off run is cheap, while optimising the hundreds of
  random-number generators of a U-Net's init would cost several times longer compiles.
  """
  init = jax.jit(module.init, compiler_options={'xla_backend_optimization_level': 0})
  return dict(init(rng, *example_inputs(module)))


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


@dataclasses.dataclass
class Network:
  """A converted network: module, variables and the official constructor record, callable in eval mode."""
  module: nn.Module
  variables: Variables
  class_name: str
  init_kwargs: dict
  _compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  @property
  def params(self) -> Any:
    return self.variables['params']

  @property
  def buffers(self) -> Any:
    return self.variables.get('buffers', {})

  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, **flags: Any) -> Any:
    """module.apply in eval mode, jitted once per set of (static) flags such as `return_flag`."""
    key = tuple(sorted(flags.items()))
    if key not in self._compiled:
      self._compiled[key] = jax.jit(functools.partial(self.module.apply, train=False, **flags))
    return self._compiled[key](self.variables, x, sigma, class_labels, augment_labels)
