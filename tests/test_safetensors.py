"""safetensors files: a network's state_dict written and read back exactly (diffusers VAE files: test_vae.py)."""
import json
import os
import pathlib
import stat
import struct

import jax
import numpy as np
import pytest

from conftest import fixtures_dir
from sida_jax.formats import safetensors
from sida_jax.models import convert, registry


def _first_network():
  """Module and state_dict of the first (listed) full EDM network fixture."""
  kwargs_path = next(p for p in sorted(fixtures_dir('edm').glob('*_kwargs.json'))
                     if not p.name.startswith('block_'))
  kwargs = json.loads(kwargs_path.read_text())
  state = dict(np.load(kwargs_path.with_name(kwargs_path.name.replace('_kwargs.json', '_state.npz'))))
  return registry.build_network(kwargs['class_name'], kwargs['init_kwargs']), state


@pytest.mark.fixtures
def test_safetensors_round_trip(tmp_path):
  module, state = _first_network()
  variables = convert.variables_from_state_dict(module, state)
  path = tmp_path / 'net.safetensors'
  safetensors.export_safetensors(module, variables, path, metadata={'class_name': 'EDMPrecond'})
  read = safetensors.read_safetensors(path)
  assert sorted(read) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(read[name], value, err_msg=name)
  reloaded = convert.variables_from_state_dict(module, read)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, variables)


# ----------------------------------------------------------------------------------------------------
# Our reader: half precision, files written by torch, and files it must refuse.

DATA = pathlib.Path(__file__).parent / 'data' / 'safetensors'


def _write(path, header, data=b''):
  """A safetensors file by the format's definition: u64 header length, JSON header, raw bytes."""
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(blob)) + blob + data)
  return path


def test_bfloat16_and_float16_are_widened_to_float32(tmp_path):
  values = np.array([[1.0, -2.5], [3.140625, 2.0 ** -10]], np.float32)  # exact in bfloat16 and float16
  bf16 = (values.view(np.uint32) >> 16).astype('<u2').tobytes()  # bfloat16 = the top half of float32
  fp16 = values.astype('<f2').tobytes()
  ints = np.array([7, -3], '<i4').tobytes()
  path = _write(tmp_path / 'half.safetensors', {
      '__metadata__': {'format': 'pt'},
      'a.bf16': {'dtype': 'BF16', 'shape': [2, 2], 'data_offsets': [0, 8]},
      'a.fp16': {'dtype': 'F16', 'shape': [2, 2], 'data_offsets': [8, 16]},
      'b.i32': {'dtype': 'I32', 'shape': [2], 'data_offsets': [16, 24]},
  }, bf16 + fp16 + ints)
  read = safetensors.read_safetensors(path)
  assert list(read) == ['a.bf16', 'a.fp16', 'b.i32']
  for name in ('a.bf16', 'a.fp16'):
    assert read[name].dtype == np.float32
    np.testing.assert_array_equal(read[name], values, err_msg=name)
  assert read['b.i32'].dtype == np.int32
  np.testing.assert_array_equal(read['b.i32'], [7, -3])


def test_file_written_by_torch():
  read = safetensors.read_safetensors(DATA / 'torch_written.safetensors')
  with np.load(DATA / 'torch_written_values.npz') as ref:
    assert sorted(read) == sorted(ref.files)
    for name in ref.files:
      assert read[name].dtype == ref[name].dtype and read[name].shape == ref[name].shape, name
      np.testing.assert_array_equal(read[name], ref[name], err_msg=name)


_ENTRY = {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}


@pytest.mark.parametrize('header, data, reason', [
    (None, b'', 'header length'),                                                # length beyond the file
    ({'w': dict(_ENTRY, dtype='F8_E4M3')}, bytes(8), 'dtype'),
    ({'w': dict(_ENTRY, dtype='O')}, bytes(8), 'dtype'),
    ({'w': dict(_ENTRY, data_offsets=[0, 4])}, bytes(8), '4 bytes for F32'),
    ({'w': dict(_ENTRY, data_offsets=[4, 12])}, bytes(8), 'not a range inside'),  # past the end
    ({'w': dict(_ENTRY, data_offsets=[8, 0])}, bytes(8), 'not a range inside'),
    ({'w': dict(_ENTRY, shape=[-2, -1])}, bytes(8), 'shape'),
    ({'w': dict(_ENTRY, shape=[1 << 40, 1 << 40])}, bytes(8), 'bytes for F32'),
    ({'w': _ENTRY, 'v': dict(_ENTRY, data_offsets=[4, 12])}, bytes(12), 'overlaps'),
    ({'w': dict(_ENTRY, extra=1)}, bytes(8), 'exactly dtype'),
    ({'__metadata__': {'a': 1}}, b'', '__metadata__'),
    ([1, 2], b'', 'not a JSON object'),
    ('deep', b'', 'not JSON'),
])
def test_malformed_files_are_refused(tmp_path, header, data, reason):
  path = tmp_path / 'bad.safetensors'
  if header is None:
    path.write_bytes(struct.pack('<Q', 1 << 40) + b'{}')
  elif header == 'deep':
    blob = b'[' * 100_000 + b']' * 100_000
    path.write_bytes(struct.pack('<Q', len(blob)) + blob)
  else:
    _write(path, header, data)
  with pytest.raises(ValueError, match=rf'bad\.safetensors as a safetensors file: .*{reason}'):
    safetensors.read_safetensors(path)


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_written_with_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    safetensors.write_safetensors({'w': np.arange(3, dtype=np.float32)}, tmp_path / 'w.safetensors')
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'w.safetensors').st_mode) == 0o666 & ~umask
  np.testing.assert_array_equal(safetensors.read_safetensors(tmp_path / 'w.safetensors')['w'], [0, 1, 2])
  assert os.listdir(tmp_path) == ['w.safetensors']
