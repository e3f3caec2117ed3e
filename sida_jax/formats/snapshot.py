"""EDM / EDM2 / SiD training snapshots (`network-snapshot-*.pkl`, `edm2-img512-*.pkl`) → our networks.

Read without torch through the allow-listed reader (`torch_files`), then built and copied strictly:

  net = load_snapshot('edm-cifar10-32x32-uncond-vp.pkl', key='ema')   # a Network: module + variables
  raw = read_snapshot('network-snapshot-004000.pkl')['ema']             # the pickled record itself
  raw.class_name, raw.init_kwargs    # 'EDMPrecond', {'model_type': 'SongUNet', ...}
  raw.state_dict()                   # {'model.enc.32x32_conv.weight': np.ndarray, ...}
"""
import os
from typing import Any

import jax.numpy as jnp

from sida_jax.formats import torch_files
from sida_jax.formats.pickle import PathOrFile
from sida_jax.models import convert, registry


def read_snapshot(path_or_file: PathOrFile) -> Any:
  """The top-level object (a dict; an EasyDict for EDM2) of an EDM / EDM2 / SiD snapshot pickle.

  Persistent networks come back as `torch_files.PersistentObject`s with numpy tensors; nothing outside
  the allow-list (`torch_files.ALLOWED_GLOBALS`) is resolved, and nothing from the file is executed.
  Raises FileNotFoundError, UnsafePickleError for a disallowed global, ValueError for a malformed file.
  """
  return torch_files.read_pickle(path_or_file, 'a snapshot pickle')


def load_snapshot(path: os.PathLike, key: str = 'ema', dtype: jnp.dtype = jnp.float32) -> registry.Network:
  """The network stored under `key` of an EDM/EDM2/SiD training snapshot pickle, read without torch."""
  contents = read_snapshot(path)
  if key not in contents:
    raise ValueError(f'{os.fspath(path)}: no key {key!r}; keys present: {sorted(contents)}')
  obj = contents[key]
  if not hasattr(obj, 'class_name') or not hasattr(obj, 'state_dict'):
    raise ValueError(f'{os.fspath(path)}: {key!r} holds {type(obj).__name__}, not a network')
  module = registry.build_network(obj.class_name, obj.init_kwargs, dtype)
  variables = convert.variables_from_state_dict(module, obj.state_dict())
  return registry.Network(module, variables, obj.class_name, dict(obj.init_kwargs))
