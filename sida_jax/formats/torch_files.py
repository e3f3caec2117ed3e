"""torch objects inside pickles, and `torch.save` files (zip and legacy), read without torch.

Every global a file names is resolved through `GLOBALS`, an allow-list of inert stand-ins (see
`pickle.py`), so reading never imports torch and never runs code from the file: tensors become numpy
arrays (fp32/fp16/bf16 and integer storages, strided and shared views), `torch.nn` containers become
`TorchModule` stubs, and NVIDIA's persistent classes become `PersistentObject` records. NVIDIA's
persistence layer pickles every network as a call of `torch_utils.persistence._reconstruct_persistent_obj(meta)`,
where `meta` carries the source code of the defining module and the official loader execs it; here
it only records the class name, the constructor kwargs and the state. Any other global raises
`UnsafePickleError` before anything is called.

Typical use:

  net = read_pickle('network-snapshot-004000.pkl')['ema']
  net.class_name, net.init_kwargs    # 'EDMPrecond', {'model_type': 'SongUNet', ...}
  net.state_dict()                   # {'model.enc.32x32_conv.weight': np.ndarray, ...}
  read_torch_file('training-state-004000.pt')   # dicts of numpy arrays, optimizer states, ...
"""
import io
import math
import zipfile
from typing import Any, BinaryIO, Callable, Iterator, Optional

import ml_dtypes
import numpy as np

from sida_jax.formats import pickle as pickle_lib
from sida_jax.formats.pickle import PathOrFile, ReadOnly, ReadOnlyClass, ReadOnlyFunction, UnsafePickleError

# First pickle of a legacy (non-zip) `torch.save` stream, then its format version.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'


class EasyDict(dict, metaclass=ReadOnlyClass):
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


class _ModuleTree(metaclass=ReadOnlyClass):
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
    return tuple(pickle_lib.plain(self.state.get('_init_args', ())))

  @property
  def init_kwargs(self) -> dict[str, Any]:
    """Constructor kwargs recorded by the persistence layer, as plain Python values."""
    return pickle_lib.plain(dict(self.state.get('_init_kwargs', {})))

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
    name: ReadOnlyClass(name, (TorchModule,),
                         {'__slots__': (), 'class_name': f'torch.nn.modules.container.{name}'})
    for name in ('ModuleDict', 'ModuleList', 'Sequential')}


# GDD's class-embedding table (`in_embeddings/tf_efficientnet_lite0.pkl`) is a plain pickle of an
# nn.Embedding written through dill, which spells the type of its empty `_non_persistent_buffers_set` as
# `dill._dill._load_type('set')`. These two stand-ins admit exactly that and nothing more.
_EMBEDDING_STUB = ReadOnlyClass('Embedding', (TorchModule,),
                                {'__slots__': (), 'class_name': 'torch.nn.modules.sparse.Embedding'})


def _dill_load_type(name: Any) -> type:
  """`dill._dill._load_type`, limited to the builtin `set`."""
  if name != 'set':
    raise UnsafePickleError(f"refusing 'dill._dill._load_type({name!r})': only 'set' is allowed")
  return set


class BoundMethodRef(ReadOnly):
  """Inert placeholder for a pickled bound method `getattr(owner, name)`, e.g. a module hook."""
  __slots__ = ('owner', 'name')
  owner: _ModuleTree
  name: str

  def __repr__(self) -> str:
    return f'BoundMethodRef({self.owner.class_name}.{self.name})'


class _StorageType(ReadOnly):
  """What `torch.FloatStorage` & co. stand for: the element dtype of a storage."""
  __slots__ = ('name', 'dtype')
  name: str
  dtype: np.dtype


class TorchDtype(ReadOnly):
  """What `torch.float32` & co. stand for. A record, not numpy's dtype singleton, which BUILD could alter."""
  __slots__ = ('name', 'dtype')
  name: str
  dtype: np.dtype


class _Storage(ReadOnly):
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


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
  return tuple(int(n) for n in dims)


def _torch_device(kind: Any, index: Any = None) -> str:
  """`torch.device` as its string form, e.g. 'cuda:0'."""
  if not isinstance(kind, str):
    raise ValueError(f'torch.device of a {type(kind).__name__}')
  return kind if index is None else f'{kind}:{int(index)}'


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
    'torch.nn.modules.sparse.Embedding': _EMBEDDING_STUB,
    'dill._dill._load_type': _dill_load_type,
    'dnnlib.util.EasyDict': EasyDict,
    'copyreg._reconstructor': _reconstructor,
    'builtins.object': object,  # only useful as copyreg._reconstructor's base
}
# What a torch pickle may name: the stand-ins above and those of plain Python and numpy values.
GLOBALS = {**pickle_lib.read_only(_STAND_INS), **pickle_lib.PLAIN_GLOBALS}
# Stand-ins that need the reader's context; see TorchUnpickler.
_CONTEXT_GLOBALS = ('torch.storage._load_from_bytes', 'builtins.getattr')
ALLOWED_GLOBALS = frozenset(GLOBALS) | frozenset(_CONTEXT_GLOBALS)


class TorchUnpickler(pickle_lib.AllowListUnpickler):
  """Resolves globals from `GLOBALS` only; `load_storage` answers torch's persistent ids."""

  def __init__(self, file: BinaryIO, source: str,
               load_storage: Optional[Callable[[Any], Any]] = None):
    super().__init__(file, source, GLOBALS, load_storage)

  def find_global(self, dotted: str) -> Any:
    if dotted == 'torch.storage._load_from_bytes':
      return ReadOnlyFunction(self._load_from_bytes)
    if dotted == 'builtins.getattr':
      return ReadOnlyFunction(self._getattr)
    return super().find_global(dotted)

  def _load_from_bytes(self, blob: Any) -> _Storage:
    """`torch.storage._load_from_bytes`: a storage saved as a nested legacy `torch.save` stream."""
    if not isinstance(blob, bytes):
      raise ValueError(f'{self.source}: storage blob is a {type(blob).__name__}, not bytes')
    storage = _read_legacy(io.BytesIO(blob), f'{self.source} (storage blob)')
    if not isinstance(storage, _Storage):
      raise ValueError(f'{self.source}: storage blob holds a {type(storage).__name__}, not a storage')
    return storage

  def _getattr(self, owner: Any, name: Any, *default: Any) -> BoundMethodRef:
    """`builtins.getattr`, tolerated only as a bound-method reference on a snapshot module."""
    if isinstance(owner, _ModuleTree) and isinstance(name, str) and not default:
      return BoundMethodRef(owner, name)
    raise UnsafePickleError(
        f"refusing 'builtins.getattr' on a {type(owner).__name__} in {self.source}: only bound-method "
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
    return TorchUnpickler(file, source).load()

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
  TorchUnpickler(file, source, learn_storage).load()
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
  result = TorchUnpickler(file, source, load_storage).load()
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
      return TorchUnpickler(data_pkl, source, load_storage).load()


def read_pickle(path_or_file: PathOrFile, kind: str = 'a pickle') -> Any:
  """The object in a plain pickle of torch objects (no torch.save container), tensors as numpy arrays.

  Persistent networks come back as `PersistentObject`s; nothing outside the allow-list
  (`ALLOWED_GLOBALS`) is resolved, and nothing from the file is executed. Raises FileNotFoundError,
  UnsafePickleError for a disallowed global, ValueError (naming the file as `kind`) for a malformed file.
  """
  return pickle_lib.read_file(path_or_file, lambda file, source: TorchUnpickler(file, source).load(), kind)


def read_torch_file(path_or_file: PathOrFile) -> Any:
  """The object stored by `torch.save` (zip or legacy format), tensors as numpy arrays.

  Used for SiD `training-state-*.pt` files and pytorch-fid's inception `.pth`; same allow-list and
  errors as `read_pickle`. Contiguous tensors that share a storage come back as views of one array,
  as in torch; strided ones as copies.
  """
  def reader(file: BinaryIO, source: str) -> Any:
    start = file.tell()
    is_zip = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    file.seek(start)
    return _read_zip(file, source) if is_zip else _read_legacy(file, source)

  return pickle_lib.read_file(path_or_file, reader, 'a torch.save file')
