"""Tests for sida_jax.formats.torch_files: torch's byte layouts (plain pickles, zip and legacy torch.save)."""
import collections
import pickle
import struct

import ml_dtypes
import numpy as np
import pytest

from sida_jax.formats import snapshot, torch_files
from torch_pickles import (LEGACY_MAGIC, PAYLOADS, BoundMethod, EasyDict, ModuleDict, Persistent, Storage,
                           Tensor, legacy_torch_save, op_call, op_global, op_pickle, op_str, plain_pickle,
                           zip_torch_save)


def _tensor_cases(seed=0):
  """Per dtype: numpy originals and the tensors that view them, some sharing one storage."""
  rng = np.random.default_rng(seed)
  originals, tensors = {}, {}
  for dtype in (np.float32, np.float16, ml_dtypes.bfloat16, np.int64):
    name = np.dtype(dtype).name
    storage = Storage((rng.normal(size=40) * 100).astype(dtype), key=str(140000000 + len(originals)))
    views = {
        'offset': storage.array[5:17].reshape(3, 4),               # non-zero storage offset
        'transposed': storage.array[2:14].reshape(3, 4).T,         # strided, same storage
        'sliced': storage.array[1:31].reshape(5, 6)[1:4, ::2],     # offset + two non-unit strides
        'scalar': storage.array[7:8].reshape(()),                  # 0-dim
    }
    for view_name, view in views.items():
      originals[f'{name}/{view_name}'] = view.copy()
      tensors[f'{name}/{view_name}'] = Tensor.view_of(storage, view, parameter=view_name == 'offset')
  return originals, tensors


def _assert_decoded(decoded, originals):
  assert sorted(decoded) == sorted(originals)
  for name, original in originals.items():
    assert decoded[name].dtype == original.dtype, name
    assert decoded[name].shape == original.shape, name
    np.testing.assert_array_equal(decoded[name], original, err_msg=name)


def _module_tree():
  """A snapshot-like network: parameters, buffers (one non-persistent), a ModuleDict, a bound-method hook."""
  rng = np.random.default_rng(1)

  def tensor(*shape):
    storage = Storage(rng.normal(size=shape).astype(np.float32).ravel(), key=str(rng.integers(1 << 40)))
    return Tensor.view_of(storage, storage.array.reshape(shape), parameter=True), storage.array.reshape(shape)

  def module_state(parameters=(), buffers=(), modules=(), non_persistent=()):
    return {'training': False, '_parameters': collections.OrderedDict(parameters),
            '_buffers': collections.OrderedDict(buffers), '_non_persistent_buffers_set': set(non_persistent),
            '_modules': collections.OrderedDict(modules), '_forward_pre_hooks': collections.OrderedDict()}

  conv_weight, conv_ref = tensor(4, 3, 3, 3)
  conv = Persistent('MPConv', module_state([('weight', conv_weight)]))
  # SiD's EDM2 generator registers a bound method of the module itself as a forward pre-hook (§1.9).
  conv.state['_forward_pre_hooks'][7] = BoundMethod(conv, '_apply_forced_weight_normalization')
  conv.state.update(_init_args=(), _init_kwargs={'in_channels': 3, 'kernel': [3, 3]})
  weight, weight_ref = tensor(8)
  freqs, freqs_ref = tensor(16)
  resample, _ = tensor(2, 2)
  root = Persistent('Net', module_state(
      [('weight', weight), ('bias', None)], [('freqs', freqs), ('resample', resample), ('unset', None)],
      [('enc', ModuleDict(module_state(modules=[('conv', conv)]))), ('skip', None)],
      non_persistent=['resample']))
  root.state.update(_init_args=(), _init_kwargs=EasyDict(
      channels=np.int64(3), scale=np.float64(0.5) ** 0.5, mult=[1, 2], flag=np.bool_(True),
      encoder=EasyDict(name='vae', raw_mean=(np.float32(5.5), -2.25))))
  # Plain numpy arrays in the state, as in EDM2's StabilityVAEEncoder (scale, bias).
  root.state['bias'] = np.array([[0.5, -1.25], [3.0, 4.5]], np.float32).T
  expected = {'weight': weight_ref, 'freqs': freqs_ref, 'enc.conv.weight': conv_ref}
  return root, expected


@pytest.mark.parametrize('protocol', [2, 4])
def test_snapshot_tensors(tmp_path, protocol):
  originals, tensors = _tensor_cases()
  root, expected_state = _module_tree()
  path = tmp_path / 'network-snapshot.pkl'
  path.write_bytes(plain_pickle({'tensors': tensors, 'ema': root, 'loss_fn': None}, protocol))
  top = snapshot.read_snapshot(path)
  _assert_decoded(top['tensors'], originals)

  net = top['ema']
  state = net.state_dict()
  assert list(state) == list(expected_state)  # PyTorch's order: parameters, buffers, then children
  for name, ref in expected_state.items():
    np.testing.assert_array_equal(state[name], ref, err_msg=name)
  assert net.class_name == 'Net' and net.version == 6
  assert net.init_kwargs == {'channels': 3, 'scale': 0.5 ** 0.5, 'mult': [1, 2], 'flag': True,
                             'encoder': {'name': 'vae', 'raw_mean': (5.5, -2.25)}}
  assert [type(v) for v in net.init_kwargs.values()] == [int, float, list, bool, dict]
  assert isinstance(net.state['_init_kwargs'], torch_files.EasyDict)
  assert net.state['_init_kwargs'].encoder['name'] == 'vae'
  np.testing.assert_array_equal(net.state['bias'], np.array([[0.5, 3.0], [-1.25, 4.5]], np.float32))
  assert net.state['bias'].dtype == np.float32
  names = [(name, module.class_name) for name, module in net.named_modules()]
  assert names == [('', 'Net'), ('enc', 'torch.nn.modules.container.ModuleDict'), ('enc.conv', 'MPConv')]
  conv = dict(net.named_modules())['enc.conv']
  hook = conv.state['_forward_pre_hooks'][7]
  assert isinstance(hook, torch_files.BoundMethodRef)
  assert hook.owner is conv and hook.name == '_apply_forced_weight_normalization'
  assert conv.init_kwargs == {'in_channels': 3, 'kernel': [3, 3]}


def test_zip_torch_file(tmp_path):
  originals, tensors = _tensor_cases(seed=2)
  # uint16 has no typed storage class: torch writes an UntypedStorage and _rebuild_tensor_v3.
  untyped = Storage(np.arange(30, dtype=np.uint16) * 2001, key='', untyped=True)
  originals['uint16/transposed'] = untyped.array[3:23].reshape(4, 5).T.copy()
  tensors['uint16/transposed'] = Tensor.view_of(untyped, untyped.array[3:23].reshape(4, 5).T)
  root, expected_state = _module_tree()
  path = tmp_path / 'training-state-000100.pt'
  zip_torch_save({'tensors': tensors, 'net': root, 'step': 100}, path)
  top = torch_files.read_torch_file(path)
  _assert_decoded(top['tensors'], originals)
  assert top['step'] == 100
  for name, ref in expected_state.items():
    np.testing.assert_array_equal(top['net'].state_dict()[name], ref, err_msg=name)
  # One storage behind 'offset' and 'scalar': decoded once, so the two contiguous views alias.
  assert np.shares_memory(top['tensors']['float32/offset'], top['tensors']['float32/scalar'])


def test_legacy_torch_file(tmp_path):
  originals, tensors = _tensor_cases(seed=3)
  root, expected_state = _module_tree()
  path = tmp_path / 'pt_inception.pth'
  path.write_bytes(legacy_torch_save({'tensors': tensors, 'net': root}))
  top = torch_files.read_torch_file(path)
  _assert_decoded(top['tensors'], originals)
  assert np.shares_memory(top['tensors']['int64/offset'], top['tensors']['int64/scalar'])
  state = top['net'].state_dict()
  for name, ref in expected_state.items():
    np.testing.assert_array_equal(state[name], ref, err_msg=name)


def test_tensor_past_its_storage_is_refused(tmp_path):
  storage = Storage(np.arange(10, dtype=np.float32), key='1')
  path = tmp_path / 'bad.pkl'
  path.write_bytes(plain_pickle(Tensor(storage, 4, (3, 3), (1, 2)), 4))  # last element: 4 + 2 + 4 = 10
  with pytest.raises(ValueError, match=r'bad\.pkl.*reaches past its storage of 10 elements'):
    snapshot.read_snapshot(path)


@pytest.mark.parametrize('protocol', [2, 4])
def test_payload_inside_storage_blob_is_refused(tmp_path, protocol):
  marker = tmp_path / 'pwned'
  header = b''.join(pickle.dumps(h, protocol=2) for h in (LEGACY_MAGIC, 1001, {'little_endian': True}))
  inner = op_pickle(PAYLOADS['os.system'](marker, 2), 2)
  blob = header + inner + pickle.dumps([], protocol=2)
  outer = op_call(op_global('torch.storage', '_load_from_bytes', protocol),
                   pickle.BINBYTES + struct.pack('<I', len(blob)) + blob if protocol >= 3
                   else op_call(op_global('_codecs', 'encode', protocol),
                                 op_str(blob.decode('latin1')), op_str('latin1')))
  path = tmp_path / 'model.pkl'
  path.write_bytes(op_pickle(outer, protocol))
  with pytest.raises(torch_files.UnsafePickleError, match=r"'os\.system' from .*model\.pkl \(storage blob\)"):
    snapshot.read_snapshot(path)
  assert not marker.exists()


def test_reconstructor_only_for_module_stubs(tmp_path):
  def reconstruct(module, name):
    return op_call(op_global('copy_reg', '_reconstructor', 1), op_global(module, name, 1),
                    op_global('__builtin__', 'object', 1), pickle.NONE)

  state = pickle.EMPTY_DICT + op_str('_parameters') + pickle.EMPTY_DICT + pickle.SETITEM
  path = tmp_path / 'old.pkl'
  path.write_bytes(reconstruct('torch.nn.modules.container', 'ModuleList') + state + pickle.BUILD
                   + pickle.STOP)
  module = snapshot.read_snapshot(path)
  assert isinstance(module, torch_files.TorchModule) and module.state == {'_parameters': {}}
  assert module.class_name == 'torch.nn.modules.container.ModuleList'
  path.write_bytes(reconstruct('collections', 'OrderedDict') + pickle.STOP)
  with pytest.raises(torch_files.UnsafePickleError, match='copyreg._reconstructor'):
    snapshot.read_snapshot(path)
