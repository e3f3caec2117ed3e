"""Official EDM class names and constructor kwargs → EDM modules (`EDMPrecond(model=SongUNet(...))`).

The kwargs are those the official persistence layer records (`_init_kwargs`): preconditioner kwargs,
`model_type` naming the U-Net, and U-Net kwargs under their own names, each checked against the
module's fields. SiDA's `*_EncoderDecoder` classes are the same networks with an encoder output.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sida_jax.models.edm import layers, precond, unets

# Official class names (EDM, and SiDA's encoder/decoder variants of the same networks).
_PRECONDS = {'EDMPrecond': precond.EDMPrecond, 'VPPrecond': precond.VPPrecond,
             'VEPrecond': precond.VEPrecond, 'EDMPrecond_EncoderDecoder': precond.EDMPrecond,
             'GDDPrecond': precond.GDDPrecond}
PRECOND_CLASSES = tuple(_PRECONDS)
_UNETS = {'SongUNet': unets.SongUNet, 'DhariwalUNet': unets.DhariwalUNet,
          'SongUNet_EncoderDecoder': unets.SongUNet, 'DhariwalUNet_EncoderDecoder': unets.DhariwalUNet}
# Constructor kwargs of the official preconditioners that are not U-Net kwargs, and default U-Nets.
_EDM_PRECOND_KWARGS = ('sigma_min', 'sigma_max', 'sigma_data')
_PRECOND_KWARGS = {
    'EDMPrecond': _EDM_PRECOND_KWARGS,
    'EDMPrecond_EncoderDecoder': _EDM_PRECOND_KWARGS,
    'VPPrecond': ('beta_d', 'beta_min', 'M', 'epsilon_t'),
    'VEPrecond': ('sigma_min', 'sigma_max'),
    'GDDPrecond': _EDM_PRECOND_KWARGS,
}
_PRECOND_DEFAULT_MODEL = {'EDMPrecond': 'DhariwalUNet', 'VPPrecond': 'SongUNet', 'VEPrecond': 'SongUNet',
                          'EDMPrecond_EncoderDecoder': 'SongUNet_EncoderDecoder', 'GDDPrecond': 'DhariwalUNet'}


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


def unet_block_from_init_kwargs(class_name: str, init_kwargs: Mapping[str, Any],
                                dtype: Any = jnp.float32) -> layers.UNetBlock:
  """A `UNetBlock` from its official kwargs (`init` → `init_default`, init dicts → `WeightInit`).

  The block has no compute dtype of its own; `class_name` and `dtype` are accepted for a uniform call.
  """
  del class_name, dtype
  renamed = {'init': 'init_default'}
  fields = _field_names(layers.UNetBlock)
  values = {}
  for key, value in init_kwargs.items():
    name = renamed.get(key, key)
    if name not in fields:
      raise ValueError(f'UNetBlock: unknown constructor kwarg {key!r}')
    if name.startswith('init_') and value is not None:
      value = layers.WeightInit.from_kwargs(value)
    values[name] = _as_static(value)
  return layers.UNetBlock(**values)


def from_init_kwargs(class_name: str, init_kwargs: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
  """The EDM preconditioner `class_name` (dotted or bare) around the U-Net its kwargs describe.

  `use_fp16` is superseded by `dtype`, the U-Net's compute dtype.
  """
  name = class_name.rsplit('.', 1)[-1]
  if name not in _PRECONDS:
    raise ValueError(f'from_init_kwargs: unknown EDM class {class_name!r}')
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


def rewrap_init_kwargs(class_name: str, init_kwargs: Mapping[str, Any], new_class: str) -> dict:
  """Constructor kwargs of the EDM preconditioner `new_class` around the U-Net that `class_name(**init_kwargs)`
  wraps (GDD's generator: the teacher's U-Net under `GDDPrecond`). The old preconditioner's own kwargs are
  dropped and the U-Net's `model_type` is made explicit (the default differs between classes); the
  variables carry over unchanged (every preconditioner holds the U-Net as `model`)."""
  name, new = class_name.rsplit('.', 1)[-1], new_class.rsplit('.', 1)[-1]
  for n, c in ((name, class_name), (new, new_class)):
    if n not in _PRECONDS:
      raise ValueError(f'{new_class} goes around the U-Net of an EDM preconditioner ({", ".join(_PRECONDS)}); '
                       f'{c!r} is not one')
  kwargs = {k: v for k, v in init_kwargs.items() if k not in _PRECOND_KWARGS[name]}
  model_type = kwargs.get('model_type', _PRECOND_DEFAULT_MODEL[name])
  kwargs['model_type'] = model_type.replace('_EncoderDecoder', '')
  return kwargs
