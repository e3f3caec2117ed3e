"""Tests for sida_jax.formats.pickle: refused payloads, read-only stand-ins, unreadable files."""
import io
import pickle
import subprocess

import numpy as np
import pytest

from sida_jax.formats import snapshot, torch_files
from sida_jax.formats.pickle import UnsafePickleError
from torch_pickles import PAYLOADS, Storage, Tensor, legacy_torch_save, op_global, op_pickle, op_str


@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('refused', sorted(PAYLOADS))
def test_dangerous_globals_are_refused(tmp_path, protocol, refused):
  marker = tmp_path / 'pwned'
  payload = op_pickle(PAYLOADS[refused](marker, protocol), protocol)
  path = tmp_path / 'model.pkl'
  path.write_bytes(payload)
  for read in (snapshot.read_snapshot, torch_files.read_torch_file):
    with pytest.raises(UnsafePickleError, match=f"'{refused}.*model.pkl"):
      read(path)
  assert not marker.exists()
  # The same bytes are a live payload for an unrestricted unpickler (it creates the marker).
  result = pickle.loads(payload)
  if isinstance(result, subprocess.Popen):
    result.wait()
  assert marker.exists()


@pytest.mark.parametrize('target', ['torch.bfloat16', 'torch.FloatStorage', 'torch._utils._rebuild_tensor_v2',
                                    'dnnlib.util.EasyDict', 'torch.nn.modules.container.ModuleDict',
                                    'torch.storage._load_from_bytes'])
def test_build_cannot_patch_stand_ins(tmp_path, target):
  # BUILD with (None, slot state) is setattr on whatever is on the stack: here a shared stand-in.
  module, name = target.rsplit('.', 1)
  patch = pickle.EMPTY_DICT + op_str('dtype') + pickle.NONE + pickle.SETITEM
  path = tmp_path / 'patch.pkl'
  path.write_bytes(op_pickle(op_global(module, name, 4) + pickle.NONE + patch + pickle.TUPLE2
                              + pickle.BUILD, 4))
  with pytest.raises(ValueError, match=r'patch\.pkl'):
    snapshot.read_snapshot(path)
  stand_in = torch_files.GLOBALS.get(target)
  assert getattr(stand_in, 'dtype', 'unset') is not None


def test_missing_and_unreadable_files(tmp_path):
  missing = tmp_path / 'nowhere.pkl'
  for read in (snapshot.read_snapshot, torch_files.read_torch_file):
    with pytest.raises(FileNotFoundError, match='nowhere.pkl'):
      read(missing)
  text = tmp_path / 'notes.txt'
  text.write_text('not a pickle at all\n')
  with pytest.raises(ValueError, match=r'notes\.txt as a snapshot pickle'):
    snapshot.read_snapshot(text)
  with pytest.raises(ValueError, match=r'notes\.txt as a torch\.save file'):
    torch_files.read_torch_file(text)
  plain = tmp_path / 'plain.pkl'
  plain.write_bytes(pickle.dumps({'a': 1}))
  with pytest.raises(ValueError, match=r'plain\.pkl .*not a torch\.save file'):
    torch_files.read_torch_file(plain)
  truncated = tmp_path / 'truncated.pth'
  storage = Storage(np.arange(6, dtype=np.float32), key='9')
  truncated.write_bytes(legacy_torch_save({'w': Tensor.view_of(storage, storage.array)})[:-4])
  with pytest.raises(ValueError, match=r'truncated\.pth.*truncated'):
    torch_files.read_torch_file(truncated)
  assert snapshot.read_snapshot(io.BytesIO(pickle.dumps({'a': [1, 2.5]}))) == {'a': [1, 2.5]}
