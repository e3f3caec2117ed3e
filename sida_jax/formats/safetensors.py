"""safetensors files ↔ PyTorch-named state_dicts (name → numpy array), without torch.

Our networks keep PyTorch's parameter names, so a file written here loads into the official class with
`load_state_dict(strict=True)`, and a file written by PyTorch or diffusers converts with a strict copy.

Files are read by our own parser (the `safetensors` package's numpy reader cannot read bfloat16):
an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
raw little-endian tensor bytes. The header length is bounded, dtypes come from a fixed table, every
tensor's byte range must match its shape and lie inside the file without overlapping another, so a
file cannot make the reader allocate more than it holds (twice that for half-precision, which is
widened to float32). Anything else raises a ValueError naming the file.
"""
import json
import os
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import ml_dtypes
import numpy as np
from safetensors import numpy as safetensors_numpy

from sida_jax.models import convert
from sida_jax.models import vae as vae_lib

# The header of a 2,000-tensor network is a few hundred KB.
MAX_HEADER_BYTES = 16 << 20
_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
    'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_,
}
# Half-precision tensors are widened to float32 (exactly: every fp16/bf16 value is a float32 value).
_WIDENED = {'F16', 'BF16'}


class _Entry:
  __slots__ = ('name', 'dtype', 'shape', 'begin', 'end')

  def __init__(self, name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
    self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end


def _parse_header(header: Any, data_size: int, refuse) -> list[_Entry]:
  if not isinstance(header, dict):
    raise refuse('the header is not a JSON object')
  metadata = header.get('__metadata__', {})
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise refuse('__metadata__ is not a map of strings')
  entries = []
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if not (isinstance(info, dict) and set(info) == {'dtype', 'shape', 'data_offsets'}):
      raise refuse(f'tensor {name[:100]!r}: an entry needs exactly dtype, shape and data_offsets')
    dtype, shape, offsets = info['dtype'], info['shape'], info['data_offsets']
    if not isinstance(dtype, str) or dtype not in _DTYPES:
      raise refuse(f'tensor {name[:100]!r}: dtype {str(dtype)[:20]!r} is not one of {", ".join(_DTYPES)}')
    if (not isinstance(shape, list) or len(shape) > 32
        or not all(type(n) is int and 0 <= n < 1 << 48 for n in shape)):
      raise refuse(f'tensor {name[:100]!r}: shape is not a list of sizes')
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(type(n) is int and 0 <= n <= data_size for n in offsets) or offsets[0] > offsets[1]):
      raise refuse(f'tensor {name[:100]!r}: data_offsets {str(offsets)[:60]} are not a range inside '
                   f'the {data_size} data bytes')
    count = 1
    for n in shape:
      count *= n
    if offsets[1] - offsets[0] != count * np.dtype(_DTYPES[dtype]).itemsize:
      raise refuse(f'tensor {name[:100]!r}: {offsets[1] - offsets[0]} bytes for {dtype} of shape {shape}')
    entries.append(_Entry(name, dtype, tuple(shape), offsets[0], offsets[1]))
  end = 0
  for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
    if entry.begin < end:
      raise refuse(f'tensor {entry.name[:100]!r} overlaps another tensor')
    end = entry.end
  return entries


def read_safetensors(path: os.PathLike) -> dict[str, np.ndarray]:
  """Reads a safetensors file as a state_dict of numpy arrays, float16/bfloat16 widened to float32.

  Raises FileNotFoundError for a missing file and ValueError (naming the file) for a malformed one.
  """
  source = os.fspath(path)

  def refuse(reason: str) -> ValueError:
    return ValueError(f'cannot read {source} as a safetensors file: {reason}')

  with open(source, 'rb') as file:
    size = os.fstat(file.fileno()).st_size
    prefix = file.read(8)
    if len(prefix) != 8:
      raise refuse('shorter than its 8-byte header length')
    header_size = int.from_bytes(prefix, 'little')
    if header_size > min(MAX_HEADER_BYTES, size - 8):
      raise refuse(f'header length {header_size} is beyond the file or {MAX_HEADER_BYTES} bytes')
    try:
      header = json.loads(file.read(header_size))
    except (ValueError, RecursionError) as error:
      raise refuse(f'the header is not JSON ({type(error).__name__})') from None
    data_start = 8 + header_size
    entries = _parse_header(header, size - data_start, refuse)
    tensors = {}
    for entry in entries:
      dtype = np.dtype(_DTYPES[entry.dtype])
      array = np.empty(entry.shape, dtype)
      file.seek(data_start + entry.begin)
      if file.readinto(array.reshape(-1).view(np.uint8)) != entry.end - entry.begin:
        raise refuse(f'truncated in tensor {entry.name[:100]!r}')
      if entry.dtype == 'BOOL':
        array = array.view(np.uint8) != 0  # only 0 and 1 are valid booleans
      tensors[entry.name] = array.astype(np.float32) if entry.dtype in _WIDENED else array
  return tensors


def write_safetensors(tensors: Mapping[str, np.ndarray], path: os.PathLike,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes `tensors` as a safetensors file, atomically and with the permissions the umask gives."""
  data = safetensors_numpy.save({name: np.ascontiguousarray(value) for name, value in tensors.items()},
                                metadata=dict(metadata) if metadata else None)
  path = os.fspath(path)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as file:  # open() applies the umask; the library's writer makes files 0600
      file.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def export_safetensors(module: nn.Module, variables: convert.Variables, path: os.PathLike,
                       metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes the PyTorch state_dict of `variables` as a safetensors file."""
  write_safetensors(convert.state_dict_from_variables(module, variables), path, metadata)


def load_diffusers_safetensors(path: str, vae: vae_lib.AutoencoderKL) -> dict:
  """Reads `diffusion_pytorch_model.safetensors` (without torch) and converts it for `vae`."""
  return vae_lib.convert_diffusers_state(read_safetensors(path), vae)
