"""Tests for sida_jax.formats.torch_files: torch's byte layouts (plain pickles, zip and legacy torch.save)."""
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from sida_jax.formats import snapshot, torch_files
from test_pickle import _bytes, _dtype, _int, _reconstructed_array, _tuple, fuzz_readers, read_in_child
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


# ----------------------------------------------------------------------------------------------------
# Crafted files: tiny files asking for huge arrays, exponential blobs, zip bombs (see test_pickle.py
# for `read_in_child`: a child process with a 1 GB address-space limit, < 1 s and < 100 MB a case).

def _rebuild_v2(pid, offset, size, stride):
  return op_call(op_global('torch._utils', '_rebuild_tensor_v2', 2), pid, _int(offset), _tuple(*map(_int, size)),
                 _tuple(*map(_int, stride)), pickle.NEWFALSE, op_call(op_global('collections', 'OrderedDict', 2)))


def _storage_pid(key, numel, storage='FloatStorage', legacy=False):
  return (pickle.MARK + op_str('storage') + op_global('torch', storage, 2) + op_str(key) + op_str('cpu')
          + _int(numel) + (pickle.NONE if legacy else b'') + pickle.TUPLE + pickle.BINPERSID)


def _zip(data_pkl, records, compression=zipfile.ZIP_STORED):
  out = io.BytesIO()
  with zipfile.ZipFile(out, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr('archive/data.pkl', data_pkl)
    archive.writestr('archive/byteorder', 'little')
    for name, data in records.items():
      archive.writestr(f'archive/data/{name}', data, compress_type=compression)
  return out.getvalue()


def _legacy(main_pickle, keys, data):
  header = b''.join(pickle.dumps(h, protocol=2) for h in (LEGACY_MAGIC, 1001, {'little_endian': True}))
  return header + main_pickle + pickle.dumps(keys, protocol=2) + data


def test_tiny_files_cannot_ask_for_huge_arrays(tmp_path):
  one_float = Storage(np.zeros(1, np.float32), key='0')
  many_floats = Storage(np.zeros(4096, np.float32), key='0')
  blob = Storage(np.arange(128 * 128, dtype=np.float32), key='7')
  transposed = [Tensor(blob, 0, (128, 128), (1, 128)) for _ in range(4000)]  # 4000 strided 64 KB copies
  files = {}
  for gib, size in ((2, (32768, 16384)), (16, (65536, 65536)), (64, (131072, 131072))):
    zip_torch_save({'w': Tensor(one_float, 0, size, (0, 0))}, tmp_path / 'x.pt')
    files[f'broadcast_{gib}gib.pt'] = (tmp_path / 'x.pt').read_bytes()
  zip_torch_save({'w': Tensor(many_floats, 0, (2000, 2000), (1, 1))}, tmp_path / 'x.pt')
  files['overlapping.pt'] = (tmp_path / 'x.pt').read_bytes()
  files['negative_stride.pt'] = _zip(op_pickle(_rebuild_v2(_storage_pid('0', 4), 3, (4,), (-1,)), 2),
                                     {'0': bytes(16)})
  files['overflowing_sizes.pt'] = _zip(op_pickle(_rebuild_v2(_storage_pid('0', 4), 0, (1 << 40, 1 << 40), (1, 1)), 2),
                                       {'0': bytes(16)})
  files['array_16gib.pkl'] = op_pickle(_reconstructed_array([1 << 31], _dtype('f8'), bytes(8)), 2)
  files['uninitialised_parameter.pkl'] = op_pickle(op_call(
      op_global('torch._utils', '_rebuild_parameter', 2),
      op_call(op_global('numpy.core.multiarray', '_reconstruct', 2), op_global('numpy', 'ndarray', 2),
              _tuple(_int(1 << 28)), _bytes(b'f4')), pickle.NEWFALSE, pickle.EMPTY_DICT), 2)
  files['legacy_1gib_storage.pth'] = _legacy(op_pickle(_rebuild_v2(_storage_pid('k', 1 << 28, legacy=True), 0,
                                                                   (1 << 28,), (1,)), 2),
                                             ['k'], struct.pack('<q', 1 << 28) + bytes(16))
  files['strided_views_256mb.pkl'] = plain_pickle(transposed, 4)
  messages = read_in_child(tmp_path, files)
  for name in ('broadcast_2gib.pt', 'broadcast_16gib.pt', 'broadcast_64gib.pt', 'negative_stride.pt'):
    assert 'zero or negative stride' in messages[name], name
  assert 'overlaps itself' in messages['overlapping.pt']
  assert 'reaches past its storage of 4 elements' in messages['overflowing_sizes.pt']
  assert 'needs 17179869184 bytes, the file gives 8' in messages['array_16gib.pkl']
  assert 'a parameter wraps a PendingArray' in messages['uninitialised_parameter.pkl']
  assert 'truncated: storage' in messages['legacy_1gib_storage.pth']
  assert 'memory limit' in messages['strided_views_256mb.pkl'] and 'max_bytes' in messages['strided_views_256mb.pkl']
  assert len(files['strided_views_256mb.pkl']) < 300_000
  # With an explicit budget the same strided views are read, each a correct copy.
  top = torch_files.read_pickle(tmp_path / 'strided_views_256mb.pkl', max_bytes=400 << 20)
  assert len(top) == 4000 and not np.shares_memory(top[0], top[1])
  np.testing.assert_array_equal(top[-1], blob.array.reshape(128, 128).T)


def _blob(storage_pickle_body, keys, data):
  """A legacy torch.save stream whose main pickle is `storage_pickle_body`, as _load_from_bytes reads it."""
  return _legacy(op_pickle(storage_pickle_body, 2), keys, data)


def test_storage_blobs_cost_linear_time(tmp_path):
  load = op_global('torch.storage', '_load_from_bytes', 2)
  leaf = _blob(_storage_pid('k', 2, legacy=True), ['k'], struct.pack('<q', 2) + np.float32([1.5, -2]).tobytes())
  # Each level calls _load_from_bytes four times on one memoised inner blob: 4^depth blob reads (8^depth
  # for a reader that parses legacy streams twice), unless blobs are decoded once and never nested.
  nested = leaf
  for _ in range(12):
    decode = op_call(load, pickle.BINGET + b'\x00')
    nested = _blob(_bytes(nested) + pickle.MEMOIZE + pickle.POP + decode + (decode + pickle.POP) * 3, [], b'')
  messages = read_in_child(tmp_path, {'nested_blobs.pkl': op_pickle(op_call(load, _bytes(nested)), 2)})
  assert 'a storage blob inside a storage blob' in messages['nested_blobs.pkl']
  # One blob used 5,000 times through the memo: decoded once, so read at once and into one array.
  tensor = _rebuild_v2(op_call(load, pickle.BINGET + b'\x00'), 0, (2,), (1,))
  shared = op_pickle(_bytes(leaf) + pickle.MEMOIZE + pickle.POP + pickle.EMPTY_LIST + pickle.MARK
                     + tensor * 5_000 + pickle.APPENDS, 2)
  read_in_child(tmp_path, {'shared_blob.pkl': shared}, outcome='ok')
  tensors = torch_files.read_pickle(tmp_path / 'shared_blob.pkl')
  assert len(tensors) == 5_000 and all(np.shares_memory(tensors[0], t) for t in tensors)
  np.testing.assert_array_equal(tensors[-1], [1.5, -2.0])


def _patch_sizes(data, name, size):
  """`data` (a zip) with both sizes of record `name` set to `size`, in its directory and local header."""
  out = bytearray(data)
  for signature, sizes_at, name_length_at, name_at in ((b'PK\x01\x02', 20, 28, 46), (b'PK\x03\x04', 18, 26, 30)):
    at = out.find(signature)
    while at >= 0:
      length = struct.unpack_from('<H', out, at + name_length_at)[0]
      if out[at + name_at:at + name_at + length] == name.encode():
        struct.pack_into('<II', out, at + sizes_at, size, size)
      at = out.find(signature, at + 1)
  return bytes(out)


def test_zip_bombs_are_refused(tmp_path):
  numel = 32 << 20  # 128 MiB of float32 zeros, deflated to about 128 KB
  bomb = io.BytesIO()
  with zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED) as archive:
    archive.writestr('archive/data.pkl', op_pickle(_rebuild_v2(_storage_pid('0', numel), 0, (numel,), (1,)), 2))
    with archive.open('archive/data/0', 'w', force_zip64=True) as record:
      for _ in range(numel * 4 >> 20):
        record.write(bytes(1 << 20))
  files = {'deflate_bomb.pt': bomb.getvalue()}
  lying = _zip(op_pickle(_rebuild_v2(_storage_pid('0', 1 << 28), 0, (1 << 28,), (1,)), 2), {'0': bytes(4)})
  files['lying_sizes.pt'] = _patch_sizes(lying, 'archive/data/0', 1 << 30)
  small = _zip(op_pickle(_rebuild_v2(_storage_pid('0', 1), 0, (1,), (1,)), 2), {'0': bytes(4)})
  end = small.rfind(b'PK\x05\x06')  # end of central directory: its size field is at +12
  files['huge_central_directory.pt'] = small[:end + 12] + struct.pack('<I', 0xfffffff0) + small[end + 16:]
  # A central directory of 64 MiB (about a million entries; zipfile would keep ~600 MB of records).
  entry = (b'PK\x01\x02' + struct.pack('<HHHHHHIIIHHHHHII', 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
           + b'x')
  directory = entry * ((64 << 20) // len(entry))
  local = b'PK\x03\x04' + bytes(26)
  files['million_entries.pt'] = (local + directory + b'PK\x05\x06'
                                 + struct.pack('<HHHHIIH', 0, 0, 0xffff, 0xffff, len(directory), len(local), 0))
  files['path_in_key.pt'] = _zip(op_pickle(_rebuild_v2(_storage_pid('../../../etc/passwd', 1), 0, (1,), (1,)), 2),
                                 {'0': bytes(4)})
  messages = read_in_child(tmp_path, files, reader='torch')
  assert len(files['deflate_bomb.pt']) < 1 << 20
  assert 'more than 100:1' in messages['deflate_bomb.pt']
  assert 'memory limit' in messages['lying_sizes.pt']
  assert 'huge_central_directory.pt' in messages['huge_central_directory.pt']
  assert 'record archive/data/../../../etc/passwd is missing' in messages['path_in_key.pt']
  assert f'central directory of {len(directory)} bytes' in messages['million_entries.pt']


# ----------------------------------------------------------------------------------------------------
# Fuzzing: mutants of every fixture pickle ($SIDA_FIXTURES), of the real torch.save files in
# tests/data/official_states and of synthetic plain/zip/legacy files, read in limited children
# (1 GB address space, 10 s a case). tools/fuzz_readers.py runs thousands; the suite a few hundred.

def test_fuzzed_files_are_read_or_refused(tmp_path):
  sources = fuzz_readers.default_sources()  # without the fixtures, the other sources only
  assert {'zip-synthetic', 'legacy-synthetic', 'plain-p2', 'plain-p4', 'plain-stats-p5'} <= set(sources)
  results = fuzz_readers.fuzz(sources, count=400, seed=12345, folder=tmp_path)
  assert len(results) == 400
  assert fuzz_readers.failures(results) == []
  outcomes = collections.Counter(r['outcome'] for r in results)
  assert outcomes['ok'] > 10 and outcomes['refused'] > 200, outcomes  # the mutants reach both ends
  assert max(r['seconds'] for r in results) < 10


# ----------------------------------------------------------------------------------------------------
# Files written by torch itself (skipped without torch).


def test_files_written_by_torch(tmp_path):
  torch = pytest.importorskip('torch', reason='torch not installed: files written by torch itself not checked')
  gen = torch.Generator().manual_seed(0)
  shared = torch.randn(40, generator=gen)
  net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
  tensors = {
      'transposed': torch.randn(5, 6, generator=gen).t(),
      'sliced': shared[3:33].view(5, 6)[1:4, ::2],
      'shared_a': shared[:10], 'shared_b': shared[5:15].view(2, 5),
      'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 4), 'size_one_dims': torch.randn(1, 3, 1, generator=gen),
      'bf16': torch.randn(3, 4, generator=gen).to(torch.bfloat16), 'fp16': torch.randn(7, generator=gen).half(),
      'bool': torch.tensor([True, False, True]), 'int64': torch.arange(-3, 9), 'uint8': torch.arange(250, 256).byte(),
      'complex': torch.randn(3, generator=gen, dtype=torch.complex64), 'uint16': torch.arange(5).to(torch.uint16),
      'parameter': torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
  }
  obj = {'tensors': tensors, 'state_dict': net.state_dict(), 'step': 7}
  for name, kwargs in (('zip.pt', {}), ('legacy.pth', {'_use_new_zipfile_serialization': False}),
                       ('zip_p4.pt', {'pickle_protocol': 4})):
    torch.save(obj, tmp_path / name, **kwargs)
    read = torch_files.read_torch_file(tmp_path / name)
    assert read['step'] == 7
    for key, tensor in {**tensors, **{f'sd/{k}': v for k, v in net.state_dict().items()}}.items():
      got = read['tensors'][key] if not key.startswith('sd/') else read['state_dict'][key[3:]]
      want = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
      assert got.shape == want.shape and got.dtype.name == (
          'bfloat16' if tensor.dtype == torch.bfloat16 else want.dtype.name), (name, key)
      np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=f'{name} {key}')
    assert np.shares_memory(read['tensors']['shared_a'], read['tensors']['shared_b']), name
  # torch.save keeps broadcast views (stride 0) as they are; those are refused, naming the reason.
  torch.save({'expanded': torch.ones(1).expand(5)}, tmp_path / 'expanded.pt')
  with pytest.raises(torch_files.UnsafePickleError, match=r'expanded\.pt.*zero or negative stride'):
    torch_files.read_torch_file(tmp_path / 'expanded.pt')
