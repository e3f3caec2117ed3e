"""Allow-listed unpickling: every global a pickle names is looked up in a table of inert stand-ins.

Reading never imports what a file names and never runs code from it: a global outside the table
raises `UnsafePickleError` before anything is called. The tables of what a format may name live with
the format (`torch_files.GLOBALS`); here are the unpickler, the read-only records stand-ins are made
of, the stand-ins for plain Python and numpy values (`PLAIN_GLOBALS`) and the error handling shared by
every reader (`read_file`).
"""
import _compat_pickle
import collections
import contextlib
import errno
import os
import pickle
import types
import zipfile
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Union

import numpy as np

PathOrFile = Union[str, os.PathLike, BinaryIO]


class UnsafePickleError(pickle.UnpicklingError):
  """A file names a global outside the snapshot allow-list (or misuses an allowed one)."""


# Stand-ins are shared by every read, so a pickle's BUILD opcode (setattr on whatever is on the stack)
# must not be able to patch them: classes get this metaclass, functions the wrapper below.
class ReadOnlyClass(type):
  """Metaclass whose classes refuse attribute assignment after creation."""

  def __setattr__(cls, name: str, value: Any) -> None:
    raise AttributeError(f'{cls.__name__}.{name} is read-only')

  def __delattr__(cls, name: str) -> None:
    raise AttributeError(f'{cls.__name__}.{name} is read-only')


class ReadOnly:
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


class ReadOnlyFunction(ReadOnly):
  """A stand-in function, wrapped so that BUILD cannot set its __defaults__ and the like."""
  __slots__ = ('function',)
  function: Callable[..., Any]

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.function(*args, **kwargs)


def read_only(stand_ins: Mapping[str, Any]) -> dict[str, Any]:
  """A table of stand-ins with its plain functions wrapped as `ReadOnlyFunction`s."""
  return {name: ReadOnlyFunction(value) if isinstance(value, types.FunctionType) else value
          for name, value in stand_ins.items()}


def plain(value: Any) -> Any:
  """numpy scalars → Python numbers, dict subclasses (EasyDict, OrderedDict) → dict, recursively."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {key: plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(plain(item) for item in value)
  return value


# ----------------------------------------------------------------------------------------------------
# Stand-ins for plain Python and numpy values.


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


def _numpy_names(name: str, value: Any) -> dict[str, Any]:
  # numpy 1.x pickles say numpy.core, numpy 2.x numpy._core.
  return {f'numpy.core.multiarray.{name}': value, f'numpy._core.multiarray.{name}': value}


PLAIN_GLOBALS: dict[str, Any] = read_only({
    'collections.OrderedDict': collections.OrderedDict,
    'numpy.dtype': _numpy_dtype,
    'numpy.ndarray': np.ndarray,
    **_numpy_names('scalar', _numpy_scalar),
    **_numpy_names('_reconstruct', _numpy_reconstruct),
    '_codecs.encode': _codecs_encode,
    'builtins.set': set,
    'builtins.frozenset': frozenset,
    'builtins.slice': slice,
})


# ----------------------------------------------------------------------------------------------------
# The unpickler and the reading of files.


class AllowListUnpickler(pickle.Unpickler):
  """Resolves globals from `allowed` only; `load_persistent` answers persistent ids (e.g. storages).

  Subclasses add stand-ins that need the reader itself (its file name, its storages) in `find_global`.
  """

  def __init__(self, file: BinaryIO, source: str, allowed: Mapping[str, Any],
               load_persistent: Optional[Callable[[Any], Any]] = None):
    super().__init__(file)
    self.source = source
    self._allowed = allowed
    self._load_persistent = load_persistent

  def find_class(self, module: str, name: str) -> Any:
    # Protocol 0-2 pickles written by Python 3 carry Python 2 names (__builtin__, copy_reg).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
      module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return self.find_global(f'{module}.{name}')

  def find_global(self, dotted: str) -> Any:
    """The stand-in for the global `dotted` (`module.name`), or UnsafePickleError."""
    if dotted in self._allowed:
      return self._allowed[dotted]
    raise UnsafePickleError(
        f"refusing to load global '{dotted}' from {self.source}: not an allowed snapshot class")

  def persistent_load(self, pid: Any) -> Any:
    if self._load_persistent is None:
      raise pickle.UnpicklingError(f'{self.source}: persistent id in a plain pickle')
    return self._load_persistent(pid)


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


def read_file(path_or_file: PathOrFile, reader: Callable[[BinaryIO, str], Any], kind: str) -> Any:
  """`reader(file, name)` on a path or open binary file; a malformed file is a ValueError naming it as `kind`.

  Raises FileNotFoundError for a missing path and lets UnsafePickleError through unchanged.
  """
  with _opened(path_or_file) as (file, source):
    try:
      return reader(file, source)
    except UnsafePickleError:
      raise
    except _MALFORMED as error:
      raise ValueError(f'cannot read {source} as {kind}: {error}') from error
