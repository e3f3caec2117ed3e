"""Networks: EDM and EDM2 ports, torch-free snapshot reading and conversion.

    from sida_jax.models import load_snapshot
    net = load_snapshot("edm-cifar10-32x32-uncond-vp.pkl", key="ema")
    denoised = net(x_nhwc, sigma, class_labels=None, augment_labels=None)

    from sida_jax.models import load_pretrained      # diffusers / transformers folders
    unet = load_pretrained("stable-diffusion-v1-5/unet")
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from sida_jax.models.convert import Network, build_network, load_snapshot
from sida_jax.models.denoiser import Denoiser, DenoiserOutput

__all__ = ["Network", "build_network", "load_snapshot", "load_network", "load_pretrained", "Denoiser",
           "DenoiserOutput", "denoiser_for", "is_edm2"]


def is_edm2(class_name: str) -> bool:
  from sida_jax.models import convert  # pylint: disable=import-outside-toplevel
  return convert.is_edm2_class(class_name)


def load_network(source: str, key: str = "ema", dtype=jnp.float32) -> Network:
  """A network from a snapshot `.pkl`, a folder written by `--mode convert`, or a sida_jax workdir
  (its latest EMA generator)."""
  from sida_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if not source:
    raise ValueError("no network source given")
  if os.path.isfile(source):
    return load_snapshot(source, key=key, dtype=dtype)
  if os.path.isfile(os.path.join(source, checkpoint.NETWORK_JSON)) and os.path.isdir(
      os.path.join(source, "params")):
    class_name, init_kwargs, variables = checkpoint.load_network_files(source)
    return Network(build_network(class_name, init_kwargs, dtype), variables, class_name, init_kwargs)
  if os.path.isdir(os.path.join(source, "checkpoints")):
    info = checkpoint.read_json(os.path.join(source, checkpoint.NETWORK_JSON))
    state, _ = checkpoint.restore_raw(os.path.join(source, "checkpoints"))
    variables = {"params": state["generator_ema"], **state["generator"]["buffers"]}
    return Network(build_network(info["class_name"], info["init_kwargs"], dtype), variables,
                   info["class_name"], info["init_kwargs"])
  raise FileNotFoundError(f"network source not found (expected a .pkl, a converted folder or a workdir): {source}")


def load_pretrained(folder: str, dtype=jnp.float32, variant=None):
  """A diffusers / transformers folder: see `sida_jax.formats.pretrained.load_pretrained`."""
  from sida_jax.formats import pretrained  # pylint: disable=import-outside-toplevel
  return pretrained.load_pretrained(folder, dtype=dtype, variant=variant)


def denoiser_for(network_module, class_name: str, init_kwargs: dict, use_logvar: bool = False) -> Denoiser:
  """Wraps a Precond module with the facts the training code needs."""
  return Denoiser(network_module, label_dim=int(init_kwargs.get("label_dim", 0) or 0),
                  augment_dim=int(init_kwargs.get("augment_dim", 0) or 0),
                  has_logvar=bool(use_logvar and is_edm2(class_name)))
