"""EDM / EDM2 / SiD training snapshots (`network-snapshot-*.pkl`, `edm2-img512-*.pkl`), read without torch.

  net = read_snapshot('network-snapshot-004000.pkl')['ema']
  net.class_name, net.init_kwargs    # 'EDMPrecond', {'model_type': 'SongUNet', ...}
  net.state_dict()                   # {'model.enc.32x32_conv.weight': np.ndarray, ...}
"""
from typing import Any

from sida_jax.formats import torch_files
from sida_jax.formats.pickle import PathOrFile


def read_snapshot(path_or_file: PathOrFile) -> Any:
  """The top-level object (a dict; an EasyDict for EDM2) of an EDM / EDM2 / SiD snapshot pickle.

  Persistent networks come back as `torch_files.PersistentObject`s with numpy tensors; nothing outside
  the allow-list (`torch_files.ALLOWED_GLOBALS`) is resolved, and nothing from the file is executed.
  Raises FileNotFoundError, UnsafePickleError for a disallowed global, ValueError for a malformed file.
  """
  return torch_files.read_pickle(path_or_file, 'a snapshot pickle')
