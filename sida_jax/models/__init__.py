"""Networks only: Flax modules grouped by family, with their preconditioning. Nothing here reads a file.

Files are read by `sida_jax.formats`; its loaders are re-exported here, resolved on first use (formats
imports models, so importing them eagerly would be a cycle):

    from sida_jax.models import load_snapshot
    net = load_snapshot("edm-cifar10-32x32-uncond-vp.pkl", key="ema")
    denoised = net(x_nhwc, sigma, class_labels=None, augment_labels=None)
"""
from __future__ import annotations

import importlib

from sida_jax.models.convert import Network, build_network
from sida_jax.models.denoiser import Denoiser, DenoiserOutput

# Re-exported loader → the formats module that defines it.
_LOADERS = {"load_snapshot": "sida_jax.formats.snapshot"}

__all__ = ["Network", "build_network", "Denoiser", "DenoiserOutput", "denoiser_for", "is_edm2", *_LOADERS]


def __getattr__(name: str):
  if name in _LOADERS:
    return getattr(importlib.import_module(_LOADERS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_edm2(class_name: str) -> bool:
  from sida_jax.models import convert  # pylint: disable=import-outside-toplevel
  return convert.is_edm2_class(class_name)


def denoiser_for(network_module, class_name: str, init_kwargs: dict, use_logvar: bool = False) -> Denoiser:
  """Wraps a Precond module with the facts the training code needs."""
  return Denoiser(network_module, label_dim=int(init_kwargs.get("label_dim", 0) or 0),
                  augment_dim=int(init_kwargs.get("augment_dim", 0) or 0),
                  has_logvar=bool(use_logvar and is_edm2(class_name)))
