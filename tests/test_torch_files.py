"""Tests for sida_jax.formats.torch_files: official fixture pickles, torch's byte layouts, refused payloads."""
import collections
import dataclasses
import io
import json
import pickle
import shlex
import struct
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conftest import fixture_files
from sida_jax.formats import torch_files as snapshot

# ----------------------------------------------------------------------------------------------------
# Official snapshot pickles (written by the official PyTorch code).


def _state_npz(pkl):
  """The state_dict fixture of a pickle: `<stem>_state.npz`, or EDM2's `<stem>_state_before.npz`."""
  for suffix in ('_state.npz', '_state_before.npz'):
    path = pkl.with_name(pkl.stem + suffix)
    if path.exists():
      return path
  raise AssertionError(f'no state_dict fixture next to {pkl}')


@pytest.mark.fixtures
@pytest.mark.parametrize('pkl', fixture_files('edm', '*.pkl') + fixture_files('edm2', '*.pkl'))
def test_official_snapshot(pkl):
  top = snapshot.read_snapshot(pkl)
  report = json.loads((pkl.parent / 'pickle_report.json').read_text())[pkl.stem]
  top_type = {'builtins.dict': dict, 'dnnlib.util.EasyDict': snapshot.EasyDict}[report['top_level_type']]
  assert type(top) is top_type
  assert list(top) == report['top_level_keys']
  assert set(report['globals']) <= snapshot.ALLOWED_GLOBALS

  net = top['ema']
  kwargs = json.loads(pkl.with_name(pkl.stem + '_kwargs.json').read_text())
  assert net.class_name == kwargs['class_name'].rsplit('.', 1)[-1]
  assert json.loads(json.dumps(net.init_kwargs)) == kwargs['init_kwargs']
  assert list(net.init_args) == kwargs['init_args']
  assert sorted(net.state) == report['root_state_keys']

  persistent = [m for _, m in net.named_modules() if isinstance(m, snapshot.PersistentObject)]
  assert len(persistent) == report['num_persistent_objects']
  assert sorted({m.class_name for m in persistent}) == report['persistent_class_names']
  num_parameters = sum(value.size for _, m in net.named_modules()
                       for value in m.state['_parameters'].values() if value is not None)
  assert num_parameters == report['num_parameters']

  state = net.state_dict()
  with np.load(_state_npz(pkl)) as ref:
    assert sorted(state) == sorted(ref.files)
    for name in ref.files:
      # EDM2 snapshots hold float16 weights that are exact on the float16 grid.
      assert state[name].dtype in (ref[name].dtype, np.float16), name
      assert state[name].shape == ref[name].shape, name
      np.testing.assert_array_equal(state[name].astype(ref[name].dtype), ref[name], err_msg=name)


# ----------------------------------------------------------------------------------------------------
# A writer that emits what torch emits, without torch: pickle's pure-Python Pickler plus the reductions
# of torch/_tensor.py (Tensor, Parameter), torch/storage.py (TypedStorage → _load_from_bytes of a
# legacy torch.save stream) and torch/serialization.py (persistent ids of the legacy and zip formats).

_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
                  np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage', np.dtype(np.int64): 'LongStorage'}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@dataclasses.dataclass(frozen=True)
class Global:
  """A global written by name: the module need not be importable where the pickle is written."""
  module: str
  name: str

  def __call__(self, *args):  # pickle wants reduce functions to be callable; this one is only written
    raise TypeError(f'{self.module}.{self.name} is a name, not a function')


@dataclasses.dataclass(eq=False)
class Storage:
  array: np.ndarray  # 1-D, the storage's elements
  key: str           # legacy format: a memory address, as torch writes str(storage._cdata)
  untyped: bool = False  # dtypes without a typed storage class (uint16, ...) go through UntypedStorage


@dataclasses.dataclass(eq=False)
class Tensor:
  storage: Storage
  offset: int
  size: tuple
  stride: tuple
  parameter: bool = False

  @classmethod
  def view_of(cls, storage, view, parameter=False):
    """The tensor describing the numpy `view` of `storage.array`: offset and strides in elements."""
    itemsize = storage.array.itemsize
    offset = (view.__array_interface__['data'][0] - storage.array.__array_interface__['data'][0]) // itemsize
    return cls(storage, offset, view.shape, tuple(s // itemsize for s in view.strides), parameter)


@dataclasses.dataclass(eq=False)
class Persistent:
  """An object of an NVIDIA persistent class."""
  class_name: str
  state: dict


@dataclasses.dataclass(eq=False)
class ModuleDict:
  state: dict


class EasyDict(dict):
  """Written as dnnlib.util.EasyDict."""


@dataclasses.dataclass(eq=False)
class BoundMethod:
  owner: object
  name: str


_MODULE_DICT = Global('torch.nn.modules.container', 'ModuleDict')


class TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """`storage_ids`: None (plain pickle: storages become _load_from_bytes blobs), 'legacy' or 'zip'."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, protocol, storage_ids=None):
    super().__init__(file, protocol)
    self.storage_ids = storage_ids
    self.storages = {}  # key → Storage, for the writer of the data records
    self.classes_with_source = set()

  def save_named_global(self, obj):
    if self.proto >= 4:
      self.save(obj.module)
      self.save(obj.name)
      self.write(pickle.STACK_GLOBAL)
    else:
      self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  dispatch[Global] = save_named_global

  def save_module_dict(self, obj):
    # What pickle writes for a torch.nn.ModuleDict: NEWOBJ of its class, then BUILD with its __dict__.
    self.save(_MODULE_DICT)
    self.save(())
    self.write(pickle.NEWOBJ)
    self.memoize(obj)
    self.save(obj.state)
    self.write(pickle.BUILD)

  dispatch[ModuleDict] = save_module_dict

  def save_easy_dict(self, obj):
    # What pickle writes for a dict subclass: NEWOBJ of its class, then the items.
    self.save(Global('dnnlib.util', 'EasyDict'))
    self.save(())
    self.write(pickle.NEWOBJ)
    self.memoize(obj)
    self._batch_setitems(iter(obj.items()))

  dispatch[EasyDict] = save_easy_dict

  def persistent_id(self, obj):
    if (self.storage_ids == 'legacy' and isinstance(obj, Global) and obj == _MODULE_DICT
        and obj not in self.classes_with_source):
      # torch attaches the class source once; inside that id the class is an ordinary global
      self.classes_with_source.add(obj)
      return ('module', obj, 'torch/nn/modules/container.py', '<source>')
    if not isinstance(obj, Storage) or self.storage_ids is None:
      return None
    if obj.untyped:  # counted in bytes
      storage_type, numel = Global('torch.storage', 'UntypedStorage'), obj.array.nbytes
    else:
      storage_type, numel = Global('torch', _STORAGE_NAMES[obj.array.dtype]), obj.array.size
    if self.storage_ids == 'legacy':
      self.storages[obj.key] = obj
      return ('storage', storage_type, obj.key, 'cpu', numel, None)
    key = next((k for k, s in self.storages.items() if s is obj), str(len(self.storages)))
    self.storages[key] = obj
    return ('storage', storage_type, key, 'cuda:0', numel)

  def reducer_override(self, obj):
    if isinstance(obj, Storage):
      return Global('torch.storage', '_load_from_bytes'), (legacy_torch_save(obj),)
    if isinstance(obj, Tensor) and obj.storage.untyped:
      return (Global('torch._utils', '_rebuild_tensor_v3'),
              (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride), False,
               collections.OrderedDict(), Global('torch', obj.storage.array.dtype.name)))
    if isinstance(obj, Tensor):
      data = (Global('torch._utils', '_rebuild_tensor_v2'),
              (obj.storage, obj.offset, tuple(obj.size), tuple(obj.stride), False,
               collections.OrderedDict()))
      if obj.parameter:
        return (Global('torch._utils', '_rebuild_parameter'),
                (_Reduced(data), False, collections.OrderedDict()))
      return data
    if isinstance(obj, _Reduced):
      return obj.reduction
    if isinstance(obj, Persistent):
      meta = dict(type='class', version=6, module_src='<source omitted>', class_name=obj.class_name,
                  state=obj.state)
      return Global('torch_utils.persistence', '_reconstruct_persistent_obj'), (meta,)
    if isinstance(obj, BoundMethod):
      return Global('builtins', 'getattr'), (obj.owner, obj.name)
    return NotImplemented


@dataclasses.dataclass(eq=False)
class _Reduced:
  reduction: tuple


def plain_pickle(obj, protocol):
  out = io.BytesIO()
  TorchPickler(out, protocol).dump(obj)
  return out.getvalue()


def legacy_torch_save(obj, protocol=2):
  """torch.save(obj, _use_new_zipfile_serialization=False): five pickles, then numel + bytes per storage."""
  out = io.BytesIO()
  sys_info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
  for header in (_LEGACY_MAGIC, 1001, sys_info):
    pickle.dump(header, out, protocol=protocol)
  pickler = TorchPickler(out, protocol, 'legacy')
  pickler.dump(obj)
  keys = sorted(pickler.storages)
  pickle.dump(keys, out, protocol=protocol)
  for key in keys:
    array = pickler.storages[key].array
    out.write(struct.pack('<q', array.size) + array.tobytes())
  return out.getvalue()


def zip_torch_save(obj, path, protocol=2):
  """torch.save(obj, path): <archive>/data.pkl, the storages as raw <archive>/data/<key> records."""
  out = io.BytesIO()
  pickler = TorchPickler(out, protocol, 'zip')
  pickler.dump(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr('archive/data.pkl', out.getvalue())
    archive.writestr('archive/.format_version', '1')
    archive.writestr('archive/.storage_alignment', '64')
    archive.writestr('archive/byteorder', 'little')
    for key, storage in pickler.storages.items():
      archive.writestr(f'archive/data/{key}', storage.array.tobytes())
    archive.writestr('archive/version', '3')


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
  assert isinstance(net.state['_init_kwargs'], snapshot.EasyDict)
  assert net.state['_init_kwargs'].encoder['name'] == 'vae'
  np.testing.assert_array_equal(net.state['bias'], np.array([[0.5, 3.0], [-1.25, 4.5]], np.float32))
  assert net.state['bias'].dtype == np.float32
  names = [(name, module.class_name) for name, module in net.named_modules()]
  assert names == [('', 'Net'), ('enc', 'torch.nn.modules.container.ModuleDict'), ('enc.conv', 'MPConv')]
  conv = dict(net.named_modules())['enc.conv']
  hook = conv.state['_forward_pre_hooks'][7]
  assert isinstance(hook, snapshot.BoundMethodRef)
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
  top = snapshot.read_torch_file(path)
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
  top = snapshot.read_torch_file(path)
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


# ----------------------------------------------------------------------------------------------------
# Refused payloads, written opcode by opcode. Each would create `marker` if it were executed.

def _op_global(module, name, protocol):
  if protocol >= 4:
    return _op_str(module) + _op_str(name) + pickle.STACK_GLOBAL
  return pickle.GLOBAL + f'{module}\n{name}\n'.encode()


def _op_str(text):
  data = text.encode()
  return pickle.BINUNICODE + struct.pack('<I', len(data)) + data


def _op_call(func, *args):
  return func + pickle.MARK + b''.join(args) + pickle.TUPLE + pickle.REDUCE


def _op_pickle(body, protocol):
  return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


def _builtin(name, protocol):
  # Python 3 writes Python 2 names at protocols < 3.
  return _op_global('builtins' if protocol >= 3 else '__builtin__', name, protocol)


def _getattr_chain(marker, protocol):
  """().__class__.__base__.__subclasses__()[i].__init__.__globals__.get('system')('touch marker')."""
  def attr(obj, name):
    return _op_call(_builtin('getattr', protocol), obj, _op_str(name))

  index = [cls.__name__ for cls in object.__subclasses__()].index('_wrap_close')  # os._wrap_close
  subclasses = _op_call(attr(attr(attr(pickle.EMPTY_TUPLE, '__class__'), '__base__'), '__subclasses__'))
  wrap_close = _op_call(attr(subclasses, '__getitem__'), pickle.BININT + struct.pack('<i', index))
  system = _op_call(attr(attr(attr(wrap_close, '__init__'), '__globals__'), 'get'), _op_str('system'))
  return _op_call(system, _op_str(f'touch {shlex.quote(str(marker))}'))


_PAYLOADS = {
    'os.system': lambda m, p: _op_call(_op_global('os', 'system', p),
                                       _op_str(f'touch {shlex.quote(str(m))}')),
    'builtins.eval': lambda m, p: _op_call(_builtin('eval', p), _op_str(f'open({str(m)!r}, "w").close()')),
    'subprocess.Popen': lambda m, p: _op_call(
        _op_global('subprocess', 'Popen', p),
        pickle.MARK + _op_str('touch') + _op_str(str(m)) + pickle.LIST),
    'builtins.getattr': _getattr_chain,
}


@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('refused', sorted(_PAYLOADS))
def test_dangerous_globals_are_refused(tmp_path, protocol, refused):
  marker = tmp_path / 'pwned'
  payload = _op_pickle(_PAYLOADS[refused](marker, protocol), protocol)
  path = tmp_path / 'model.pkl'
  path.write_bytes(payload)
  for read in (snapshot.read_snapshot, snapshot.read_torch_file):
    with pytest.raises(snapshot.UnsafePickleError, match=f"'{refused}.*model.pkl"):
      read(path)
  assert not marker.exists()
  # The same bytes are a live payload for an unrestricted unpickler (it creates the marker).
  result = pickle.loads(payload)
  if isinstance(result, subprocess.Popen):
    result.wait()
  assert marker.exists()


@pytest.mark.parametrize('protocol', [2, 4])
def test_payload_inside_storage_blob_is_refused(tmp_path, protocol):
  marker = tmp_path / 'pwned'
  header = b''.join(pickle.dumps(h, protocol=2) for h in (_LEGACY_MAGIC, 1001, {'little_endian': True}))
  inner = _op_pickle(_PAYLOADS['os.system'](marker, 2), 2)
  blob = header + inner + pickle.dumps([], protocol=2)
  outer = _op_call(_op_global('torch.storage', '_load_from_bytes', protocol),
                   pickle.BINBYTES + struct.pack('<I', len(blob)) + blob if protocol >= 3
                   else _op_call(_op_global('_codecs', 'encode', protocol),
                                 _op_str(blob.decode('latin1')), _op_str('latin1')))
  path = tmp_path / 'model.pkl'
  path.write_bytes(_op_pickle(outer, protocol))
  with pytest.raises(snapshot.UnsafePickleError, match=r"'os\.system' from .*model\.pkl \(storage blob\)"):
    snapshot.read_snapshot(path)
  assert not marker.exists()


def test_reconstructor_only_for_module_stubs(tmp_path):
  def reconstruct(module, name):
    return _op_call(_op_global('copy_reg', '_reconstructor', 1), _op_global(module, name, 1),
                    _op_global('__builtin__', 'object', 1), pickle.NONE)

  state = pickle.EMPTY_DICT + _op_str('_parameters') + pickle.EMPTY_DICT + pickle.SETITEM
  path = tmp_path / 'old.pkl'
  path.write_bytes(reconstruct('torch.nn.modules.container', 'ModuleList') + state + pickle.BUILD
                   + pickle.STOP)
  module = snapshot.read_snapshot(path)
  assert isinstance(module, snapshot.TorchModule) and module.state == {'_parameters': {}}
  assert module.class_name == 'torch.nn.modules.container.ModuleList'
  path.write_bytes(reconstruct('collections', 'OrderedDict') + pickle.STOP)
  with pytest.raises(snapshot.UnsafePickleError, match='copyreg._reconstructor'):
    snapshot.read_snapshot(path)


@pytest.mark.parametrize('target', ['torch.bfloat16', 'torch.FloatStorage', 'torch._utils._rebuild_tensor_v2',
                                    'dnnlib.util.EasyDict', 'torch.nn.modules.container.ModuleDict',
                                    'torch.storage._load_from_bytes'])
def test_build_cannot_patch_stand_ins(tmp_path, target):
  # BUILD with (None, slot state) is setattr on whatever is on the stack: here a shared stand-in.
  module, name = target.rsplit('.', 1)
  patch = pickle.EMPTY_DICT + _op_str('dtype') + pickle.NONE + pickle.SETITEM
  path = tmp_path / 'patch.pkl'
  path.write_bytes(_op_pickle(_op_global(module, name, 4) + pickle.NONE + patch + pickle.TUPLE2
                              + pickle.BUILD, 4))
  with pytest.raises(ValueError, match=r'patch\.pkl'):
    snapshot.read_snapshot(path)
  stand_in = snapshot._GLOBALS.get(target)  # pylint: disable=protected-access
  assert getattr(stand_in, 'dtype', 'unset') is not None


def test_missing_and_unreadable_files(tmp_path):
  missing = tmp_path / 'nowhere.pkl'
  for read in (snapshot.read_snapshot, snapshot.read_torch_file):
    with pytest.raises(FileNotFoundError, match='nowhere.pkl'):
      read(missing)
  text = tmp_path / 'notes.txt'
  text.write_text('not a pickle at all\n')
  with pytest.raises(ValueError, match=r'notes\.txt as a snapshot pickle'):
    snapshot.read_snapshot(text)
  with pytest.raises(ValueError, match=r'notes\.txt as a torch\.save file'):
    snapshot.read_torch_file(text)
  plain = tmp_path / 'plain.pkl'
  plain.write_bytes(pickle.dumps({'a': 1}))
  with pytest.raises(ValueError, match=r'plain\.pkl .*not a torch\.save file'):
    snapshot.read_torch_file(plain)
  truncated = tmp_path / 'truncated.pth'
  storage = Storage(np.arange(6, dtype=np.float32), key='9')
  truncated.write_bytes(legacy_torch_save({'w': Tensor.view_of(storage, storage.array)})[:-4])
  with pytest.raises(ValueError, match=r'truncated\.pth.*truncated'):
    snapshot.read_torch_file(truncated)
  assert snapshot.read_snapshot(io.BytesIO(pickle.dumps({'a': [1, 2.5]}))) == {'a': [1, 2.5]}
