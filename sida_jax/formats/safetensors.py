"""safetensors files ↔ PyTorch-named state_dicts (name → numpy array), without torch.

Our networks keep PyTorch's parameter names, so a file written here loads into the official class with
`load_state_dict(strict=True)`, and a file written by PyTorch or diffusers converts with a strict copy.
"""
import os
from collections.abc import Mapping
from typing import Optional

import flax.linen as nn
import numpy as np
from safetensors import numpy as safetensors_numpy

from sida_jax.models import convert
from sida_jax.models import vae as vae_lib


def read_safetensors(path: os.PathLike) -> dict[str, np.ndarray]:
  """Reads a safetensors file as a state_dict of numpy arrays."""
  return safetensors_numpy.load_file(os.fspath(path))


def export_safetensors(module: nn.Module, variables: convert.Variables, path: os.PathLike,
                       metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes the PyTorch state_dict of `variables` as a safetensors file."""
  safetensors_numpy.save_file(convert.state_dict_from_variables(module, variables), os.fspath(path),
                              metadata=dict(metadata) if metadata else None)


def load_diffusers_safetensors(path: str, vae: vae_lib.AutoencoderKL) -> dict:
  """Reads `diffusion_pytorch_model.safetensors` (without torch) and converts it for `vae`."""
  return vae_lib.convert_diffusers_state(read_safetensors(path), vae)
