"""Official class names → our modules, and the record of a built network.

A network is described the way the official code records it: a class name (dotted or bare) and its
constructor kwargs. `build_network` looks the bare name up in `BUILDERS`, which maps every class we port
to its family's builder (`edm/convert.py`, `edm2/convert.py`, `toy.py`); a new family adds its names
here. `Network` bundles a built module with its variables and that record.
"""
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sida_jax.models import convert, toy
from sida_jax.models.denoiser import Denoiser
from sida_jax.models.edm import convert as edm_convert
from sida_jax.models.edm2 import convert as edm2_convert

Array = jax.Array

# Bare class name → builder(class_name, init_kwargs, dtype) -> module.
BUILDERS: dict[str, Callable[[str, Mapping[str, Any], Any], nn.Module]] = {
    **dict.fromkeys(edm_convert.PRECOND_CLASSES, edm_convert.from_init_kwargs),
    'UNetBlock': edm_convert.unet_block_from_init_kwargs,
    **dict.fromkeys(edm2_convert.PRECOND_CLASSES, edm2_convert.from_init_kwargs),
    'ToyPrecond': toy.from_init_kwargs,   # sida_jax's small MLP denoiser (toys, fast tests)
}


def is_edm2_class(class_name: str) -> bool:
  """Whether an official class name (dotted or bare) is one of EDM2's preconditioners."""
  return class_name.rsplit('.', 1)[-1] in edm2_convert.PRECOND_CLASSES


def build_network(class_name: str, init_kwargs: Mapping[str, Any],
                  dtype: jnp.dtype = jnp.float32) -> nn.Module:
  """The Flax module for an official class and its recorded constructor kwargs.

  `class_name` may be dotted (`training.networks.EDMPrecond`) or bare (`EDMPrecond`); `dtype` is the
  compute dtype (it supersedes the official `use_fp16`).
  """
  name = class_name.rsplit('.', 1)[-1]
  if name not in BUILDERS:
    raise ValueError(f'unsupported network class {class_name!r} (known: {", ".join(BUILDERS)})')
  return BUILDERS[name](class_name, init_kwargs, dtype)


def rewrap(class_name: str, init_kwargs: Mapping[str, Any], new_class: str) -> dict:
  """Constructor kwargs of the preconditioner `new_class` around the network that `class_name(**init_kwargs)`
  wraps, with unchanged variables (GDD's generator: an EDM teacher's U-Net under `GDDPrecond`). Only EDM
  preconditioners rewrap; any other class is a ValueError naming it."""
  return edm_convert.rewrap_init_kwargs(class_name, init_kwargs, new_class)


def denoiser_for(network_module: nn.Module, class_name: str, init_kwargs: Mapping[str, Any],
                 use_logvar: bool = False) -> Denoiser:
  """Wraps a Precond module with the facts the training code needs."""
  return Denoiser(network_module, label_dim=int(init_kwargs.get('label_dim', 0) or 0),
                  augment_dim=int(init_kwargs.get('augment_dim', 0) or 0),
                  has_logvar=bool(use_logvar and is_edm2_class(class_name)))


def with_block_remat(module: nn.Module) -> nn.Module:
  """The same network (same parameters) with every U-Net block rematerialised: its activations are
  recomputed in the backward pass instead of kept (EDM's UNetBlock, EDM2's Block)."""
  if hasattr(module, 'remat_blocks'):   # EDM2 Precond
    return module.clone(remat_blocks=True)
  model = getattr(module, 'model', None)  # EDM preconditioners wrap a U-Net
  if model is not None and hasattr(model, 'remat_blocks'):
    return module.clone(model=model.clone(remat_blocks=True))
  raise ValueError(f'block rematerialisation needs an EDM or EDM2 U-Net, not {type(module).__name__}')


@dataclasses.dataclass
class Network:
  """A converted network: module, variables and the official constructor record, callable in eval mode."""
  module: nn.Module
  variables: convert.Variables
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
