"""Torch-free, allow-listed reading of EDM / EDM2 / SiD snapshot pickles and `torch.save` files.

NVIDIA's persistence layer pickles every network as a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the source code of the
defining module and the official loader execs it. Here each global a file names is looked up in an
allow-list of inert stand-ins instead, so reading never imports torch and never runs code from the file:
persistent objects become `PersistentObject` records, `torch.nn` containers become `TorchModule` stubs and
tensors become numpy arrays. Any other global raises `UnsafePickleError` before anything is called.

Typical use:

  net = read_snapshot('network-snapshot-004000.pkl')['ema']
  net.class_name, net.init_kwargs    # 'EDMPrecond', {'model_type': 'SongUNet', ...}
  net.state_dict()                   # {'model.enc.32x32_conv.weight': np.ndarray, ...}
  read_torch_file('training-state-004000.pt')   # dicts of numpy arrays, optimizer states, ...
"""
import _compat_pickle
import collections
import contextlib
import errno
import io
import math
import os
import pickle
import types
import zipfile
from typing import Any, BinaryIO, Callable, Iterator, Optional, Union

import ml_dtypes
import numpy as np

PathOrFile = Union[str, os.PathLike, BinaryIO]

# First pickle of a legacy (non-zip) `torch.save` stream, then its format version.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'


class UnsafePickleError(pickle.UnpicklingError):
  """A file names a global outside the snapshot allow-list (or misuses an allowed one)."""


# Stand-ins are shared by every read, so a pickle's BUILD opcode (setattr on whatever is on the stack)
# must not be able to patch them: classes get this metaclass, functions the wrapper below.
class _ReadOnlyClass(type):
  """Metaclass whose classes refuse attribute assignment after creation."""

  def __setattr__(cls, name: str, value: Any) -> None:
    raise AttributeError(f'{cls.__name__}.{name} is read-only')

  def __delattr__(cls, name: str) -> None:
    raise AttributeError(f'{cls.__name__}.{name} is read-only')


class _ReadOnly:
  """Slotted record whose fields are set once (no __dict__, no __setstate__ for BUILD to use)."""
  __slots__ = ()

  def __init__(self, *values: Any):
    for name, value in zip(self.__slots__, values, strict=True):
      object.__setattr__(self, name, value)

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f'{type(self).__name__}.{name} is read-only')

  def __delattr__(self, name: str) -> None:
    raise AttributeError(f'{type(self).__name__}.{name} is read-only')

  def __repr__(self) -> str:
    fields = ', '.join(f'{name}={getattr(self, name)!r}' for name in self.__slots__)
    return f'{type(self).__name__}({fields})'


class _ReadOnlyFunction(_ReadOnly):
  """A stand-in function, wrapped so that BUILD cannot set its __defaults__ and the like."""
  __slots__ = ('function',)
  function: Callable[..., Any]

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.function(*args, **kwargs)


class EasyDict(dict, metaclass=_ReadOnlyClass):
  """Stand-in for `dnnlib.util.EasyDict`: a dict whose keys also read and write as attributes."""

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name: str, value: Any) -> None:
    self[name] = value

  def __delattr__(self, name: str) -> None:
    del self[name]


class _ModuleTree(metaclass=_ReadOnlyClass):
  """The `torch.nn.Module` bookkeeping (`_parameters`, `_buffers`, `_modules`) kept in `self.state`."""
  __slots__ = ()
  class_name: str
  state: dict

  def named_modules(self, prefix: str = '') -> Iterator[tuple[str, '_ModuleTree']]:
    """(dotted name, module) for this module and every descendant, each once, like torch's."""
    seen = set()
    stack = [(prefix, self)]
    while stack:
      name, module = stack.pop()
      if id(module) in seen:
        continue
      seen.add(id(module))
      yield name, module
      children = [(f'{name}.{child_name}' if name else child_name, child)
                  for child_name, child in module._children().items()]
      stack.extend(reversed(children))

  def state_dict(self) -> dict[str, np.ndarray]:
    """Parameters and persistent buffers under exactly the names PyTorch's `state_dict()` gives."""
    tensors = {}
    self._collect_tensors('', tensors)
    return tensors

  def _children(self) -> dict[str, '_ModuleTree']:
    children = {}
    for name, child in (self._torch_state('_modules') or {}).items():
      if child is None:
        continue
      if not isinstance(child, _ModuleTree):
        raise ValueError(f"{self.class_name}: child module '{name}' is a {type(child).__name__}, "
                         'not a snapshot module')
      children[name] = child
    return children

  def _torch_state(self, key: str) -> Any:
    if '_parameters' not in self.state:
      raise ValueError(f'{self.class_name} is not a torch.nn.Module: its state has no _parameters')
    return self.state.get(key)

  def _collect_tensors(self, prefix: str, tensors: dict[str, np.ndarray]) -> None:
    # Same walk as torch's state_dict(): shared submodules appear under every name they have.
    skipped = self._torch_state('_non_persistent_buffers_set') or set()
    named = list((self._torch_state('_parameters') or {}).items())
    named += [(name, value) for name, value in (self._torch_state('_buffers') or {}).items()
              if name not in skipped]
    for name, value in named:
      if value is None:
        continue
      if not isinstance(value, np.ndarray):
        raise ValueError(f"{self.class_name}: tensor '{prefix}{name}' decoded to a "
                         f'{type(value).__name__}, not an array')
      tensors[prefix + name] = value
    for name, child in self._children().items():
      child._collect_tensors(f'{prefix}{name}.', tensors)


class PersistentObject(_ModuleTree):
  """One object of an NVIDIA persistent class (EDMPrecond, SongUNet, Conv2d, EDM2Loss, ...).

  `state` is the object's pickled `__dict__` exactly as stored; `module_src` (the defining module's
  source text) is kept for inspection only and never executed.
  """
  __slots__ = ('class_name', 'version', 'module_src', 'state')

  def __init__(self, class_name: str, version: Any, module_src: Any, state: dict):
    self.class_name = class_name
    self.version = version
    self.module_src = module_src
    self.state = state

  # Read on access: a self-referencing state (SiD's bound-method hooks) is still being filled when
  # the inner record is created.
  @property
  def init_args(self) -> tuple:
    """Positional constructor arguments recorded by the persistence layer, as plain Python values."""
    return tuple(_plain(self.state.get('_init_args', ())))

  @property
  def init_kwargs(self) -> dict[str, Any]:
    """Constructor kwargs recorded by the persistence layer, as plain Python values."""
    return _plain(dict(self.state.get('_init_kwargs', {})))

  def __repr__(self) -> str:
    return f'PersistentObject({self.class_name!r}, version={self.version!r})'


class TorchModule(_ModuleTree):
  """Stub of a plain (non-persistent) `torch.nn` container; `state` is its pickled `__dict__`."""
  __slots__ = ('state',)
  class_name = 'torch.nn.Module'

  def __new__(cls) -> 'TorchModule':
    module = super().__new__(cls)
    module.state = {}
    return module

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise ValueError(f'{self.class_name}: state is a {type(state).__name__}, not a dict')
    self.state = state

  def __repr__(self) -> str:
    return f'TorchModule({self.class_name!r})'


_CONTAINER_STUBS = {
    name: _ReadOnlyClass(name, (TorchModule,),
                         {'__slots__': (), 'class_name': f'torch.nn.modules.container.{name}'})
    for name in ('ModuleDict', 'ModuleList', 'Sequential')}


class BoundMethodRef(_ReadOnly):
  """Inert placeholder for a pickled bound method `getattr(owner, name)`, e.g. a module hook."""
  __slots__ = ('owner', 'name')
  owner: _ModuleTree
  name: str

  def __repr__(self) -> str:
    return f'BoundMethodRef({self.owner.class_name}.{self.name})'


class _StorageType(_ReadOnly):
  """What `torch.FloatStorage` & co. stand for: the element dtype of a storage."""
  __slots__ = ('name', 'dtype')
  name: str
  dtype: np.dtype


class TorchDtype(_ReadOnly):
  """What `torch.float32` & co. stand for. A record, not numpy's dtype singleton, which BUILD could alter."""
  __slots__ = ('name', 'dtype')
  name: str
  dtype: np.dtype


class _Storage(_ReadOnly):
  """One decoded storage: a 1-D native-order array, or None while a legacy stream's bytes are unread."""
  __slots__ = ('array',)
  array: Optional[np.ndarray]


_TORCH_DTYPES = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16,
    'int64': np.int64, 'int32': np.int32, 'int16': np.int16, 'int8': np.int8,
    'uint64': np.uint64, 'uint32': np.uint32, 'uint16': np.uint16, 'uint8': np.uint8, 'bool': np.bool_,
    'complex64': np.complex64, 'complex128': np.complex128,
}
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
    'UntypedStorage': np.uint8,  # counted in bytes
}


def _plain(value: Any) -> Any:
  """numpy scalars → Python numbers, dict subclasses (EasyDict, OrderedDict) → dict, recursively."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {key: _plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_plain(item) for item in value)
  return value


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
  strides, step = [], 1
  for n in reversed(size):
    strides.append(step)
    step *= n
  return tuple(reversed(strides))


def _tensor_from_storage(storage: Any, offset: Any, size: Any, stride: Any,
                         dtype: Optional[np.dtype] = None) -> Optional[np.ndarray]:
  """The array a torch tensor views: `size` elements at `stride`, from element `offset` of `storage`."""
  if not isinstance(storage, _Storage):
    raise ValueError(f'a tensor is rebuilt from a {type(storage).__name__}, not a storage')
  if storage.array is None:
    return None  # first read of a legacy stream: the storage bytes follow the pickle
  flat = storage.array
  if dtype is not None:
    if not isinstance(dtype, np.dtype) or flat.nbytes % dtype.itemsize:
      raise ValueError(f'cannot view a storage of {flat.nbytes} bytes as {dtype!r} elements')
    flat = flat.view(np.uint8).view(dtype)
  offset, size, stride = int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise ValueError(f'invalid tensor view: offset {offset}, size {size}, stride {stride}')
  if 0 in size:
    return np.zeros(size, flat.dtype)
  # Bounds first: as_strided would otherwise read outside the storage.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ValueError(f'tensor view (offset {offset}, size {size}, stride {stride}) reaches past its '
                     f'storage of {flat.size} elements')
  if stride == _contiguous_strides(size):
    return flat[offset:offset + math.prod(size)].reshape(size)
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], size, tuple(s * flat.itemsize for s in stride), writeable=False)
  return view.copy()


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Optional[np.ndarray]:
  return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> Optional[np.ndarray]:
  del requires_grad, backward_hooks  # autograd bookkeeping has no numpy counterpart
  if metadata:
    raise ValueError(f'tensor metadata {metadata!r} (lazy conjugate/negative views) is not supported')
  return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> Optional[np.ndarray]:
  del requires_grad, backward_hooks
  if metadata:
    raise ValueError(f'tensor metadata {metadata!r} (lazy conjugate/negative views) is not supported')
  if not isinstance(dtype, TorchDtype):
    raise ValueError(f'tensor dtype {dtype!r} is not a torch dtype')
  return _tensor_from_storage(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
  del requires_grad, backward_hooks, state  # `state`: Python attributes set on the Parameter object
  return data


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
  """A record of the persistent object instead of exec'ing `meta['module_src']`."""
  if (not isinstance(meta, dict) or meta.get('type') != 'class'
      or not isinstance(meta.get('class_name'), str) or not isinstance(meta.get('state'), dict)):
    keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
    raise ValueError(f'malformed persistent-object record: {keys}')
  return PersistentObject(meta['class_name'], meta.get('version'), meta.get('module_src'), meta['state'])


def _reconstructor(cls: Any, base: Any, state: Any) -> TorchModule:
  """`copyreg._reconstructor` (protocols 0 and 1), limited to the torch.nn container stubs."""
  if not (isinstance(cls, type) and issubclass(cls, TorchModule)) or base is not object or state is not None:
    raise UnsafePickleError(f"refusing 'copyreg._reconstructor' of {cls!r}: only torch.nn container "
                            'stubs may be reconstructed')
  return cls()


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
  """`numpy.dtype`, always a fresh copy: the BUILD that follows must not alter numpy's singletons."""
  del copy
  return np.dtype(spec, bool(align), True)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  """`numpy.core.multiarray._reconstruct`: an empty ndarray that the following BUILD fills."""
  if subtype is not np.ndarray:
    raise ValueError(f'numpy array of subtype {subtype!r}: only numpy.ndarray is allowed')
  return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
  """`numpy.core.multiarray.scalar`: a numpy scalar from its dtype and raw bytes."""
  if not isinstance(dtype, np.dtype):
    raise ValueError(f'numpy scalar with dtype {dtype!r}')
  if dtype.hasobject:
    return data  # object scalars pickle the object itself
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise ValueError(f'numpy {dtype} scalar needs {dtype.itemsize} bytes')
  return np.frombuffer(data, dtype)[0]


def _codecs_encode(text: Any, encoding: str = 'utf-8') -> bytes:
  """`_codecs.encode`, as protocols 0-2 use it to carry bytes: latin-1 only."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise ValueError(f'_codecs.encode of a {type(text).__name__} as {encoding!r}: only latin-1 text')
  return text.encode('latin1')


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
  return tuple(int(n) for n in dims)


def _torch_device(kind: Any, index: Any = None) -> str:
  """`torch.device` as its string form, e.g. 'cuda:0'."""
  if not isinstance(kind, str):
    raise ValueError(f'torch.device of a {type(kind).__name__}')
  return kind if index is None else f'{kind}:{int(index)}'


def _numpy_names(name: str, value: Any) -> dict[str, Any]:
  # numpy 1.x pickles say numpy.core, numpy 2.x numpy._core.
  return {f'numpy.core.multiarray.{name}': value, f'numpy._core.multiarray.{name}': value}


_STAND_INS: dict[str, Any] = {
    'torch_utils.persistence._reconstruct_persistent_obj': _reconstruct_persistent_obj,
    'torch._utils._rebuild_tensor': _rebuild_tensor,
    'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
    'torch._utils._rebuild_tensor_v3': _rebuild_tensor_v3,
    'torch._utils._rebuild_parameter': _rebuild_parameter,
    'torch._utils._rebuild_parameter_with_state': _rebuild_parameter_with_state,
    **{f'torch.{name}': _StorageType(name, np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
    'torch.storage.UntypedStorage': _StorageType('UntypedStorage', np.dtype(np.uint8)),
    **{f'torch.{name}': TorchDtype(name, np.dtype(dtype)) for name, dtype in _TORCH_DTYPES.items()},
    'torch.Size': _torch_size,
    'torch.device': _torch_device,
    **{f'torch.nn.modules.container.{name}': stub for name, stub in _CONTAINER_STUBS.items()},
    'collections.OrderedDict': collections.OrderedDict,
    'dnnlib.util.EasyDict': EasyDict,
    'numpy.dtype': _numpy_dtype,
    'numpy.ndarray': np.ndarray,
    **_numpy_names('scalar', _numpy_scalar),
    **_numpy_names('_reconstruct', _numpy_reconstruct),
    '_codecs.encode': _codecs_encode,
    'copyreg._reconstructor': _reconstructor,
    'builtins.object': object,  # only useful as copyreg._reconstructor's base
    'builtins.set': set,
    'builtins.frozenset': frozenset,
    'builtins.slice': slice,
}
_GLOBALS = {name: _ReadOnlyFunction(value) if isinstance(value, types.FunctionType) else value
            for name, value in _STAND_INS.items()}
# Stand-ins that need the reader's context; see _AllowListUnpickler.
_CONTEXT_GLOBALS = ('torch.storage._load_from_bytes', 'builtins.getattr')
ALLOWED_GLOBALS = frozenset(_GLOBALS) | frozenset(_CONTEXT_GLOBALS)


class _AllowListUnpickler(pickle.Unpickler):
  """Resolves globals from the allow-list only; `load_storage` answers torch's persistent ids."""

  def __init__(self, file: BinaryIO, source: str,
               load_storage: Optional[Callable[[Any], Any]] = None):
    super().__init__(file)
    self._source = source
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    # Protocol 0-2 pickles written by Python 3 carry Python 2 names (__builtin__, copy_reg).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
      module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    dotted = f'{module}.{name}'
    if dotted == 'torch.storage._load_from_bytes':
      return _ReadOnlyFunction(self._load_from_bytes)
    if dotted == 'builtins.getattr':
      return _ReadOnlyFunction(self._getattr)
    if dotted in _GLOBALS:
      return _GLOBALS[dotted]
    raise UnsafePickleError(
        f"refusing to load global '{dotted}' from {self._source}: not an allowed snapshot class")

  def persistent_load(self, pid: Any) -> Any:
    if self._load_storage is None:
      raise pickle.UnpicklingError(f'{self._source}: persistent id in a plain pickle')
    return self._load_storage(pid)

  def _load_from_bytes(self, blob: Any) -> _Storage:
    """`torch.storage._load_from_bytes`: a storage saved as a nested legacy `torch.save` stream."""
    if not isinstance(blob, bytes):
      raise ValueError(f'{self._source}: storage blob is a {type(blob).__name__}, not bytes')
    storage = _read_legacy(io.BytesIO(blob), f'{self._source} (storage blob)')
    if not isinstance(storage, _Storage):
      raise ValueError(f'{self._source}: storage blob holds a {type(storage).__name__}, not a storage')
    return storage

  def _getattr(self, owner: Any, name: Any, *default: Any) -> BoundMethodRef:
    """`builtins.getattr`, tolerated only as a bound-method reference on a snapshot module."""
    if isinstance(owner, _ModuleTree) and isinstance(name, str) and not default:
      return BoundMethodRef(owner, name)
    raise UnsafePickleError(
        f"refusing 'builtins.getattr' on a {type(owner).__name__} in {self._source}: only bound-method "
        'references on snapshot modules are tolerated')


def _parse_storage_pid(pid: Any, source: str) -> tuple[str, np.dtype, int]:
  """(key, element dtype, element count) of ('storage', type, key, location, numel[, view])."""
  if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'):
    raise ValueError(f'{source}: unsupported persistent id of type {type(pid).__name__}')
  storage_type, key, _, numel = pid[1:5]
  if not isinstance(storage_type, _StorageType):
    raise ValueError(f'{source}: persistent id names {storage_type!r}, not a storage type')
  if len(pid) == 6 and pid[5] is not None:
    raise ValueError(f'{source}: storage views (torch < 1.0 files) are not supported')
  if int(numel) < 0:
    raise ValueError(f'{source}: storage {key!r} has negative size {numel}')
  return str(key), storage_type.dtype, int(numel)


def _read_bytes(file: BinaryIO, nbytes: int, source: str) -> np.ndarray:
  """Exactly `nbytes` from `file` into a fresh writable uint8 array."""
  buffer = np.empty(nbytes, np.uint8)
  view, done = memoryview(buffer), 0
  while done < nbytes:
    count = file.readinto(view[done:])
    if not count:
      raise ValueError(f'{source}: truncated, storage data ends after {done} of {nbytes} bytes')
    done += count
  return buffer


def _read_legacy(file: BinaryIO, source: str) -> Any:
  """A legacy `torch.save` stream: magic, version, sys info, the pickle, storage keys, then the bytes.

  The bytes follow the pickle and only its persistent ids say how wide each element is, so the pickle
  is read twice: once to learn the storages, then again with them filled in.
  """
  def load_plain() -> Any:
    return _AllowListUnpickler(file, source).load()

  magic = load_plain()
  if not (isinstance(magic, int) and magic == _LEGACY_MAGIC):
    raise ValueError(f'{source} is not a torch.save file (no legacy magic number)')
  version = load_plain()
  if version != _LEGACY_PROTOCOL:
    raise ValueError(f'{source}: legacy torch.save version {version!r}, expected {_LEGACY_PROTOCOL}')
  sys_info = load_plain()
  if not (isinstance(sys_info, dict) and sys_info.get('little_endian')):
    raise ValueError(f'{source}: only little-endian torch.save files are supported')

  layouts = {}

  def learn_storage(pid: Any) -> Any:
    if isinstance(pid, tuple) and pid[:1] == ('module',):
      return pid[1]  # ('module', class, source file, source): the class itself, already allow-listed
    key, dtype, numel = _parse_storage_pid(pid, source)
    layouts.setdefault(key, (dtype, numel))
    return _Storage(None)

  start = file.tell()
  file_size = file.seek(0, io.SEEK_END)
  file.seek(start)
  _AllowListUnpickler(file, source, learn_storage).load()
  keys = load_plain()
  if not (isinstance(keys, list) and set(keys) == set(layouts)):
    raise ValueError(f'{source}: storage key list does not match the storages the pickle uses')
  storages = {}
  for key in keys:
    dtype, numel = layouts[key]
    header = int(_read_bytes(file, 8, source).view('<i8')[0])
    if header != numel:
      raise ValueError(f'{source}: storage {key!r} holds {header} elements, the pickle says {numel}')
    nbytes = numel * dtype.itemsize
    if file.tell() + nbytes > file_size:  # refuse before allocating
      raise ValueError(f'{source}: truncated, storage {key!r} needs {nbytes} bytes past the end')
    storages[key] = _Storage(_read_bytes(file, nbytes, source).view(dtype))
  end = file.tell()

  def load_storage(pid: Any) -> Any:
    if isinstance(pid, tuple) and pid[:1] == ('module',):
      return pid[1]
    return storages[_parse_storage_pid(pid, source)[0]]

  file.seek(start)
  result = _AllowListUnpickler(file, source, load_storage).load()
  file.seek(end)
  return result


def _read_zip(file: BinaryIO, source: str) -> Any:
  """A zip-format `torch.save` file: `<archive>/data.pkl`, one raw `<archive>/data/<key>` per storage."""
  with zipfile.ZipFile(file) as archive:
    names = archive.namelist()
    pickles = [name for name in names if name.endswith('/data.pkl') and name.count('/') == 1]
    if len(pickles) != 1:
      raise ValueError(f'{source}: expected one <archive>/data.pkl, found {len(pickles)}')
    prefix = pickles[0][:-len('data.pkl')]
    if prefix + 'byteorder' in names and archive.read(prefix + 'byteorder').strip() != b'little':
      raise ValueError(f'{source}: only little-endian torch.save files are supported')
    storages = {}

    def load_storage(pid: Any) -> _Storage:
      key, dtype, numel = _parse_storage_pid(pid, source)
      if key not in storages:  # tensors sharing a storage share its key
        record = f'{prefix}data/{key}'
        if record not in names:
          raise ValueError(f'{source}: storage record {record} is missing')
        nbytes = numel * dtype.itemsize
        if archive.getinfo(record).file_size != nbytes:
          raise ValueError(f'{source}: storage record {record} is not {nbytes} bytes')
        with archive.open(record) as data:
          storages[key] = _Storage(_read_bytes(data, nbytes, source).view(dtype))
      return storages[key]

    with archive.open(pickles[0]) as data_pkl:
      return _AllowListUnpickler(data_pkl, source, load_storage).load()


@contextlib.contextmanager
def _opened(path_or_file: PathOrFile) -> Iterator[tuple[BinaryIO, str]]:
  """(binary file, name for messages) for a path or an already open binary file."""
  if hasattr(path_or_file, 'read'):
    yield path_or_file, str(getattr(path_or_file, 'name', '<stream>'))
    return
  path = os.fspath(path_or_file)
  try:
    file = open(path, 'rb')
  except FileNotFoundError:
    raise FileNotFoundError(errno.ENOENT, 'snapshot file not found', path) from None
  with file:
    yield file, path


# What a truncated, corrupt or non-pickle file raises while being read.
_MALFORMED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
              KeyError, OverflowError, zipfile.BadZipFile)


def _read(path_or_file: PathOrFile, reader: Callable[[BinaryIO, str], Any], kind: str) -> Any:
  with _opened(path_or_file) as (file, source):
    try:
      return reader(file, source)
    except UnsafePickleError:
      raise
    except _MALFORMED as error:
      raise ValueError(f'cannot read {source} as {kind}: {error}') from error


def read_snapshot(path_or_file: PathOrFile) -> Any:
  """The top-level object (a dict; an EasyDict for EDM2) of an EDM / EDM2 / SiD snapshot pickle.

  Persistent networks come back as `PersistentObject`s with numpy tensors; nothing outside the
  allow-list (`ALLOWED_GLOBALS`) is resolved, and nothing from the file is executed.
  Raises FileNotFoundError, UnsafePickleError for a disallowed global, ValueError for a malformed file.
  """
  return _read(path_or_file, lambda file, source: _AllowListUnpickler(file, source).load(),
               'a snapshot pickle')


def read_torch_file(path_or_file: PathOrFile) -> Any:
  """The object stored by `torch.save` (zip or legacy format), tensors as numpy arrays.

  Used for SiD `training-state-*.pt` files and pytorch-fid's inception `.pth`; same allow-list and
  errors as `read_snapshot`. Contiguous tensors that share a storage come back as views of one array,
  as in torch; strided ones as copies.
  """
  def reader(file: BinaryIO, source: str) -> Any:
    start = file.tell()
    is_zip = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    file.seek(start)
    return _read_zip(file, source) if is_zip else _read_legacy(file, source)

  return _read(path_or_file, reader, 'a torch.save file')
