"""Pickles written without torch for the reader tests: what torch.save and NVIDIA's persistence emit,
and hand-written opcode payloads that would run code if they were executed.
"""
import collections
import dataclasses
import io
import pickle
import shlex
import struct
import zipfile

import ml_dtypes
import numpy as np

# ----------------------------------------------------------------------------------------------------
# A writer that emits what torch emits, without torch: pickle's pure-Python Pickler plus the reductions
# of torch/_tensor.py (Tensor, Parameter), torch/storage.py (TypedStorage → _load_from_bytes of a
# legacy torch.save stream) and torch/serialization.py (persistent ids of the legacy and zip formats).

_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
                  np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage', np.dtype(np.int64): 'LongStorage'}
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


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
  for header in (LEGACY_MAGIC, 1001, sys_info):
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
  records = {'archive/data.pkl': out.getvalue(), 'archive/.format_version': '1',
             'archive/.storage_alignment': '64', 'archive/byteorder': 'little',
             **{f'archive/data/{key}': storage.array.tobytes() for key, storage in pickler.storages.items()},
             'archive/version': '3'}
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    for name, data in records.items():  # a fixed date: the same bytes on every run
      archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


# ----------------------------------------------------------------------------------------------------
# Refused payloads, written opcode by opcode. Each would create `marker` if it were executed.

def op_global(module, name, protocol):
  if protocol >= 4:
    return op_str(module) + op_str(name) + pickle.STACK_GLOBAL
  return pickle.GLOBAL + f'{module}\n{name}\n'.encode()


def op_str(text):
  data = text.encode()
  return pickle.BINUNICODE + struct.pack('<I', len(data)) + data


def op_call(func, *args):
  return func + pickle.MARK + b''.join(args) + pickle.TUPLE + pickle.REDUCE


def op_pickle(body, protocol):
  return pickle.PROTO + bytes([protocol]) + body + pickle.STOP


def builtin(name, protocol):
  # Python 3 writes Python 2 names at protocols < 3.
  return op_global('builtins' if protocol >= 3 else '__builtin__', name, protocol)


def getattr_chain(marker, protocol):
  """().__class__.__base__.__subclasses__()[i].__init__.__globals__.get('system')('touch marker')."""
  def attr(obj, name):
    return op_call(builtin('getattr', protocol), obj, op_str(name))

  index = [cls.__name__ for cls in object.__subclasses__()].index('_wrap_close')  # os._wrap_close
  subclasses = op_call(attr(attr(attr(pickle.EMPTY_TUPLE, '__class__'), '__base__'), '__subclasses__'))
  wrap_close = op_call(attr(subclasses, '__getitem__'), pickle.BININT + struct.pack('<i', index))
  system = op_call(attr(attr(attr(wrap_close, '__init__'), '__globals__'), 'get'), op_str('system'))
  return op_call(system, op_str(f'touch {shlex.quote(str(marker))}'))


PAYLOADS = {
    'os.system': lambda m, p: op_call(op_global('os', 'system', p),
                                       op_str(f'touch {shlex.quote(str(m))}')),
    'builtins.eval': lambda m, p: op_call(builtin('eval', p), op_str(f'open({str(m)!r}, "w").close()')),
    'subprocess.Popen': lambda m, p: op_call(
        op_global('subprocess', 'Popen', p),
        pickle.MARK + op_str('touch') + op_str(str(m)) + pickle.LIST),
    'builtins.getattr': getattr_chain,
}
