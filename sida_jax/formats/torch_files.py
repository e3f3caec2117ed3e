"""torch objects inside pickles, and `torch.save` files (zip and legacy), read without torch.

Every global a file names is resolved through `GLOBALS`, a table of inert stand-ins interpreted by
`pickle.py`, so reading never imports torch and never runs code from the file: tensors become numpy
arrays (fp32/fp16/bf16, integer, bool and complex storages; strided and shared views), `torch.nn`
containers become `TorchModule` stubs, and NVIDIA's persistent classes become `PersistentObject`
records. NVIDIA's persistence layer pickles every network as a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the source code of
the defining module and the official loader execs it; here it only records the class name, the
constructor kwargs and the state.

Every tensor is bounded by the storage behind it, every storage by the bytes the file holds for it,
and everything materialised by the read's budget (see `pickle.Budget`): a malformed, hostile or
truncated file raises `UnsafePickleError` (a ValueError naming the file) before any large allocation.

Typical use:

  net = read_pickle('network-snapshot-004000.pkl')['ema']
  net.class_name, net.init_kwargs    # 'EDMPrecond', {'model_type': 'SongUNet', ...}
  net.state_dict()                   # {'model.enc.32x32_conv.weight': np.ndarray, ...}
  read_torch_file('training-state-004000.pt')   # dicts of numpy arrays, optimizer states, ...
"""
import zipfile
from typing import Any, BinaryIO, Iterator, Optional

import ml_dtypes
import numpy as np

from sida_jax.formats import pickle as pickle_lib
from sida_jax.formats.pickle import (Class, Context, Marker, PathOrFile, ReadOnly, ReadOnlyClass,
                                     UnsafePickleError, check_int, check_shape, describe, is_one_of)

# First pickle of a legacy (non-zip) `torch.save` stream, then its format version.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b'PK\x03\x04'
# torch writes its records uncompressed; a compressed record may not claim more than this ratio.
_ZIP_MAX_RATIO = 100
# zipfile keeps ~600 bytes per central-directory entry (46 bytes + the name); torch writes a few entries
# per tensor, and a big training state has ~10k of ~80 bytes.
_ZIP_MAX_DIRECTORY_BYTES = 8 << 20
# A storage blob (torch.storage._load_from_bytes) holds one storage; blobs inside blobs are refused.
_MAX_BLOB_DEPTH = 1
# Module trees: how deep a state_dict walk may go, how many modules it may visit (a module shared
# under several names is visited under each, as in torch) and how many tensors it may collect.
_MAX_MODULE_DEPTH = 256
_MAX_MODULE_VISITS = 20_000
_MAX_STATE_ENTRIES = 1_000_000


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


pickle_lib.register_dict_type(EasyDict)


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
    """Parameters and persistent buffers under exactly the names PyTorch's `state_dict()` gives.

    Shared submodules appear under every name they have, as in torch; a module that contains
    itself, or a tree deeper than 256 or with more than a million tensors, is refused.
    """
    tensors: dict[str, np.ndarray] = {}
    stack = [('', self, ())]
    visits = 0
    while stack:
      prefix, module, path = stack.pop()
      visits += 1
      if visits > _MAX_MODULE_VISITS:
        raise UnsafePickleError(f'{self.class_name}: more than {_MAX_MODULE_VISITS} module visits')
      if len(path) > _MAX_MODULE_DEPTH:
        raise UnsafePickleError(f'{self.class_name}: module tree deeper than {_MAX_MODULE_DEPTH}')
      for name, value in module._own_tensors():
        if len(tensors) >= _MAX_STATE_ENTRIES:
          raise UnsafePickleError(f'{self.class_name}: more than {_MAX_STATE_ENTRIES} tensors')
        tensors[prefix + name] = value
      children = []
      for name, child in module._children().items():
        if id(child) in path or child is module:
          raise UnsafePickleError(f"{self.class_name}: module '{prefix}{name}' contains itself")
        children.append((f'{prefix}{name}.', child, path + (id(module),)))
      stack.extend(reversed(children))  # depth first, in declaration order, like torch
    return tensors

  def _children(self) -> dict[str, '_ModuleTree']:
    children = {}
    for name, child in self._torch_state('_modules').items():
      if child is None:
        continue
      if not isinstance(child, _ModuleTree):
        raise UnsafePickleError(f"{self.class_name}: child module '{name}' is {describe(child)}, "
                                'not a snapshot module')
      children[name] = child
    return children

  def _torch_state(self, key: str) -> Any:
    """`state[key]` of the torch bookkeeping: a dict, or a set for `_non_persistent_buffers_set`."""
    if not isinstance(self.state, dict) or '_parameters' not in self.state:
      raise UnsafePickleError(f'{self.class_name} is not a torch.nn.Module: its state has no _parameters')
    kind = (set, frozenset) if key == '_non_persistent_buffers_set' else dict
    value = self.state.get(key)
    if value is None:
      return kind[0]() if isinstance(kind, tuple) else kind()
    if not isinstance(value, kind):
      raise UnsafePickleError(f'{self.class_name}: {key} is {describe(value)}')
    return value

  def _own_tensors(self) -> list[tuple[str, np.ndarray]]:
    skipped = self._torch_state('_non_persistent_buffers_set')
    named = list(self._torch_state('_parameters').items())
    named += [(name, value) for name, value in self._torch_state('_buffers').items() if name not in skipped]
    tensors = []
    for name, value in named:
      if value is None:
        continue
      if not isinstance(value, np.ndarray) or type(name) is not str:
        raise UnsafePickleError(f"{self.class_name}: tensor {describe(name)} decoded to {describe(value)}, "
                                'not an array')
      tensors.append((name, value))
    return tensors


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
    args = pickle_lib.plain(self.state.get('_init_args', ()))
    if not isinstance(args, (tuple, list)):
      raise UnsafePickleError(f'{self.class_name}: _init_args is {describe(args)}')
    return tuple(args)

  @property
  def init_kwargs(self) -> dict[str, Any]:
    """Constructor kwargs recorded by the persistence layer, as plain Python values."""
    kwargs = pickle_lib.plain(self.state.get('_init_kwargs', {}))
    if not isinstance(kwargs, dict) or not all(type(key) is str for key in kwargs):
      raise UnsafePickleError(f'{self.class_name}: _init_kwargs is {describe(kwargs)}, not a dict of names')
    return kwargs

  def __repr__(self) -> str:
    return f'PersistentObject({self.class_name!r}, version={describe(self.version)})'


class TorchModule(_ModuleTree):
  """Stub of a plain (non-persistent) `torch.nn` container; `state` is its pickled `__dict__`."""
  __slots__ = ('state',)
  class_name = 'torch.nn.Module'

  def __new__(cls) -> 'TorchModule':
    module = super().__new__(cls)
    module.state = None
    return module

  def build_from_state(self, context: Context, state: Any) -> 'TorchModule':
    if self.state is not None or type(state) is not dict:
      raise context.refuse(f'{self.class_name}: state is {describe(state)}, not a dict (or set twice)')
    self.state = state
    return self

  def __repr__(self) -> str:
    return f'TorchModule({self.class_name!r})'


# Plain torch.nn modules a pickle may hold: the containers, and nn.Embedding for GDD's class-embedding table
# (`in_embeddings/tf_efficientnet_lite0.pkl`, a plain pickle of an nn.Embedding written through dill).
_CONTAINER_STUBS = {
    dotted: ReadOnlyClass(dotted.rsplit('.', 1)[1], (TorchModule,), {'__slots__': (), 'class_name': dotted})
    for dotted in ('torch.nn.modules.container.ModuleDict', 'torch.nn.modules.container.ModuleList',
                   'torch.nn.modules.container.Sequential', 'torch.nn.modules.sparse.Embedding')}


class BoundMethodRef(ReadOnly):
  """Inert placeholder for a pickled bound method `getattr(owner, name)`, e.g. a module hook."""
  __slots__ = ('owner', 'name')
  owner: _ModuleTree
  name: str

  def __repr__(self) -> str:
    return f'BoundMethodRef({self.owner.class_name}.{self.name})'


class StorageType(ReadOnly):
  """What `torch.FloatStorage` & co. stand for: the element dtype of a storage (an argument only)."""
  __slots__ = ('name', 'dtype')
  name: str
  dtype: np.dtype


class TorchDtype(ReadOnly):
  """What `torch.float32` & co. stand for (an argument only): a record, not numpy's dtype singleton."""
  __slots__ = ('name', 'dtype')
  name: str
  dtype: np.dtype


class _Storage:
  """One storage: a 1-D array of its elements. In a legacy stream the bytes follow the pickle, so the
  array is allocated (from the sizes the persistent ids give) and filled once the pickle is read;
  until then `pending` collects the tensor copies to make from it."""
  __slots__ = ('key', 'array', 'pending')

  def __init__(self, key: str, array: np.ndarray, pending: Optional[list]):
    self.key, self.array, self.pending = key, array, pending


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


# ----------------------------------------------------------------------------------------------------
# The context of a read: its storages and blobs.


class TorchContext(Context):
  """A read of torch objects: `storage_loader` answers persistent ids (zip or legacy storages)."""

  def __init__(self, source: str, budget: pickle_lib.Budget, blob_depth: int = 0):
    super().__init__(source, budget)
    self.blob_depth = blob_depth
    self.blobs: dict[int, tuple[Any, _Storage]] = {}  # id(blob) -> (blob, storage): each decoded once
    self.storage_loader = None

  def persistent_load(self, pid: Any) -> Any:
    if type(pid) is tuple and len(pid) == 4 and is_one_of(pid[0], 'module'):
      # Legacy torch.save of a whole module: ('module', class, source file, source). Only the
      # container stubs are classes here.
      if not _is_container_class(pid[1]):
        raise self.refuse(f'module persistent id for {describe(pid[1])}')
      return pid[1]
    if self.storage_loader is None:
      raise self.refuse(f'persistent id ({describe(pid)}) in a plain pickle')
    return self.storage_loader(pid)


def _parse_storage_pid(context: Context, pid: Any) -> tuple[str, np.dtype, int]:
  """(key, element dtype, element count) of ('storage', type, key, location, numel[, view])."""
  if not (type(pid) is tuple and len(pid) in (5, 6) and is_one_of(pid[0], 'storage')):
    raise context.refuse(f'unsupported persistent id {describe(pid)}')
  storage_type, key, _, numel = pid[1:5]
  if not isinstance(storage_type, StorageType):
    raise context.refuse(f'persistent id names {describe(storage_type)}, not a storage type')
  if type(key) is not str or len(key) > 256:
    raise context.refuse(f'storage key {describe(key)}')
  if len(pid) == 6 and pid[5] is not None:
    raise context.refuse('storage views (torch < 1.0 files) are not supported')
  numel = check_int(context, numel, f'the size of storage {key!r}', 0, 1 << 56)
  return key, storage_type.dtype, numel


def _new_storage(context: Context, key: str, dtype: np.dtype, numel: int, pending: Optional[list]) -> _Storage:
  nbytes = numel * dtype.itemsize
  context.budget.charge(nbytes + 256, f'storage {key!r} of {nbytes} bytes')
  return _Storage(key, np.empty(numel, dtype), pending)


def _fill_storage(storage: _Storage, data: Any) -> None:
  """Copies the raw bytes of `storage` in, then makes the tensor copies that waited for them."""
  storage.array.view(np.uint8)[:] = np.frombuffer(data, np.uint8, storage.array.nbytes)
  if storage.array.dtype == np.bool_:
    np.not_equal(storage.array.view(np.uint8), 0, out=storage.array)  # only 0 and 1 are valid booleans
  pending, storage.pending = storage.pending, None
  for out, source in pending or ():
    _copy_tensor(out, source)


def _copy_tensor(out: np.ndarray, source: np.ndarray) -> None:
  if out.dtype == np.bool_:
    np.not_equal(source.view(np.uint8), 0, out=out)
  else:
    np.copyto(out, source)


# ----------------------------------------------------------------------------------------------------
# Stand-ins for torch's globals.


def _tensor_from_storage(context: Context, storage: Any, offset: Any, size: Any, stride: Any,
                         dtype: Optional[np.dtype] = None) -> np.ndarray:
  """The array a torch tensor views: `size` elements at `stride`, from element `offset` of `storage`.

  Contiguous tensors are views of their storage (tensors sharing it share memory, as in torch);
  strided ones are copies charged to the budget. Each dimension of more than one element must
  step forward through the storage and the whole extent must lie inside it, so no tensor holds
  more elements than the storage behind it: broadcast (zero-stride) and overlapping views, which
  torch.save only writes for tensors nobody checkpoints, are refused.
  """
  if not isinstance(storage, _Storage):
    raise context.refuse(f'a tensor is rebuilt from {describe(storage)}, not a storage')
  flat = storage.array
  if dtype is not None:
    if flat.nbytes % dtype.itemsize:
      raise context.refuse(f'cannot view a storage of {flat.nbytes} bytes as {dtype} elements')
    flat = flat.view(np.uint8).view(dtype)
  offset = check_int(context, offset, 'a storage offset')
  size = check_shape(context, size, 'a tensor size')
  if type(stride) is not tuple or len(stride) != len(size):
    raise context.refuse(f'tensor stride {describe(stride)} does not match its size {size}')
  stride = tuple(check_int(context, s, 'a tensor stride', -(1 << 48), 1 << 48) for s in stride)
  numel = 1
  for n in size:
    numel *= n
  if numel == 0:
    return np.zeros(size, flat.dtype)
  extent, contiguous, step = 1, True, 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n == 1:
      continue
    if s < 1:
      raise context.refuse(f'tensor view (size {size}, stride {stride}) has a zero or negative stride: '
                           'broadcast and reversed views are not read')
    extent += (n - 1) * s
    contiguous &= s == step
    step *= n
  if offset + extent > flat.size:
    raise context.refuse(f'tensor view (offset {offset}, size {size}, stride {stride}) reaches past its '
                         f'storage of {flat.size} elements')
  if numel > extent:
    raise context.refuse(f'tensor view (size {size}, stride {stride}) overlaps itself')
  if contiguous and flat.dtype != np.bool_:
    return flat[offset:offset + numel].reshape(size)
  context.budget.charge(numel * flat.itemsize, f'a strided tensor of {numel} elements')
  element_strides = [s if n > 1 else 0 for n, s in zip(size, stride)]
  source = np.lib.stride_tricks.as_strided(
      flat[offset:], size, tuple(s * flat.itemsize for s in element_strides), writeable=False)
  out = np.empty(size, flat.dtype)
  if storage.pending is not None:
    storage.pending.append((out, source))  # legacy stream: the bytes are not read yet
  else:
    _copy_tensor(out, source)
  return out


def _check_metadata(context: Context, metadata: Any) -> None:
  if metadata is not None and not (isinstance(metadata, dict) and not metadata):
    raise context.refuse('tensor metadata (lazy conjugate/negative views) is not supported')


def _rebuild_tensor(context: Context, storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
  return _tensor_from_storage(context, storage, storage_offset, size, stride)


def _rebuild_tensor_v2(context: Context, storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, metadata: Any = None) -> np.ndarray:
  del requires_grad, backward_hooks  # autograd bookkeeping has no numpy counterpart
  _check_metadata(context, metadata)
  return _tensor_from_storage(context, storage, storage_offset, size, stride)


def _rebuild_tensor_v3(context: Context, storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any, metadata: Any = None) -> np.ndarray:
  del requires_grad, backward_hooks
  _check_metadata(context, metadata)
  if not isinstance(dtype, TorchDtype):
    raise context.refuse(f'tensor dtype {describe(dtype)} is not a torch dtype')
  return _tensor_from_storage(context, storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(context: Context, data: Any, requires_grad: Any, backward_hooks: Any,
                       state: Any = None) -> np.ndarray:
  del requires_grad, backward_hooks, state  # `state`: Python attributes set on the Parameter object
  if not isinstance(data, np.ndarray):
    raise context.refuse(f'a parameter wraps {describe(data)}, not a tensor')
  return data


def _reconstruct_persistent_obj(context: Context, meta: Any) -> PersistentObject:
  """A record of the persistent object instead of exec'ing `meta['module_src']`."""
  if (type(meta) is not dict or not is_one_of(meta.get('type'), 'class')
      or type(meta.get('class_name')) is not str or type(meta.get('state')) is not dict):
    raise context.refuse(f'malformed persistent-object record ({describe(meta)})')
  return PersistentObject(meta['class_name'][:200], meta.get('version'), meta.get('module_src'),
                          meta['state'])


def _reconstructor(context: Context, cls: Any, base: Any, state: Any) -> TorchModule:
  """`copyreg._reconstructor` (protocols 0 and 1), limited to the torch.nn container stubs."""
  if not _is_container_class(cls) or base is not _OBJECT or state is not None:
    raise UnsafePickleError(f"refusing 'copyreg._reconstructor' of {describe(cls)} in {context.source}: "
                            'only torch.nn container stubs may be reconstructed')
  return cls.new(context)


def _torch_size(context: Context, dims: Any = ()) -> tuple[int, ...]:
  return check_shape(context, dims, 'torch.Size')


def _torch_device(context: Context, kind: Any, index: Any = None) -> str:
  """`torch.device` as its string form, e.g. 'cuda:0'."""
  if type(kind) is not str or len(kind) > 32:
    raise context.refuse(f'torch.device of {describe(kind)}')
  return kind if index is None else f'{kind}:{check_int(context, index, "a device index", 0, 1 << 16)}'


def _getattr(context: Context, owner: Any, name: Any, *default: Any) -> BoundMethodRef:
  """`builtins.getattr`, tolerated only as a bound-method reference on a snapshot module."""
  if isinstance(owner, _ModuleTree) and type(name) is str and not default:
    return BoundMethodRef(owner, name)
  raise UnsafePickleError(
      f"refusing 'builtins.getattr' on {describe(owner)} in {context.source}: only bound-method "
      'references on snapshot modules are tolerated')


def _load_from_bytes(context: Context, blob: Any) -> _Storage:
  """`torch.storage._load_from_bytes`: a storage saved as a nested legacy `torch.save` stream."""
  if not isinstance(blob, (bytes, memoryview)):
    raise context.refuse(f'storage blob is {describe(blob)}, not bytes')
  cached = context.blobs.get(id(blob))
  if cached is not None and cached[0] is blob:
    return cached[1]  # the same blob object (a memo reference) is decoded once
  if context.blob_depth >= _MAX_BLOB_DEPTH:
    raise context.refuse('a storage blob inside a storage blob')
  inner = TorchContext(f'{context.source} (storage blob)', context.budget, context.blob_depth + 1)
  storage, _ = _read_legacy(bytes(blob), 0, inner)
  if not isinstance(storage, _Storage):
    raise context.refuse(f'storage blob holds {describe(storage)}, not a storage')
  context.blobs[id(blob)] = (blob, storage)
  return storage


def _is_container_class(value: Any) -> bool:
  return isinstance(value, Class) and value in _CONTAINER_CLASSES


_OBJECT = Marker('builtins.object')
_CONTAINER_CLASSES = {Class(dotted, lambda context, stub=stub: stub()) for dotted, stub in _CONTAINER_STUBS.items()}


def _dill_load_type(context: Context, name: Any) -> Any:
  """`dill._dill._load_type`, limited to the builtin `set` (dill's spelling of the type of an nn.Module's empty
  `_non_persistent_buffers_set`)."""
  if not is_one_of(name, 'set'):
    raise UnsafePickleError(f"refusing 'dill._dill._load_type({describe(name)})' in {context.source}: "
                            "only 'set' is allowed")
  return pickle_lib.PLAIN_GLOBALS['builtins.set']

GLOBALS: dict[str, Any] = {
    **pickle_lib.PLAIN_GLOBALS,
    **pickle_lib.functions({
        'torch_utils.persistence._reconstruct_persistent_obj': _reconstruct_persistent_obj,
        'torch._utils._rebuild_tensor': _rebuild_tensor,
        'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
        'torch._utils._rebuild_tensor_v3': _rebuild_tensor_v3,
        'torch._utils._rebuild_parameter': _rebuild_parameter,
        'torch._utils._rebuild_parameter_with_state': _rebuild_parameter,
        'torch.storage._load_from_bytes': _load_from_bytes,
        'torch.Size': _torch_size,
        'torch.device': _torch_device,
        'copyreg._reconstructor': _reconstructor,
        'builtins.getattr': _getattr,
        'dill._dill._load_type': _dill_load_type,
    }),
    **{f'torch.{name}': StorageType(f'torch.{name}', np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
    'torch.storage.UntypedStorage': StorageType('torch.storage.UntypedStorage', np.dtype(np.uint8)),
    **{f'torch.{name}': TorchDtype(f'torch.{name}', np.dtype(dtype)) for name, dtype in _TORCH_DTYPES.items()},
    **{cls.name: cls for cls in _CONTAINER_CLASSES},
    'dnnlib.util.EasyDict': Class('dnnlib.util.EasyDict', lambda context: EasyDict()),
    'builtins.object': _OBJECT,  # only as copyreg._reconstructor's base
}
# What a torch pickle may name.
ALLOWED_GLOBALS = frozenset(GLOBALS)


# ----------------------------------------------------------------------------------------------------
# torch.save containers.


def _load(data: bytes, start: int, context: Context, table: Optional[dict] = None) -> tuple[Any, int]:
  return pickle_lib.load(data, GLOBALS if table is None else table, context, start)


def _is_legacy_magic(value: Any) -> bool:
  return type(value) is int and value == _LEGACY_MAGIC


def _read_legacy(data: bytes, start: int, context: TorchContext) -> tuple[Any, int]:
  """A legacy `torch.save` stream: magic, version, sys info, the pickle, storage keys, then the bytes.

  One pass: the persistent ids of the pickle give each storage's dtype and size, so its array is
  allocated (within the bytes that remain) while the pickle is read, and filled once the bytes come.
  """
  try:
    magic, pos = _load(data, start, context, {})
  except UnsafePickleError as error:
    raise context.refuse(f'not a torch.save file (no legacy magic number): {error}') from None
  if not _is_legacy_magic(magic):
    raise context.refuse('not a torch.save file (no legacy magic number)')
  version, pos = _load(data, pos, context, {})
  if not (type(version) is int and version == _LEGACY_PROTOCOL):
    raise context.refuse(f'legacy torch.save version {describe(version)}, expected {_LEGACY_PROTOCOL}')
  sys_info, pos = _load(data, pos, context, {})
  if not (type(sys_info) is dict and sys_info.get('little_endian') is True):
    raise context.refuse('only little-endian torch.save files are supported')

  storages: dict[str, _Storage] = {}
  room = [len(data) - pos]  # bytes that may still back storages

  def load_storage(pid: Any) -> _Storage:
    key, dtype, numel = _parse_storage_pid(context, pid)
    storage = storages.get(key)
    if storage is None:
      nbytes = numel * dtype.itemsize
      if nbytes + 8 > room[0]:  # refuse before allocating
        raise context.refuse(f'truncated: storage {key!r} needs {nbytes} bytes, the file has {room[0]} left')
      room[0] -= nbytes + 8
      storage = storages[key] = _new_storage(context, key, dtype, numel, [])
    elif storage.array.dtype != dtype or storage.array.size != numel:
      raise context.refuse(f'storage {key!r} is named with two different types or sizes')
    return storage

  context.storage_loader = load_storage
  result, pos = _load(data, pos, context)
  context.storage_loader = None
  keys, pos = _load(data, pos, context, {})
  if not (type(keys) is list and all(type(key) is str for key in keys)
          and len(keys) == len(storages) and set(keys) == set(storages)):
    raise context.refuse('storage key list does not match the storages the pickle uses')
  for key in keys:
    storage = storages[key]
    if pos + 8 > len(data):
      raise context.refuse(f'truncated: storage {key!r} has no size header')
    numel = int(np.frombuffer(data, '<i8', 1, pos)[0])
    if numel != storage.array.size:
      raise context.refuse(f'storage {key!r} holds {numel} elements, the pickle says {storage.array.size}')
    pos += 8
    if pos + storage.array.nbytes > len(data):
      raise context.refuse(f'truncated: storage data of {key!r} ends past the end of the file')
    _fill_storage(storage, memoryview(data)[pos:pos + storage.array.nbytes])
    pos += storage.array.nbytes
  return result, pos


class _BoundedFile:
  """A read-only view of `size` bytes of a seekable file: reads never ask for more than is there
  (zipfile would otherwise allocate what a crafted directory record announces)."""

  def __init__(self, file: BinaryIO, size: int):
    self.file, self.start, self.size = file, file.tell(), size
    self.name = getattr(file, 'name', None)

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self.file.tell() - self.start

  def seek(self, offset: int, whence: int = 0) -> int:
    base = {0: 0, 1: self.tell(), 2: self.size}[whence]
    target = min(base + offset, self.size)
    if target < 0:
      raise ValueError('seek before the start of the file')
    self.file.seek(self.start + target)
    return target

  def read(self, n: Optional[int] = -1) -> bytes:
    left = max(self.size - self.tell(), 0)
    return self.file.read(left if n is None or n < 0 else min(n, left))


def _read_record(context: Context, archive: zipfile.ZipFile, name: str, nbytes: int) -> np.ndarray:
  """The `nbytes` of zip record `name` in a fresh uint8 array (charged to the budget first)."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise context.refuse(f'record {name} is missing') from None
  if info.file_size != nbytes:
    raise context.refuse(f'record {name} holds {info.file_size} bytes, expected {nbytes}')
  if info.flag_bits & 1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise context.refuse(f'record {name} is encrypted or compressed with an unsupported method')
  if info.file_size > _ZIP_MAX_RATIO * info.compress_size + 1024:
    raise context.refuse(f'record {name} claims {info.file_size} bytes from {info.compress_size} '
                         f'(more than {_ZIP_MAX_RATIO}:1)')
  context.budget.charge(nbytes, f'record {name} of {nbytes} bytes')
  buffer = np.empty(nbytes, np.uint8)
  done = 0
  with archive.open(info) as data:
    while done < nbytes:
      chunk = data.read(min(nbytes - done, 1 << 24))
      if not chunk:
        raise context.refuse(f'truncated: record {name} ends after {done} of {nbytes} bytes')
      buffer[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
      done += len(chunk)
  return buffer


def _zip_directory_size(file: _BoundedFile) -> int:
  """The central-directory size an archive's end record declares (zip64 included), read before
  zipfile builds a record per entry in it; 0 when there is no end record (zipfile then refuses)."""
  tail_size = min(file.size, 22 + (1 << 16))
  file.seek(file.size - tail_size)
  tail = file.read(tail_size)
  at = tail.rfind(b'PK\x05\x06')
  if at < 0 or at + 22 > len(tail):
    return 0
  size = int.from_bytes(tail[at + 12:at + 16], 'little')
  locator = at - 20
  if locator >= 0 and tail[locator:locator + 4] == b'PK\x06\x07':
    file.seek(int.from_bytes(tail[locator + 8:locator + 16], 'little'))
    record = file.read(56)
    if record[:4] == b'PK\x06\x06' and len(record) == 56:
      size = max(size, int.from_bytes(record[40:48], 'little'))
  file.seek(0)
  return size


def _read_zip(file: BinaryIO, context: TorchContext) -> Any:
  """A zip-format `torch.save` file: `<archive>/data.pkl`, one raw `<archive>/data/<key>` per storage.

  Record names are only looked up, never used as paths; sizes come from the pickle's persistent ids
  and must equal the sizes the archive declares.
  """
  bounded = _BoundedFile(file, pickle_lib.remaining_size(file))
  directory = _zip_directory_size(bounded)
  if directory > _ZIP_MAX_DIRECTORY_BYTES:
    raise context.refuse(f'the archive declares a central directory of {directory} bytes, more than '
                         f'{_ZIP_MAX_DIRECTORY_BYTES}')
  with zipfile.ZipFile(bounded) as archive:
    infos = {info.filename: info for info in archive.infolist()}
    pickles = [name for name in infos if name.endswith('/data.pkl') and name.count('/') == 1]
    if len(pickles) != 1:
      raise context.refuse(f'expected one <archive>/data.pkl, found {len(pickles)}')
    prefix = pickles[0][:-len('data.pkl')]
    if prefix + 'byteorder' in infos:
      order = _read_record(context, archive, prefix + 'byteorder', min(infos[prefix + 'byteorder'].file_size, 16))
      if order.tobytes().strip() != b'little':
        raise context.refuse('only little-endian torch.save files are supported')
    data_pkl = _read_record(context, archive, pickles[0], infos[pickles[0]].file_size).tobytes()
    storages: dict[str, _Storage] = {}

    def load_storage(pid: Any) -> _Storage:
      key, dtype, numel = _parse_storage_pid(context, pid)
      storage = storages.get(key)
      if storage is None:  # tensors sharing a storage share its key
        raw = _read_record(context, archive, f'{prefix}data/{key}', numel * dtype.itemsize)
        storage = storages[key] = _Storage(key, raw.view(dtype), None)
        if dtype == np.bool_:
          np.not_equal(raw, 0, out=storage.array)
      elif storage.array.dtype != dtype or storage.array.size != numel:
        raise context.refuse(f'storage {key!r} is named with two different types or sizes')
      return storage

    context.storage_loader = load_storage
    value, _ = _load(data_pkl, 0, context)
    return value


def _read_all(file: BinaryIO, context: Context) -> bytes:
  return pickle_lib.read_exactly(file, pickle_lib.remaining_size(file), context.source)


def _format_of(file: BinaryIO, context: Context) -> str:
  """'zip', 'legacy' (torch.save) or 'pickle', from the first bytes of `file` (position kept)."""
  start = file.tell()
  head = file.read(64)
  file.seek(start)
  if head.startswith(_ZIP_MAGIC):
    return 'zip'
  probe = TorchContext(context.source, pickle_lib.Budget(1 << 16, context.source, explicit=True))
  try:
    magic, _ = _load(head, 0, probe, {})
  except UnsafePickleError:
    return 'pickle'
  return 'legacy' if _is_legacy_magic(magic) else 'pickle'


def read_pickle(path_or_file: PathOrFile, kind: str = 'a pickle', max_bytes: Optional[int] = None) -> Any:
  """The object in a plain pickle of torch objects (no torch.save container), tensors as numpy arrays.

  Persistent networks come back as `PersistentObject`s; nothing outside the allow-list
  (`ALLOWED_GLOBALS`) is resolved, and nothing from the file is executed. Raises FileNotFoundError,
  or UnsafePickleError (naming the file as `kind`) for anything refused.
  """
  def reader(file: BinaryIO, context: TorchContext) -> Any:
    return _load(_read_all(file, context), 0, context)[0]

  return pickle_lib.read_file(path_or_file, reader, kind, max_bytes, TorchContext)


def read_torch_file(path_or_file: PathOrFile, max_bytes: Optional[int] = None) -> Any:
  """The object stored by `torch.save` (zip or legacy format), tensors as numpy arrays.

  Used for SiD `training-state-*.pt` files and pytorch-fid's inception `.pth`; same allow-list and
  errors as `read_pickle`. Contiguous tensors that share a storage come back as views of one array,
  as in torch; strided ones as copies.
  """
  def reader(file: BinaryIO, context: TorchContext) -> Any:
    if _format_of(file, context) == 'zip':
      return _read_zip(file, context)
    return _read_legacy(_read_all(file, context), 0, context)[0]

  return pickle_lib.read_file(path_or_file, reader, 'a torch.save file', max_bytes, TorchContext)


def read_any(path_or_file: PathOrFile, kind: str, max_bytes: Optional[int] = None) -> tuple[str, Any]:
  """(format, object) of a plain pickle or a `torch.save` file, told apart by their first bytes:
  format is 'pickle', 'zip' or 'legacy'."""
  def reader(file: BinaryIO, context: TorchContext) -> tuple[str, Any]:
    form = _format_of(file, context)
    if form == 'zip':
      return form, _read_zip(file, context)
    data = _read_all(file, context)
    return form, (_read_legacy(data, 0, context) if form == 'legacy' else _load(data, 0, context))[0]

  return pickle_lib.read_file(path_or_file, reader, kind, max_bytes, TorchContext)
