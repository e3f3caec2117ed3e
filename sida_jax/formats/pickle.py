"""Reading pickles without running them: an opcode interpreter whose globals are inert stand-ins.

Python's unpickler imports and calls whatever a file names, and even with a restricted `find_class`
it still runs BUILD (setattr / `__setstate__`), SETITEMS and APPENDS on whatever is on its stack and
lets numpy constructors see attacker-built arguments. Here every opcode is interpreted by our own
code, and nothing from the file reaches an object that is not ours or a plain Python value:

* a global resolves only through a table of stand-ins (`Function`: REDUCE may call it; `Class`:
  NEWOBJ may instantiate it; anything else is an argument only); any other global is refused;
* SETITEM(S) only fill dicts, APPEND(S) only lists, ADDITEMS only sets, and BUILD only the few
  records that expect a state; dict keys and set members are strings, bytes or small integers;
* numpy dtypes come from a fixed table of plain numeric dtypes (no object, structured or
  datetime dtypes), and arrays are rebuilt from exactly the bytes that back them;
* every allocation is charged to a `Budget` (a multiple of the file size by default) before it is
  made, and nothing here recurses on the file's structure, so no file exhausts memory or the stack;
* whatever goes wrong, the caller sees one exception type: `UnsafePickleError`, a ValueError that
  names the file and the reason (or FileNotFoundError for a missing path).

The formats that pickle torch objects add their own stand-ins (`torch_files.GLOBALS`).
"""
import _compat_pickle
import codecs
import collections
import contextlib
import errno
import io
import os
import struct
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Union

import numpy as np

PathOrFile = Union[str, os.PathLike, BinaryIO]

# Default memory budget of a read: a few times the file, plus room for small files' Python objects.
BUDGET_FILE_MULTIPLE = 4
BUDGET_FLOOR = 32 << 20


class UnsafePickleError(ValueError):
  """A file the readers refuse: a global outside the allow-list, a malformed or truncated file, or
  one that would take more memory than its size justifies. The message names the file and why."""


# ----------------------------------------------------------------------------------------------------
# Read-only records: what stand-ins are made of.


class ReadOnlyClass(type):
  """Metaclass whose classes refuse attribute assignment after creation."""

  def __setattr__(cls, name: str, value: Any) -> None:
    raise AttributeError(f'{cls.__name__}.{name} is read-only')

  def __delattr__(cls, name: str) -> None:
    raise AttributeError(f'{cls.__name__}.{name} is read-only')


class ReadOnly:
  """Slotted record whose fields are set once (no __dict__)."""
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


class Function(ReadOnly):
  """A global that REDUCE may call: `call(context, *args)`, with every argument checked by `call`."""
  __slots__ = ('name', 'call')
  name: str
  call: Callable[..., Any]


class Class(ReadOnly):
  """A global that NEWOBJ (or copyreg._reconstructor) may instantiate: `new(context)`, no arguments."""
  __slots__ = ('name', 'new')
  name: str
  new: Callable[..., Any]


class Marker(ReadOnly):
  """A global that is only ever an argument, e.g. `numpy.ndarray` for numpy's `_reconstruct`."""
  __slots__ = ('name',)
  name: str


def functions(table: Mapping[str, Callable[..., Any]]) -> dict[str, Function]:
  """{global name: Function} for plain functions `fn(context, *args)`."""
  return {name: Function(name, fn) for name, fn in table.items()}


def describe(value: Any) -> str:
  """A short, safe description of a value from a file, for messages (never a full repr)."""
  if value is None or isinstance(value, (bool, float)):
    return repr(value)
  if isinstance(value, int):
    return repr(value) if abs(value) < 10**18 else 'a huge int'
  if isinstance(value, str):
    return repr(value[:60]) + ('...' if len(value) > 60 else '')
  if isinstance(value, (Function, Class, Marker)):
    return value.name
  return f'a {type(value).__name__}'


# ----------------------------------------------------------------------------------------------------
# The budget of a read.


class Budget:
  """Bytes a read may still materialise; every allocation is charged before it is made."""

  def __init__(self, limit: int, source: str, explicit: bool):
    self.limit, self.used, self.source, self.explicit = limit, 0, source, explicit

  @classmethod
  def for_file(cls, size: int, source: str, max_bytes: Optional[int] = None) -> 'Budget':
    if max_bytes is not None:
      return cls(int(max_bytes), source, explicit=True)
    return cls(BUDGET_FILE_MULTIPLE * size + BUDGET_FLOOR, source, explicit=False)

  def charge(self, nbytes: int, what: str) -> None:
    self.used += nbytes
    if self.used > self.limit:
      rule = ('max_bytes' if self.explicit else
              f'{BUDGET_FILE_MULTIPLE} x the file size + {BUDGET_FLOOR >> 20} MiB; pass max_bytes to raise it')
      raise UnsafePickleError(f'{self.source}: {what} would take the read past its memory limit of '
                              f'{self.limit} bytes ({rule})')


class Context:
  """What stand-ins see of a read: the file's name, the budget, and the answer to persistent ids."""

  def __init__(self, source: str, budget: Budget):
    self.source = source
    self.budget = budget

  def refuse(self, reason: str) -> UnsafePickleError:
    return UnsafePickleError(f'{self.source}: {reason}')

  def persistent_load(self, pid: Any) -> Any:
    raise self.refuse(f'persistent id ({describe(pid)}) in a plain pickle')

  def build(self, obj: Any, state: Any) -> Any:
    """BUILD: the object that replaces `obj` once `state` is applied (usually `obj` itself)."""
    builder = getattr(type(obj), 'build_from_state', None)
    if builder is not None:
      return builder(obj, self, state)
    if isinstance(obj, np.dtype):
      _check_dtype_state(self, obj, state)
      return obj
    if type(obj) is collections.OrderedDict and _is_str_dict(state):
      obj.__dict__.update(state)  # a state_dict's `_metadata`
      return obj
    raise self.refuse(f'BUILD on {describe(obj)} with {describe(state)}')


def _is_str_dict(value: Any) -> bool:
  return type(value) is dict and all(type(key) is str for key in value)


def is_one_of(value: Any, *options: Any) -> bool:
  """`value in options` for str/int/bool options, without calling a foreign object's __eq__."""
  return type(value) in (str, int, bool, bytes) and value in options


def check_int(context: Context, value: Any, what: str, low: int = 0, high: int = 1 << 62) -> int:
  """`value` as a Python int in [low, high), or a refusal naming `what`."""
  if type(value) is not int or not low <= value < high:
    raise context.refuse(f'{what} is {describe(value)}, not an integer in [{low}, {high})')
  return value


def check_shape(context: Context, shape: Any, what: str) -> tuple[int, ...]:
  if type(shape) is not tuple or len(shape) > 32:
    raise context.refuse(f'{what} is {describe(shape)}, not a tuple of at most 32 sizes')
  return tuple(check_int(context, n, f'a size in {what}', 0, 1 << 48) for n in shape)


# ----------------------------------------------------------------------------------------------------
# Stand-ins for plain Python and numpy values.

# The only numpy dtypes a file may name: plain numeric ones, by their pickled spec.
NUMPY_DTYPES = {np.dtype(name).str[1:]: np.dtype(name) for name in (
    'bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64',
    'float16', 'float32', 'float64', 'complex64', 'complex128')}
_DTYPE_VALUES = frozenset(NUMPY_DTYPES.values())


def _check_dtype_state(context: Context, dtype: np.dtype, state: Any) -> None:
  # (version, byteorder, subarray, names, fields, itemsize, alignment, flags[, metadata]), all trivial
  # for a plain numeric dtype in native (little-endian) order.
  if (type(state) is not tuple or len(state) not in (8, 9) or not is_one_of(state[0], 3, 4)
      or not is_one_of(state[1], '<', '|', '=') or any(item is not None for item in state[2:5])
      or not all(type(item) is int for item in state[5:8])
      or state[5:8] not in ((-1, -1, 0), (dtype.itemsize, dtype.alignment, 0))
      or (len(state) == 9 and state[8] is not None)):
    raise context.refuse(f'numpy dtype {dtype} with state {describe(state)}: only plain little-endian '
                         'numeric dtypes are read')


def _numpy_dtype(context: Context, spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
  del align, copy  # the state that BUILD applies is checked to be trivial; the singleton is never altered
  if type(spec) is not str or spec not in NUMPY_DTYPES:
    raise context.refuse(f'numpy dtype {describe(spec)}: only plain numeric dtypes are read '
                         '(no object, structured, string or datetime dtypes)')
  return NUMPY_DTYPES[spec]


def check_dtype(context: Context, dtype: Any, what: str) -> np.dtype:
  if not isinstance(dtype, np.dtype) or dtype not in _DTYPE_VALUES:
    raise context.refuse(f'{what} has dtype {describe(dtype)}, not a plain numeric numpy dtype')
  return dtype


def array_from_bytes(context: Context, data: Any, dtype: np.dtype, shape: tuple[int, ...],
                     fortran: bool = False) -> np.ndarray:
  """A fresh writable array of `shape` from exactly `prod(shape) * itemsize` bytes."""
  if isinstance(data, str):
    data = data.encode('latin1')  # Python 2 pickles carry array bytes as str
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise context.refuse(f'numpy array data is {describe(data)}, not bytes (object arrays are not read)')
  count = 1
  for n in shape:
    count *= n
  nbytes = count * dtype.itemsize
  if len(data) != nbytes:
    raise context.refuse(f'numpy array of shape {shape} and dtype {dtype} needs {nbytes} bytes, '
                         f'the file gives {len(data)}')
  context.budget.charge(nbytes, f'a numpy array of {nbytes} bytes')
  flat = np.frombuffer(data, dtype, count)
  if dtype == np.bool_:
    flat = flat.view(np.uint8) != 0  # only 0 and 1 are valid numpy booleans
  return flat.reshape(shape, order='F' if fortran else 'C').copy(order='K')


class PendingArray(ReadOnly):
  """What numpy's `_reconstruct` returns: an array that the following BUILD replaces."""
  __slots__ = ()

  def build_from_state(self, context: Context, state: Any) -> np.ndarray:
    if type(state) is tuple and len(state) == 5:
      state = state[1:] if type(state[0]) is int else (None,)
    if type(state) is not tuple or len(state) != 4:
      raise context.refuse(f'numpy array state is {describe(state)}')
    shape, dtype, fortran, data = state
    shape = check_shape(context, shape, 'a numpy array shape')
    dtype = check_dtype(context, dtype, 'a numpy array')
    if type(fortran) is not bool:
      raise context.refuse(f'numpy array order flag is {describe(fortran)}')
    return array_from_bytes(context, data, dtype, shape, fortran)


def _numpy_reconstruct(context: Context, subtype: Any, shape: Any, typecode: Any) -> PendingArray:
  del shape, typecode  # always (0,) and b'b': the array comes from the BUILD state
  if subtype is not _NDARRAY:
    raise context.refuse(f'numpy array of subtype {describe(subtype)}: only numpy.ndarray is read')
  return PendingArray()


def _numpy_frombuffer(context: Context, data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  """`numpy.core.numeric._frombuffer`, as protocol 5 pickles numpy arrays."""
  if not is_one_of(order, 'C', 'F'):
    raise context.refuse(f'numpy array order {describe(order)}')
  return array_from_bytes(context, data, check_dtype(context, dtype, 'a numpy array'),
                          check_shape(context, shape, 'a numpy array shape'), order == 'F')


def _numpy_scalar(context: Context, dtype: Any, data: Any = None) -> Any:
  """`numpy.core.multiarray.scalar`: a numpy scalar from its dtype and raw bytes."""
  dtype = check_dtype(context, dtype, 'a numpy scalar')
  if not isinstance(data, (bytes, str)):
    raise context.refuse(f'numpy scalar data is {describe(data)}, not bytes')
  return array_from_bytes(context, data, dtype, ())[()]


def _codecs_encode(context: Context, text: Any, encoding: Any = 'utf-8') -> bytes:
  """`_codecs.encode`, as protocols 0-2 use it to carry bytes: latin-1 only."""
  if type(text) is not str or not is_one_of(encoding, 'latin1', 'latin-1'):
    raise context.refuse(f'_codecs.encode of {describe(text)} as {describe(encoding)}: only latin-1 text')
  context.budget.charge(len(text), 'a byte string')
  return text.encode('latin1')


def _ordered_dict(context: Context, *args: Any) -> collections.OrderedDict:
  if args:  # OrderedDict pickles as OrderedDict() followed by SETITEMS
    raise context.refuse('collections.OrderedDict with arguments')
  return collections.OrderedDict()


def _set_of(kind: type) -> Callable[..., Any]:
  def make(context: Context, items: Any = ()) -> Any:
    if type(items) not in (list, tuple):
      raise context.refuse(f'{kind.__name__} of {describe(items)}')
    for item in items:
      check_key(context, item)
    context.budget.charge(64 * len(items) + 256, f'a {kind.__name__}')
    return kind(items)
  return make


def _slice(context: Context, *args: Any) -> slice:
  if len(args) > 3 or not all(arg is None or type(arg) is int for arg in args):
    raise context.refuse('slice of non-integers')
  return slice(*args)


def _numpy_names(name: str, value: Any) -> dict[str, Any]:
  # numpy 1.x pickles say numpy.core, numpy 2.x numpy._core.
  return {f'numpy.core.{name}': value, f'numpy._core.{name}': value}


_NDARRAY = Marker('numpy.ndarray')

PLAIN_GLOBALS: dict[str, Any] = {
    **functions({
        'collections.OrderedDict': _ordered_dict,
        'numpy.dtype': _numpy_dtype,
        **_numpy_names('multiarray.scalar', _numpy_scalar),
        **_numpy_names('multiarray._reconstruct', _numpy_reconstruct),
        **_numpy_names('numeric._frombuffer', _numpy_frombuffer),
        '_codecs.encode': _codecs_encode,
        'builtins.set': _set_of(set),
        'builtins.frozenset': _set_of(frozenset),
        'builtins.slice': _slice,
    }),
    'numpy.ndarray': _NDARRAY,
}


# ----------------------------------------------------------------------------------------------------
# Keys: what may be hashed. Strings and bytes hash with a random seed; small ints hash to themselves.
# Floats, big ints and tuples hash predictably, and a file of colliding keys would take quadratic time.

_SMALL_INT = 1 << 31


def check_key(context: Context, key: Any) -> Any:
  if (type(key) in (str, bytes, bool) or key is None
      or (type(key) is int and -_SMALL_INT <= key < _SMALL_INT)):
    return key
  raise context.refuse(f'dict key or set member {describe(key)}: only strings, bytes and small '
                       'integers are read as keys')


# ----------------------------------------------------------------------------------------------------
# The interpreter.

_MARK = object()
_LONG_MAX_BYTES = 64          # LONG1/LONG4 beyond this is no integer any of our formats holds
_LINE_MAX = 1 << 16           # text opcodes (protocol 0): GLOBAL, INT, FLOAT, GET, ...
_INLINE_BYTES_MAX = 1 << 16   # bigger byte strings are read-only views of the file, not copies
_MEMO_INDEX_MAX = 1 << 32
_OBJECT_COST = 64             # bytes charged per Python object the file creates
_ITEM_COST = 16               # ... and per item put into a container

_REFUSED_OPCODES = {
    b'i'[0]: 'INST (Python 2 classes)', b'o'[0]: 'OBJ (Python 2 classes)',
    0x82: 'EXT1 (extension registry)', 0x83: 'EXT2 (extension registry)', 0x84: 'EXT4 (extension registry)',
    0x97: 'NEXT_BUFFER (out-of-band buffers)',
}


class Unpickler:
  """One pickle, interpreted from `data[start:]` with the globals of `table` and the hooks of `context`.

  `load()` returns (value, end offset), so that streams of consecutive pickles can be read in turn.
  """

  def __init__(self, data: Union[bytes, bytearray], start: int, table: Mapping[str, Any], context: Context):
    self.data = bytes(data) if not isinstance(data, bytes) else data
    self.view = memoryview(self.data)
    self.pos = start
    self.table = table
    self.context = context
    self.stack: list = []
    self.marks: list = []
    self.memo: dict = {}
    self.pending_memo: dict = {}  # id(PendingArray) -> memo indices holding it, rewritten by BUILD

  # --- reading the opcode stream ---

  def refuse(self, reason: str) -> UnsafePickleError:
    return self.context.refuse(f'{reason} (pickle offset {self.pos})')

  def take(self, n: int) -> memoryview:
    if n < 0 or n > len(self.data) - self.pos:
      raise self.refuse(f'truncated: {n} bytes announced, {len(self.data) - self.pos} left')
    chunk = self.view[self.pos:self.pos + n]
    self.pos += n
    return chunk

  def unpack(self, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, self.take(size))[0]

  def line(self) -> bytes:
    end = self.data.find(b'\n', self.pos, self.pos + _LINE_MAX)
    if end < 0:
      raise self.refuse('truncated or overlong text line')
    text = self.data[self.pos:end]
    self.pos = end + 1
    return text

  def charge(self, nbytes: int, what: str) -> None:
    self.context.budget.charge(nbytes, what)

  # --- the stack ---

  def push(self, value: Any) -> None:
    self.stack.append(value)

  def pop(self) -> Any:
    if not self.stack:
      raise self.refuse('stack underflow')
    return self.stack.pop()

  def top(self) -> Any:
    if not self.stack:
      raise self.refuse('stack underflow')
    return self.stack[-1]

  def pop_mark(self) -> list:
    if not self.marks:
      raise self.refuse('no MARK to pop to')
    items = self.stack
    self.stack = self.marks.pop()
    return items

  def new_bytes(self, n: int) -> Any:
    chunk = self.take(n)
    if n > _INLINE_BYTES_MAX:
      self.charge(_OBJECT_COST * 4, 'a byte string')
      return chunk  # a read-only view of the file: large blobs are never copied
    self.charge(n + _OBJECT_COST, 'a byte string')
    return bytes(chunk)

  def new_str(self, raw: Any, encoding: str = 'utf-8') -> str:
    try:
      text = str(raw, encoding, 'surrogatepass') if encoding == 'utf-8' else str(raw, encoding)
    except UnicodeDecodeError:
      raise self.refuse(f'text that is not valid {encoding}') from None
    self.charge((len(text) if text.isascii() else 4 * len(text)) + _OBJECT_COST, 'a string')
    return text

  def new_int(self, raw: Any) -> int:
    if len(raw) > _LONG_MAX_BYTES:
      raise self.refuse(f'integer of {len(raw)} bytes')
    return int.from_bytes(raw, 'little', signed=True)

  def resolve(self, module: Any, name: Any) -> Any:
    if type(module) is not str or type(name) is not str:
      raise self.refuse(f'global named by {describe(module)} and {describe(name)}, not two strings')
    if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (__builtin__, copy_reg)
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
      module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    dotted = f'{module}.{name}'
    if dotted not in self.table:
      raise UnsafePickleError(f"refusing to load global '{dotted[:200]}' from {self.context.source}: "
                              'not an allowed snapshot class')
    return self.table[dotted]

  def add_to(self, container: Any, items: list, kind: str) -> None:
    self.charge(_ITEM_COST * len(items), 'container items')
    if kind == 'list':
      if type(container) is not list:
        raise self.refuse(f'APPEND to {describe(container)}')
      container.extend(items)
    elif kind == 'dict':
      if type(container) not in _DICT_TYPES:
        raise self.refuse(f'SETITEM on {describe(container)}')
      if len(items) % 2:
        raise self.refuse('SETITEMS with a key and no value')
      for i in range(0, len(items), 2):
        container[check_key(self.context, items[i])] = items[i + 1]
    else:
      if type(container) is not set:
        raise self.refuse(f'ADDITEMS on {describe(container)}')
      container.update(check_key(self.context, item) for item in items)

  def memo_put(self, index: int, value: Any) -> None:
    if not 0 <= index < _MEMO_INDEX_MAX:
      raise self.refuse(f'memo index {describe(index)}')
    self.charge(_ITEM_COST, 'memo entries')
    self.memo[index] = value
    if isinstance(value, PendingArray):
      self.pending_memo.setdefault(id(value), []).append(index)

  def memo_get(self, index: int) -> None:
    if index not in self.memo:
      raise self.refuse(f'memo index {describe(index)} was never stored')
    self.charge(8, 'stack entries')
    self.push(self.memo[index])

  def call(self, func: Any, args: Any) -> Any:
    if not isinstance(func, Function):
      raise self.refuse(f'REDUCE calls {describe(func)}, which is not an allowed function')
    if type(args) is not tuple:
      raise self.refuse(f'REDUCE arguments are {describe(args)}, not a tuple')
    self.charge(_OBJECT_COST, 'objects')
    try:
      return func.call(self.context, *args)
    except TypeError as error:  # wrong number of arguments; every stand-in checks its argument types
      if error.__traceback__ is not None and error.__traceback__.tb_next is not None:
        raise
      raise self.refuse(f'{func.name} called with {len(args)} arguments') from None

  def instantiate(self, cls: Any, args: Any) -> Any:
    if not isinstance(cls, Class):
      raise self.refuse(f'NEWOBJ of {describe(cls)}, which is not an allowed class')
    if type(args) is not tuple or args:
      raise self.refuse(f'NEWOBJ of {cls.name} with arguments')
    self.charge(_OBJECT_COST, 'objects')
    return cls.new(self.context)

  # --- the loop ---

  def load(self) -> tuple[Any, int]:
    dispatch = _DISPATCH
    data = self.data
    while True:
      if self.pos >= len(data):
        raise self.refuse('truncated: the pickle ends without STOP')
      code = data[self.pos]
      self.pos += 1
      if code == 0x2e:  # STOP
        if len(self.stack) != 1 or self.marks:
          raise self.refuse('STOP with an unbalanced stack')
        return self.stack[0], self.pos
      handler = dispatch.get(code)
      if handler is None:
        name = _REFUSED_OPCODES.get(code)
        raise self.refuse(f'opcode {name}' if name else f'unknown opcode 0x{code:02x}')
      handler(self)


_DICT_TYPES: set = {dict, collections.OrderedDict}


def register_dict_type(cls: type) -> type:
  """Lets SETITEM(S) fill instances of `cls` (a dict subclass of ours, e.g. EasyDict)."""
  _DICT_TYPES.add(cls)
  return cls


def _op_proto(u: Unpickler) -> None:
  version = u.take(1)[0]
  if version > 5:
    raise u.refuse(f'pickle protocol {version}')


def _op_frame(u: Unpickler) -> None:
  u.take(8)  # a frame's length is a buffering hint; every read is bounded by the data anyway


def _op_tuple_n(n: int) -> Callable[[Unpickler], None]:
  def op(u: Unpickler) -> None:
    if len(u.stack) < n:
      raise u.refuse('stack underflow')
    items = tuple(u.stack[len(u.stack) - n:])
    del u.stack[len(u.stack) - n:]
    u.charge(_OBJECT_COST + 8 * n, 'tuples')
    u.push(items)
  return op


def _op_tuple(u: Unpickler) -> None:
  items = u.pop_mark()
  u.charge(_OBJECT_COST + 8 * len(items), 'tuples')
  u.push(tuple(items))


def _op_list(u: Unpickler) -> None:
  items = u.pop_mark()
  u.charge(_OBJECT_COST, 'lists')
  u.push([])
  u.add_to(u.stack[-1], items, 'list')


def _op_dict(u: Unpickler) -> None:
  items = u.pop_mark()
  u.charge(_OBJECT_COST, 'dicts')
  u.push({})
  u.add_to(u.stack[-1], items, 'dict')


def _op_empty(factory: Callable[[], Any], cost: int) -> Callable[[Unpickler], None]:
  def op(u: Unpickler) -> None:
    u.charge(cost, 'containers')
    u.push(factory())
  return op


def _op_append(u: Unpickler) -> None:
  value = u.pop()
  u.add_to(u.top(), [value], 'list')


def _op_appends(u: Unpickler) -> None:
  items = u.pop_mark()
  u.add_to(u.top(), items, 'list')


def _op_setitem(u: Unpickler) -> None:
  value = u.pop()
  key = u.pop()
  u.add_to(u.top(), [key, value], 'dict')


def _op_setitems(u: Unpickler) -> None:
  items = u.pop_mark()
  u.add_to(u.top(), items, 'dict')


def _op_additems(u: Unpickler) -> None:
  items = u.pop_mark()
  u.add_to(u.top(), items, 'set')


def _op_frozenset(u: Unpickler) -> None:
  items = u.pop_mark()
  u.charge(256 + _ITEM_COST * len(items), 'frozensets')
  u.push(frozenset(check_key(u.context, item) for item in items))


def _op_mark(u: Unpickler) -> None:
  u.marks.append(u.stack)
  u.stack = []


def _op_pop(u: Unpickler) -> None:
  if u.stack:
    u.stack.pop()
  else:
    u.pop_mark()


def _op_pop_mark(u: Unpickler) -> None:
  u.pop_mark()


def _op_dup(u: Unpickler) -> None:
  u.charge(8, 'stack entries')
  u.push(u.top())


def _op_global(u: Unpickler) -> None:
  module = u.new_str(u.line())
  name = u.new_str(u.line())
  u.push(u.resolve(module, name))


def _op_stack_global(u: Unpickler) -> None:
  name = u.pop()
  module = u.pop()
  u.push(u.resolve(module, name))


def _op_reduce(u: Unpickler) -> None:
  args = u.pop()
  func = u.pop()
  u.push(u.call(func, args))


def _op_newobj(u: Unpickler) -> None:
  args = u.pop()
  cls = u.pop()
  u.push(u.instantiate(cls, args))


def _op_newobj_ex(u: Unpickler) -> None:
  kwargs = u.pop()
  args = u.pop()
  cls = u.pop()
  if type(kwargs) is not dict or kwargs:
    raise u.refuse('NEWOBJ_EX with keyword arguments')
  u.push(u.instantiate(cls, args))


def _op_build(u: Unpickler) -> None:
  state = u.pop()
  obj = u.top()
  built = u.context.build(obj, state)
  if built is not obj:  # a pending numpy array becomes the array, on the stack and in the memo
    u.stack[-1] = built
    for index in u.pending_memo.pop(id(obj), ()):
      if u.memo.get(index) is obj:
        u.memo[index] = built


def _op_persid(u: Unpickler) -> None:
  u.push(u.context.persistent_load(u.new_str(u.line(), 'ascii')))


def _op_binpersid(u: Unpickler) -> None:
  u.push(u.context.persistent_load(u.pop()))


def _op_memoize(u: Unpickler) -> None:
  u.memo_put(len(u.memo), u.top())


def _op_put_text(u: Unpickler) -> None:
  u.memo_put(_text_int(u, u.line()), u.top())


def _op_get_text(u: Unpickler) -> None:
  u.memo_get(_text_int(u, u.line()))


def _text_int(u: Unpickler, text: bytes) -> int:
  if text.endswith(b'L'):
    text = text[:-1]
  if len(text) > 40:
    raise u.refuse(f'integer of {len(text)} digits')
  try:
    return int(text)
  except ValueError:
    raise u.refuse(f'malformed integer {text[:40]!r}') from None


def _op_int(u: Unpickler) -> None:
  text = u.line()
  u.push(text == b'01' if text in (b'00', b'01') else _text_int(u, text))


def _op_float(u: Unpickler) -> None:
  text = u.line()
  try:
    u.push(float(text))
  except ValueError:
    raise u.refuse(f'malformed float {text[:40]!r}') from None


def _op_string(u: Unpickler) -> None:
  text = u.line().rstrip()
  if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b'"', b"'"):
    raise u.refuse('malformed STRING')
  try:
    raw = codecs.escape_decode(text[1:-1])[0]
  except ValueError:
    raise u.refuse('malformed STRING escapes') from None
  u.push(u.new_str(raw, 'latin1'))


def _op_unicode(u: Unpickler) -> None:
  u.push(u.new_str(u.line(), 'raw-unicode-escape'))


def _op_sized(fmt: str, make: str) -> Callable[[Unpickler], None]:
  """Opcodes with a binary length prefix (`fmt`) and `make` in ('bytes', 'str', 'latin1', 'bytearray', 'long')."""
  def op(u: Unpickler) -> None:
    size = u.unpack(fmt)
    if make == 'bytes':
      u.push(u.new_bytes(size))
    elif make == 'bytearray':
      u.charge(size + _OBJECT_COST, 'a bytearray')
      u.push(bytearray(u.take(size)))
    elif make == 'long':
      u.push(u.new_int(u.take(size)))
    else:
      u.push(u.new_str(u.take(size), 'utf-8' if make == 'str' else 'latin1'))
  return op


def _op_const(value: Any) -> Callable[[Unpickler], None]:
  def op(u: Unpickler) -> None:
    u.push(value)
  return op


def _op_unpacked(fmt: str) -> Callable[[Unpickler], None]:
  def op(u: Unpickler) -> None:
    u.push(u.unpack(fmt))
  return op


def _op_readonly_buffer(u: Unpickler) -> None:
  if not isinstance(u.top(), (bytes, bytearray, memoryview)):
    raise u.refuse(f'READONLY_BUFFER on {describe(u.top())}')


def _op_binget(fmt: str) -> Callable[[Unpickler], None]:
  def op(u: Unpickler) -> None:
    u.memo_get(u.unpack(fmt))
  return op


def _op_binput(fmt: str) -> Callable[[Unpickler], None]:
  def op(u: Unpickler) -> None:
    u.memo_put(u.unpack(fmt), u.top())
  return op


_DISPATCH: dict[int, Callable[[Unpickler], None]] = {ord(code) if isinstance(code, str) else code: op
                                                     for code, op in {
    '\x80': _op_proto, '\x95': _op_frame, '(': _op_mark, '0': _op_pop, '1': _op_pop_mark, '2': _op_dup,
    'N': _op_const(None), '\x88': _op_const(True), '\x89': _op_const(False),
    'I': _op_int, 'J': _op_unpacked('<i'), 'K': _op_unpacked('<B'), 'M': _op_unpacked('<H'),
    'L': lambda u: u.push(_text_int(u, u.line())), '\x8a': _op_sized('<B', 'long'),
    '\x8b': _op_sized('<i', 'long'), 'F': _op_float, 'G': _op_unpacked('>d'),
    'S': _op_string, 'T': _op_sized('<i', 'latin1'), 'U': _op_sized('<B', 'latin1'),
    'V': _op_unicode, 'X': _op_sized('<I', 'str'), '\x8c': _op_sized('<B', 'str'),
    '\x8d': _op_sized('<Q', 'str'), 'B': _op_sized('<I', 'bytes'), 'C': _op_sized('<B', 'bytes'),
    '\x8e': _op_sized('<Q', 'bytes'), '\x96': _op_sized('<Q', 'bytearray'), '\x98': _op_readonly_buffer,
    ')': _op_const(()), '\x85': _op_tuple_n(1), '\x86': _op_tuple_n(2), '\x87': _op_tuple_n(3),
    't': _op_tuple, ']': _op_empty(list, _OBJECT_COST), 'l': _op_list, '}': _op_empty(dict, _OBJECT_COST),
    'd': _op_dict, '\x8f': _op_empty(set, 256), '\x91': _op_frozenset,
    'a': _op_append, 'e': _op_appends, 's': _op_setitem, 'u': _op_setitems, '\x90': _op_additems,
    'c': _op_global, '\x93': _op_stack_global, 'R': _op_reduce, '\x81': _op_newobj, '\x92': _op_newobj_ex,
    'b': _op_build, 'P': _op_persid, 'Q': _op_binpersid,
    'g': _op_get_text, 'h': _op_binget('<B'), 'j': _op_binget('<I'),
    'p': _op_put_text, 'q': _op_binput('<B'), 'r': _op_binput('<I'), '\x94': _op_memoize,
}.items()}


def load(data: Union[bytes, bytearray], table: Mapping[str, Any], context: Context,
         start: int = 0) -> tuple[Any, int]:
  """(object, end offset) of the pickle at `data[start:]`, read with the stand-ins of `table`."""
  return Unpickler(data, start, table, context).load()


# ----------------------------------------------------------------------------------------------------
# Converting what was read.


def plain(value: Any, max_items: int = 10_000, max_depth: int = 100) -> Any:
  """numpy scalars → Python numbers, dict subclasses (EasyDict, OrderedDict) → dict, recursively.

  Iterative, so nesting cannot exhaust the stack here; a cycle, nesting deeper than `max_depth`
  (which later recursive code could not handle), or more than `max_items` values (a shared
  sub-structure counts each time it appears) is refused with UnsafePickleError.
  """
  containers = (dict, list, tuple)

  def entries(container: Any) -> Iterator[tuple[Any, Any]]:
    return iter(container.items()) if isinstance(container, dict) else ((None, x) for x in container)

  def finish(container: Any, out: list) -> Any:
    if isinstance(container, dict):
      return dict(out)
    values = [item for _, item in out]
    return tuple(values) if isinstance(container, tuple) else values

  if not isinstance(value, containers):
    return value.item() if isinstance(value, np.generic) else value
  count, on_path, result = 0, {id(value)}, []
  # Frames: (container, its remaining entries, converted entries, where the converted container goes).
  stack = [(value, entries(value), [], result.append)]
  while stack:
    container, remaining, out, attach = stack[-1]
    entry = next(remaining, None)
    if entry is None:
      stack.pop()
      on_path.discard(id(container))
      attach(finish(container, out))
      continue
    count += 1
    if count > max_items:
      raise UnsafePickleError(f'more than {max_items} values in one record: refusing to convert it')
    key, child = entry
    attach_child = lambda item, out=out, key=key: out.append((key, item))
    if isinstance(child, containers):
      if id(child) in on_path:
        raise UnsafePickleError('a record contains itself: refusing to convert it')
      if len(stack) >= max_depth:
        raise UnsafePickleError(f'a record nested deeper than {max_depth}: refusing to convert it')
      on_path.add(id(child))
      stack.append((child, entries(child), [], attach_child))
    else:
      attach_child(child.item() if isinstance(child, np.generic) else child)
  return result[0]


# ----------------------------------------------------------------------------------------------------
# Files.


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
    raise FileNotFoundError(errno.ENOENT, 'file not found', path) from None
  with file:
    yield file, path


def remaining_size(file: BinaryIO) -> int:
  """Bytes from the current position to the end of a seekable file (the position is kept)."""
  start = file.tell()
  end = file.seek(0, io.SEEK_END)
  file.seek(start)
  return end - start


def read_exactly(file: BinaryIO, size: int, source: str) -> bytes:
  """`size` bytes of `file` (the caller has checked that they exist)."""
  data = file.read(size)
  if len(data) != size:
    raise UnsafePickleError(f'{source}: truncated, {len(data)} of {size} bytes')
  return data


# Failures inside a reader that are a property of the file, not a bug: all become UnsafePickleError.
def read_file(path_or_file: PathOrFile, reader: Callable[[BinaryIO, Context], Any], kind: str,
              max_bytes: Optional[int] = None, context_type: type = Context) -> Any:
  """`reader(file, context)` on a path or open binary file; any failure is an UnsafePickleError
  naming the file as `kind`. Raises FileNotFoundError for a missing path."""
  with _opened(path_or_file) as (file, source):
    try:
      size = remaining_size(file)
      context = context_type(source, Budget.for_file(size, source, max_bytes))
      return reader(file, context)
    except UnsafePickleError as error:
      message = str(error)
      message = message[len(source) + 2:] if message.startswith(f'{source}: ') else message
      raise UnsafePickleError(f'cannot read {source} as {kind}: {message}') from None
    except MemoryError as error:
      raise UnsafePickleError(f'cannot read {source} as {kind}: out of memory') from error
    except RecursionError as error:
      raise UnsafePickleError(f'cannot read {source} as {kind}: nested too deeply') from error
    except Exception as error:  # pylint: disable=broad-except  (zipfile, struct, codecs, ... on bad bytes)
      message = str(error)[:300]
      raise UnsafePickleError(f'cannot read {source} as {kind}: {type(error).__name__}: {message}') from error


def read_pickle(path_or_file: PathOrFile, kind: str = 'a pickle', table: Mapping[str, Any] = PLAIN_GLOBALS,
                max_bytes: Optional[int] = None) -> Any:
  """The object in a pickle of plain Python values and numpy arrays (e.g. EDM2 reference statistics).

  Raises FileNotFoundError for a missing path and UnsafePickleError for anything refused.
  """
  def reader(file: BinaryIO, context: Context) -> Any:
    return load(read_exactly(file, remaining_size(file), context.source), table, context)[0]

  return read_file(path_or_file, reader, kind, max_bytes)

