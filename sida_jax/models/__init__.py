"""Networks only: Flax modules grouped by family, with their preconditioning. Nothing here reads a file.

  edm/ edm2/       one folder per family: the modules, and `convert.py` (official class names → modules)
  vae.py, toy.py   Stable Diffusion's autoencoder (EDM2 latents); a small MLP denoiser for toys and tests
  registry.py      official class name + constructor kwargs → module (`build_network`), `Network`
  convert.py       strict PyTorch state_dict <-> variables copy, templates, fresh init
  denoiser.py      one calling convention over every preconditioned network

Files are read by `sida_jax.formats`; its loaders are re-exported here and resolved on first use
(formats imports models, so importing them eagerly would be a cycle):

    from sida_jax.models import load_snapshot
    net = load_snapshot("edm-cifar10-32x32-uncond-vp.pkl", key="ema")
    denoised = net(x_nhwc, sigma, class_labels=None, augment_labels=None)

    from sida_jax.models import load_pretrained      # diffusers / transformers folders
    unet = load_pretrained("stable-diffusion-v1-5/unet")
"""
import importlib

from sida_jax.models.denoiser import Denoiser, DenoiserOutput
from sida_jax.models.registry import Network, build_network, denoiser_for

# Re-exported loader → the formats module that defines it.
_LOADERS = {"load_snapshot": "sida_jax.formats.snapshot", "load_pretrained": "sida_jax.formats.pretrained"}

__all__ = ["Denoiser", "DenoiserOutput", "Network", "build_network", "denoiser_for", *_LOADERS]


def __getattr__(name: str):
  if name in _LOADERS:
    return getattr(importlib.import_module(_LOADERS[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
