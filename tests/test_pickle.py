"""Tests for sida_jax.formats.pickle: refused payloads, read-only stand-ins, unreadable files."""
import io
import pathlib
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from sida_jax.formats import snapshot, torch_files
from sida_jax.formats.pickle import UnsafePickleError
from torch_pickles import PAYLOADS, Storage, Tensor, legacy_torch_save, op_call, op_global, op_pickle, op_str


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


# ----------------------------------------------------------------------------------------------------
# Crafted files from an adversarial review, each read in a child process with a 1 GB address-space
# limit: refused with UnsafePickleError, in under a second, with under 100 MB of memory growth.

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tools import fuzz_readers  # noqa: E402  pylint: disable=wrong-import-position


def read_in_child(tmp_path, files, reader='any', as_limit_mb=1024, outcome='refused'):
  """{name: message} of `fuzz_readers.run_cases` for {name: bytes}: every case refused (or read, with
  `outcome='ok'`) in under a second, and the child's resident memory grown by under 100 MB."""
  cases = []
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
    cases.append({'id': name, 'path': str(tmp_path / name), 'reader': reader})
  results = {r['id']: r for r in fuzz_readers.run_cases(cases, timeout_s=10, as_limit_mb=as_limit_mb)}
  for name, result in results.items():
    assert result['outcome'] == outcome, (name, result)  # 'refused': UnsafePickleError, no internal cause
    assert result['seconds'] < 1.0, (name, result)
  assert max(r['rss_growth_mb'] for r in results.values()) < 100, results
  return {name: r.get('message') for name, r in results.items()}


def _int(value):
  if -(1 << 31) <= value < 1 << 31:
    return pickle.BININT + struct.pack('<i', value)
  raw = value.to_bytes(9, 'little', signed=True)
  return pickle.LONG1 + bytes([len(raw)]) + raw


def _bytes(data):
  return pickle.BINBYTES + struct.pack('<I', len(data)) + data


def _tuple(*items):
  return pickle.MARK + b''.join(items) + pickle.TUPLE


def _dtype(spec, state=None):
  """numpy.dtype(spec, False, True), then BUILD with `state` (numpy's own state when None)."""
  state = state or _tuple(_int(3), op_str('|'), pickle.NONE, pickle.NONE, pickle.NONE, _int(-1), _int(-1), _int(0))
  return op_call(op_global('numpy', 'dtype', 2), op_str(spec), pickle.NEWFALSE, pickle.NEWTRUE) + state + pickle.BUILD


def _object_field_state(field_spec='O8'):
  # A structured dtype whose field 'f' is an object, with flags 0: numpy would then build a Python
  # object out of the scalar's raw bytes.
  fields = pickle.EMPTY_DICT + op_str('f') + _tuple(_dtype(field_spec), _int(0)) + pickle.SETITEM
  return _tuple(_int(3), op_str('|'), pickle.NONE, _tuple(op_str('f')), fields, _int(8), _int(1), _int(0))


def _scalar(dtype):
  return op_call(op_global('numpy.core.multiarray', 'scalar', 2), dtype, _bytes(bytes(8)))


def _reconstructed_array(shape, dtype, data):
  array = op_call(op_global('numpy.core.multiarray', '_reconstruct', 2), op_global('numpy', 'ndarray', 2),
                  _tuple(_int(0)), _bytes(b'b'))
  return array + _tuple(_int(1), _tuple(*map(_int, shape)), dtype, pickle.NEWFALSE, _bytes(data)) + pickle.BUILD


def test_numpy_cannot_be_made_to_read_raw_memory(tmp_path):
  object_scalar_key = pickle.EMPTY_DICT + _scalar(_dtype('V8', _object_field_state())) + _int(1) + pickle.SETITEM
  files = {
      'object_field_dtype_key.pkl': op_pickle(object_scalar_key, 2),
      'structured_float_dtype.pkl': op_pickle(_scalar(_dtype('f8', _object_field_state('f8'))), 2),
      'object_dtype_scalar.pkl': op_pickle(_scalar(_dtype('O8')), 2),
      'object_array.pkl': op_pickle(_reconstructed_array([2], _dtype('O8'), bytes(16)), 2),
      'ndarray_called.pkl': op_pickle(op_call(op_global('numpy', 'ndarray', 2), _tuple(_int(16)), op_str('u1'),
                                              _bytes(b'abcd'), _int(-1000)), 2),
      'big_endian_dtype.pkl': op_pickle(_dtype('f8', _tuple(_int(3), op_str('>'), pickle.NONE, pickle.NONE,
                                                            pickle.NONE, _int(-1), _int(-1), _int(0))), 2),
  }
  messages = read_in_child(tmp_path, files)
  assert "numpy dtype 'V8'" in messages['object_field_dtype_key.pkl']
  assert 'numpy dtype float64 with state' in messages['structured_float_dtype.pkl']
  assert "numpy dtype 'O8'" in messages['object_dtype_scalar.pkl'] and "'O8'" in messages['object_array.pkl']
  assert 'numpy.ndarray, which is not an allowed function' in messages['ndarray_called.pkl']
  assert 'only plain little-endian' in messages['big_endian_dtype.pkl']


def test_object_scalar_in_init_kwargs_does_not_reach_load_snapshot(tmp_path):
  """The --config.teacher path: a snapshot whose `_init_kwargs` hold an object-field numpy scalar."""
  state = (pickle.EMPTY_DICT + op_str('_parameters') + pickle.EMPTY_DICT + pickle.SETITEM
           + op_str('_init_kwargs') + pickle.EMPTY_DICT + op_str('model_channels')
           + _scalar(_dtype('V8', _object_field_state())) + pickle.SETITEM + pickle.SETITEM)
  meta = (pickle.EMPTY_DICT + op_str('type') + op_str('class') + pickle.SETITEM + op_str('class_name')
          + op_str('EDMPrecond') + pickle.SETITEM + op_str('state') + state + pickle.SETITEM)
  ema = op_call(op_global('torch_utils.persistence', '_reconstruct_persistent_obj', 2), meta)
  payload = op_pickle(pickle.EMPTY_DICT + op_str('ema') + ema + pickle.SETITEM, 2)
  messages = read_in_child(tmp_path, {'network-snapshot.pkl': payload}, reader='network', as_limit_mb=2048)
  assert "numpy dtype 'V8'" in messages['network-snapshot.pkl']


def _nested(open_op, close_op, depth):
  return open_op * depth + close_op * (depth - 1)


def test_every_refusal_is_one_error_type(tmp_path):
  """Inputs that used to escape as RecursionError, MemoryError, TypeError, AttributeError, KeyError."""
  deep_kwargs = (pickle.EMPTY_DICT + op_str('_parameters') + pickle.EMPTY_DICT + pickle.SETITEM
                 + op_str('_init_kwargs') + pickle.EMPTY_DICT + op_str('x')
                 + _nested(pickle.EMPTY_LIST, pickle.APPEND, 20_000) + pickle.SETITEM + pickle.SETITEM)
  meta = (pickle.EMPTY_DICT + op_str('type') + op_str('class') + pickle.SETITEM + op_str('class_name')
          + op_str('Net') + pickle.SETITEM + op_str('state') + deep_kwargs + pickle.SETITEM)
  deep_module = op_call(op_global('torch_utils.persistence', '_reconstruct_persistent_obj', 2), meta)
  colliding = pickle.EMPTY_DICT + pickle.MARK + b''.join(  # ints that all hash alike
      pickle.LONG1 + bytes([9]) + (k * ((1 << 61) - 1)).to_bytes(9, 'little') + pickle.NONE for k in range(1, 500)
  ) + pickle.SETITEMS
  modules_set = (pickle.EMPTY_DICT + op_str('type') + op_str('class') + pickle.SETITEM + op_str('class_name')
                 + op_str('Net') + pickle.SETITEM + op_str('state') + pickle.EMPTY_DICT + op_str('_parameters')
                 + pickle.EMPTY_DICT + pickle.SETITEM + op_str('_modules') + pickle.EMPTY_SET + pickle.SETITEM
                 + pickle.SETITEM)
  # Shared sub-structures through the memo: 2^40 paths through kwargs, and through child modules.
  doubling = pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.POP + b''.join(
      pickle.MARK + (pickle.BINGET + bytes([i])) * 2 + pickle.LIST + pickle.MEMOIZE + pickle.POP for i in range(40))
  persistent = op_global('torch_utils.persistence', '_reconstruct_persistent_obj', 2)

  def module(children):
    state = (pickle.EMPTY_DICT + op_str('_parameters') + pickle.EMPTY_DICT + pickle.SETITEM + op_str('_modules')
             + pickle.EMPTY_DICT + children + pickle.SETITEM + op_str('_init_kwargs') + pickle.EMPTY_DICT
             + op_str('x') + pickle.BINGET + bytes([40]) + pickle.SETITEM + pickle.SETITEM)
    return op_call(persistent, pickle.EMPTY_DICT + op_str('type') + op_str('class') + pickle.SETITEM
                   + op_str('class_name') + op_str('Net') + pickle.SETITEM + op_str('state') + state + pickle.SETITEM)

  shared_modules = doubling + module(b'') + pickle.MEMOIZE + pickle.POP + b''.join(
      module(op_str('a') + pickle.BINGET + bytes([41 + i]) + pickle.SETITEM
             + op_str('b') + pickle.BINGET + bytes([41 + i]) + pickle.SETITEM) + pickle.MEMOIZE + pickle.POP
      for i in range(40)) + pickle.BINGET + bytes([81])
  files = {
      'shared_kwargs.pkl': op_pickle(pickle.EMPTY_DICT + op_str('ema') + doubling + module(b'') + pickle.SETITEM, 4),
      'shared_kwargs_and_modules.pkl': op_pickle(pickle.EMPTY_DICT + op_str('ema') + shared_modules
                                                 + pickle.SETITEM, 4),
      'deep_kwargs.pkl': op_pickle(pickle.EMPTY_DICT + op_str('ema') + deep_module + pickle.SETITEM, 2),
      'modules_as_a_set.pkl': op_pickle(pickle.EMPTY_DICT + op_str('ema') + op_call(
          op_global('torch_utils.persistence', '_reconstruct_persistent_obj', 2), modules_set) + pickle.SETITEM, 4),
      'deep_stack_marks.pkl': op_pickle(pickle.MARK * 100_000 + pickle.NONE + op_global('os', 'system', 2), 2),
      'wrong_arity.pkl': op_pickle(op_call(op_global('torch._utils', '_rebuild_tensor_v2', 2), pickle.NONE), 2),
      'unhashable_key.pkl': op_pickle(pickle.EMPTY_DICT + pickle.EMPTY_LIST + pickle.NONE + pickle.SETITEM, 2),
      'set_of_lists.pkl': op_pickle(op_call(op_global('__builtin__', 'set', 2),
                                            pickle.MARK + pickle.EMPTY_LIST + pickle.LIST), 2),
      'colliding_keys.pkl': op_pickle(colliding, 2),
      'build_on_function.pkl': op_pickle(op_global('torch._utils', '_rebuild_tensor_v2', 2) + pickle.EMPTY_DICT
                                         + pickle.BUILD, 2),
      'setitem_on_tensor_fn.pkl': op_pickle(op_global('torch', 'Size', 2) + pickle.NONE + pickle.NONE
                                            + pickle.SETITEM, 2),
      'huge_memo_get.pkl': op_pickle(pickle.NONE + pickle.POP + pickle.LONG_BINGET + b'\xff\xff\xff\xff', 2),
      'huge_binbytes8.pkl': op_pickle(b'\x8e' + struct.pack('<Q', 1 << 62), 4),
      'huge_long4.pkl': op_pickle(pickle.LONG4 + struct.pack('<i', 1 << 30), 2),
      'huge_text_long.pkl': b'L' + b'9' * 10_000 + b'L\n.',
      'ext_code.pkl': op_pickle(pickle.EXT4 + struct.pack('<i', 1 << 30), 2),
      'inst.pkl': pickle.MARK + b'ios\nsystem\n' + pickle.STOP,
      'stack_global_bytes.pkl': op_pickle(_bytes(b'os') + _bytes(b'system') + pickle.STACK_GLOBAL, 4),
      'persistent_id_plain.pkl': op_pickle(pickle.NONE + pickle.BINPERSID, 2),
      'reduce_on_list.pkl': op_pickle(pickle.EMPTY_LIST + pickle.EMPTY_TUPLE + pickle.REDUCE, 2),
      'not_a_pickle.pkl': b'\x00' * 64,
  }
  messages = read_in_child(tmp_path, files)
  assert 'nested deeper than 100' in messages['deep_kwargs.pkl']
  assert 'more than 20000 module visits' in messages['shared_kwargs_and_modules.pkl']
  assert 'more than 10000 values in one record' in messages['shared_kwargs.pkl']
  assert 'Net: _modules is a set' in messages['modules_as_a_set.pkl']  # found by tools/fuzz_readers.py
  assert 'called with 1 arguments' in messages['wrong_arity.pkl']
  for name in ('unhashable_key.pkl', 'set_of_lists.pkl', 'colliding_keys.pkl'):
    assert 'only strings, bytes and small integers' in messages[name], name
  assert 'truncated' in messages['huge_binbytes8.pkl'] and 'truncated' in messages['huge_long4.pkl']
  assert 'integer of 10000 digits' in messages['huge_text_long.pkl']
  assert 'opcode EXT4' in messages['ext_code.pkl'] and 'opcode INST' in messages['inst.pkl']
  assert 'not two strings' in messages['stack_global_bytes.pkl']
  # In this process too: the type is exactly the one documented, and it is a ValueError.
  with pytest.raises(UnsafePickleError) as refused:
    snapshot.read_snapshot(tmp_path / 'deep_kwargs.pkl')['ema'].init_kwargs  # pylint: disable=expression-not-assigned
  assert isinstance(refused.value, ValueError)
