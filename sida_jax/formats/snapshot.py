"""EDM / EDM2 / SiD snapshots and SiD training states → our networks.

Read without torch through the allow-listed reader (`torch_files`), then built and copied strictly.
The format is told from the file's first bytes:

* snapshot pickles (`network-snapshot-*.pkl`, `edm2-img512-*.pkl`): the network under `ema`;
* SiD training states (`training-state-*.pt`, `torch.save` zip or legacy): on SiD's main branch the
  modules themselves (`G_ema`, `G`, `fake_score`), on the sida branch only their state_dicts
  (`G_ema_state`, ...), whose architecture is the teacher's (`like=`).

  net = load_snapshot('edm-cifar10-32x32-uncond-vp.pkl', key='ema')   # a Network: module + variables
  gen = load_snapshot('training-state-002000.pt', like=teacher)       # G_ema (module or state_dict)
  raw = read_snapshot('network-snapshot-004000.pkl')['ema']           # the pickled record itself
  raw.class_name, raw.init_kwargs    # 'EDMPrecond', {'model_type': 'SongUNet', ...}
  raw.state_dict()                   # {'model.enc.32x32_conv.weight': np.ndarray, ...}
"""
import os
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sida_jax.formats import torch_files
from sida_jax.formats.pickle import PathOrFile, UnsafePickleError, describe
from sida_jax.models import convert, registry

KIND = 'a snapshot pickle or torch.save file'
# Other names of a key in SiD training states: `ema` is the generator's EMA there.
_ALIASES = {'ema': ('G_ema',)}
# The biggest example input a recorded network may ask for when it is traced (float32 elements).
_MAX_INPUT_ELEMENTS = 1 << 24
# Layer calls a trace may make (the largest official networks make a few thousand).
_MAX_LAYER_CALLS = 10_000


def read_snapshot(path_or_file: PathOrFile, max_bytes: Optional[int] = None) -> Any:
  """The top-level object (a dict; an EasyDict for EDM2) of a snapshot pickle or a `torch.save` file.

  Persistent networks come back as `torch_files.PersistentObject`s with numpy tensors; nothing outside
  the allow-list (`torch_files.ALLOWED_GLOBALS`) is resolved, and nothing from the file is executed.
  Raises FileNotFoundError, or UnsafePickleError (a ValueError) for anything refused.
  """
  return torch_files.read_any(path_or_file, KIND, max_bytes)[1]


def _is_state_dict(value: Any) -> bool:
  return (isinstance(value, dict) and bool(value)
          and all(type(k) is str and isinstance(v, np.ndarray) for k, v in value.items()))


def _select(contents: Mapping, key: str, source: str) -> tuple[str, Any]:
  """(name, value) of `key` in a snapshot or training state: `key`, `key_state` or an alias."""
  for name in (key, f'{key}_state', *_ALIASES.get(key, ()), *(f'{a}_state' for a in _ALIASES.get(key, ()))):
    if name in contents:
      return name, contents[name]
  present = sorted((k for k in contents), key=str)[:20]
  raise ValueError(f'{source}: no key {key!r}; keys present: {present}')


def _checked_kwargs(source: str, kwargs: dict) -> dict:
  """Recorded constructor kwargs, refused when they ask for inputs no file of this size describes."""
  def size(name: str) -> int:
    value = kwargs.get(name, 1)
    if type(value) is not int or not 0 <= value <= 1 << 16:
      raise UnsafePickleError(f'{source}: init kwarg {name} is {describe(value)}')
    return max(value, 1)
  if size('img_resolution') ** 2 * size('img_channels') > _MAX_INPUT_ELEMENTS:
    raise UnsafePickleError(f'{source}: a network on {kwargs["img_resolution"]}² x {kwargs["img_channels"]} '
                            'images is beyond what is read')
  return kwargs


def _build_and_copy(source: str, class_name: str, init_kwargs: dict, state: dict,
                    dtype: jnp.dtype) -> registry.Network:
  """Builds the recorded network and copies `state` into it strictly; every failure names the file.

  Tracing the module visits its layers, whose number the kwargs choose: the trace stops once it
  calls many more layers than the file has tensors, so no recorded kwargs can make it run for hours.
  """
  budget = min(4 * len(state) + 1000, _MAX_LAYER_CALLS)
  calls = [0]

  def count_calls(next_fun, args, kwargs, context):
    del context
    calls[0] += 1
    if calls[0] > budget:
      raise UnsafePickleError(f'{source}: the recorded {class_name} has far more layers than the file '
                              f'has tensors ({len(state)})')
    return next_fun(*args, **kwargs)

  try:
    module = registry.build_network(class_name, _checked_kwargs(source, init_kwargs), dtype)
    with nn.intercept_methods(count_calls):
      variables = convert.variables_from_state_dict(module, state)
  except UnsafePickleError:
    raise
  except Exception as error:  # pylint: disable=broad-except  (bad kwargs surface as any error type)
    raise UnsafePickleError(f'{source}: the stored {class_name[:100]} does not load: '
                            f'{type(error).__name__}: {str(error)[:300]}') from error
  return registry.Network(module, variables, class_name, dict(init_kwargs))


def load_snapshot(path: os.PathLike, key: str = 'ema', dtype: jnp.dtype = jnp.float32,
                  like: Optional[registry.Network] = None, max_bytes: Optional[int] = None) -> registry.Network:
  """The network stored under `key` of a snapshot pickle or SiD training state, read without torch.

  For a training state `key='ema'` means `G_ema`; a key that holds only a state_dict (`G_ema_state`
  on SiD's sida branch) is built with the class and kwargs of `like` (the teacher), and EDM2
  generators, which drop the teacher's logvar head, as `EDM_2_Precond_Generator`.
  Raises ValueError for a missing key, UnsafePickleError (a ValueError) for a file that is refused or
  whose network does not load; `max_bytes` overrides the reader's memory budget (see `pickle.Budget`).
  """
  source = os.fspath(path)
  contents = read_snapshot(path, max_bytes)
  if not isinstance(contents, dict):
    raise UnsafePickleError(f'{source}: holds {describe(contents)}, not a snapshot or training-state dict')
  name, obj = _select(contents, key, source)
  if isinstance(obj, torch_files.PersistentObject):
    try:
      class_name, init_kwargs, state = obj.class_name, obj.init_kwargs, obj.state_dict()
    except UnsafePickleError as error:
      raise UnsafePickleError(f'{source}: {name!r}: {error}') from None
  elif _is_state_dict(obj):
    if like is None:
      raise ValueError(f'{source}: {name!r} is a bare state_dict (a SiDA training state); its class and '
                       'kwargs come from the teacher, so load it as a generator init next to a teacher')
    class_name, init_kwargs, state = like.class_name, dict(like.init_kwargs), obj
    if registry.is_edm2_class(class_name) and 'logvar_linear.weight' not in state:
      class_name = 'EDM_2_Precond_Generator'
  else:
    raise ValueError(f'{source}: {name!r} holds {type(obj).__name__}, not a network')
  return _build_and_copy(source, class_name, init_kwargs, state, dtype)
