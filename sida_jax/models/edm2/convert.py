"""Official EDM2 (and SiD's EDM2) class names and constructor kwargs → EDM2 modules (`Precond`, `UNet`)."""
import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sida_jax.models.edm2.networks import Precond, UNet

# The preconditioners: what snapshots hold and what the training code distils.
PRECOND_CLASSES = ('Precond', 'EDM_2_Precond_EncoderDecoder', 'EDM_2_Precond_Generator')

# Official and SiD class names → (module, kwargs to force). Constructor-only switches of the official
# code that have no meaning here are dropped: `use_fp16` (see `dtype`), and SiD's forced-normalisation
# flags `force_normalization`/`use_gan` (the training step decides whether to call `force_normalize`).
_CLASSES = {
    'Precond': (Precond, {}),
    'EDM_2_Precond_EncoderDecoder': (Precond, {}),
    'EDM_2_Precond_Generator': (Precond, {'logvar_channels': 0}),
    'UNet': (UNet, {}),
    'UNet_EncoderDecoder': (UNet, {}),
}
_DROPPED_KWARGS = ('use_fp16', 'force_normalization', 'use_gan')


def _field_names(cls: type) -> frozenset[str]:
  return frozenset(f.name for f in dataclasses.fields(cls)) - {'parent', 'name'}


def from_init_kwargs(class_name: str, init_kwargs: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
  """Builds the module described by a pickle's class name and constructor kwargs (`_init_kwargs`)."""
  short_name = class_name.rsplit('.', 1)[-1]
  if short_name not in _CLASSES:
    raise ValueError(f"from_init_kwargs: unknown EDM2 class {class_name!r}")
  cls, forced = _CLASSES[short_name]
  allowed = _field_names(cls)
  kwargs = {}
  for key, value in init_kwargs.items():
    if key in _DROPPED_KWARGS or key in forced:
      continue
    if key not in allowed or key == 'dtype':
      raise ValueError(f"from_init_kwargs: unknown key {key!r} for {short_name}")
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  return cls(**kwargs, **forced, dtype=dtype)
