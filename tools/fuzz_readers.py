"""Fuzzing the file readers: mutated pickles and torch.save files, each read in a limited subprocess.

Every case is read by a child process under an address-space limit (1 GB by default) and a time
limit (10 s a case). A case may only be read (`ok`) or refused with `UnsafePickleError` whose cause,
if any, is a property of the bytes (zipfile, struct, codecs errors), never an internal error
(TypeError, AttributeError, KeyError, IndexError, RecursionError, MemoryError, ...). A crash, a
timeout, any other exception or an internal cause fails the run. Cases are batched, one child for
many; after a crash or timeout the child is restarted after the culprit, which is reported.

  python tools/fuzz_readers.py --cases 5000 --seed 0       # fixture pickles + synthetic files

Sources: every fixture pickle under $SIDA_FIXTURES (default ../shared/fixtures), the real torch.save
files in tests/data/official_states, and synthetic plain/zip/legacy files written by
tests/torch_pickles.py. Mutations are byte-level (flips, interesting integers, truncation, deletion,
duplication, splices) and structural: pickle opcodes re-encoded with hostile arguments (lengths
beyond the file, huge memo indices, odd integers), opcodes swapped or inserted (BUILD, SETITEMS,
REDUCE, INST, EXT, deep MARK nesting, allowed globals in wrong places), zip records rewritten with
mutated data.pkl or storages and zip headers mutated, legacy streams mutated in their pickles and
size headers.
"""
import argparse
import collections
import io
import json
import os
import pathlib
import pickle
import pickletools
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Iterator, Optional

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
READERS = ('any', 'torch', 'plain', 'network')  # network: load_snapshot (imports jax)
# Causes of an UnsafePickleError that mean the reader met an input it does not check.
INTERNAL_CAUSES = ('TypeError', 'AttributeError', 'KeyError', 'IndexError', 'NameError', 'AssertionError',
                   'RecursionError', 'MemoryError', 'SystemError', 'UnboundLocalError', 'ZeroDivisionError')


# ----------------------------------------------------------------------------------------------------
# The child: reads cases, prints one JSON line per case.


def _consume(value) -> None:
  """What callers do after reading: module trees walked, state_dicts and kwargs converted."""
  from sida_jax.formats import torch_files  # pylint: disable=import-outside-toplevel
  items = list(value.values())[:64] if isinstance(value, dict) else [value]
  for item in items:
    if isinstance(item, torch_files._ModuleTree):  # pylint: disable=protected-access
      list(item.named_modules())
      item.state_dict()
      if isinstance(item, torch_files.PersistentObject):
        item.init_kwargs  # pylint: disable=pointless-statement
        item.init_args  # pylint: disable=pointless-statement


def _resident_kb(field: str) -> int:
  """This process's resident memory now ('VmRSS') or at its peak ('VmHWM'), in KB. (ru_maxrss is no
  use here: Linux carries the parent's peak across exec.)"""
  import resource  # pylint: disable=import-outside-toplevel
  try:
    with open('/proc/self/status') as status:
      return next(int(line.split()[1]) for line in status if line.startswith(f'{field}:'))
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(cases_path: str, as_limit_mb: int) -> None:
  import resource  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO))
  from sida_jax.formats import pickle as pickle_lib  # pylint: disable=import-outside-toplevel
  from sida_jax.formats import torch_files  # pylint: disable=import-outside-toplevel
  readers = {'any': lambda p: torch_files.read_any(p, 'a snapshot')[1], 'torch': torch_files.read_torch_file,
             'plain': pickle_lib.read_pickle}
  cases = json.loads(pathlib.Path(cases_path).read_text())
  if any(case['reader'] == 'network' for case in cases):  # load_snapshot: imported before measuring
    from sida_jax.formats import snapshot  # pylint: disable=import-outside-toplevel
    readers['network'] = snapshot.load_snapshot
  if as_limit_mb:
    resource.setrlimit(resource.RLIMIT_AS, (as_limit_mb << 20, as_limit_mb << 20))
  start_rss = _resident_kb('VmRSS')
  for case in cases:
    t0 = time.perf_counter()
    record = {'id': case['id']}
    try:
      _consume(readers[case['reader']](case['path']))
      record['outcome'] = 'ok'
    except pickle_lib.UnsafePickleError as error:
      cause = type(error.__cause__).__name__ if error.__cause__ is not None else None
      record.update(outcome='internal' if cause in INTERNAL_CAUSES else 'refused', cause=cause,
                    message=str(error)[-300:])
    except FileNotFoundError as error:
      record.update(outcome='refused', cause='FileNotFoundError', message=str(error)[-300:])
    except BaseException as error:  # pylint: disable=broad-except
      record.update(outcome='error', cause=type(error).__name__, message=str(error)[-300:])
    record['seconds'] = time.perf_counter() - t0
    record['rss_growth_mb'] = (_resident_kb('VmHWM') - start_rss) / 1024  # peak since start, upper bound
    print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------------
# The parent: batches, limits, restarts.


def run_cases(cases: list[dict], timeout_s: float = 10.0, as_limit_mb: int = 1024) -> list[dict]:
  """Reads every case ({'id', 'path', 'reader'}) in children; one result dict per case, in order.

  `outcome` is 'ok', 'refused', 'internal' (refused, but through an internal error), 'error' (an
  exception other than UnsafePickleError), 'crash' (the child died) or 'timeout'.
  """
  results: dict = {}
  remaining = list(cases)
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
  while remaining:
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as listing:
      json.dump(remaining, listing)
    child = subprocess.Popen([sys.executable, __file__, '--child', listing.name, '--as-limit-mb', str(as_limit_mb)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    done = 0
    deadline = time.monotonic() + timeout_s + 15.0  # the first case also pays for the imports
    failure = None
    while done < len(remaining):
      if not selector.select(timeout=max(deadline - time.monotonic(), 0.01)):
        if time.monotonic() >= deadline:
          failure = 'timeout'
          break
        continue
      line = child.stdout.readline()
      if not line:
        failure = 'crash'
        break
      record = json.loads(line)
      results[record['id']] = record
      done += 1
      deadline = time.monotonic() + timeout_s
    if failure:
      child.kill()
    child.wait()
    stderr = child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    os.unlink(listing.name)
    if failure:
      culprit = remaining[done]
      results[culprit['id']] = {'id': culprit['id'], 'outcome': failure,
                                'message': f'exit code {child.returncode}; {stderr[-500:]}'}
      done += 1
    remaining = remaining[done:]
  return [results[case['id']] for case in cases]


# ----------------------------------------------------------------------------------------------------
# Mutations.

_INTERESTING = [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fffffff, 0x80000000, 0xffffffff,
                1 << 32, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
_HOSTILE_OPS = [b'b', b'u', b's', b'a', b'e', b'R', b'\x81', b'\x92', b'i', b'o', b'\x82', b'\x93', b'0', b'1',
                b'2', b'(', b'.', b'\x91', b'\x90', b'\x97', b'\x98', b'P', b'Q', b'\x94', b'N', b')', b']', b'}',
                b'\x8f', b't', b'l', b'd']


def _global(module: str, name: str) -> bytes:
  return b'c' + f'{module}\n{name}\n'.encode()


def _stack_global(module: str, name: str) -> bytes:
  def text(s):
    data = s.encode()
    return b'\x8c' + bytes([len(data)]) + data
  return text(module) + text(name) + b'\x93'


_INSERTS = [
    _global('numpy', 'ndarray') + b'(K\x10U\x02u1' + b'N' + b'J\x18\xfc\xff\xfft' + b'R',  # ndarray(16,'u1',None,-1000)
    _global('numpy', 'dtype') + b'(U\x02O8\x89\x88tR' + b'(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ftb',
    _global('numpy', 'dtype') + b'(U\x02V8\x89\x88tR',
    _global('numpy.core.multiarray', '_reconstruct') + _global('numpy', 'ndarray') + b'K\x00\x85C\x01b\x87R'
    + b'(K\x01J\x00\x00\x00\x40\x85' + _global('numpy', 'dtype') + b'(U\x02f8\x89\x88tR' + b'\x89C\x08abcdefght' + b'b',
    _global('builtins', 'getattr') + b')U\x09__class__\x86R',
    _global('torch._utils', '_rebuild_tensor_v2') + b')R',
    _stack_global('torch.storage', '_load_from_bytes') + b'C\x04abcd\x85R',
    b'(' * 5000 + b'N' + b'1' * 4999,
    b']' * 20000 + b'a' * 19999,
    b'}' + b'(' + b'\x8a\x09' + b'\x00' * 8 + b'\x01' + b'N' * 1 + b'u',     # a big-int key
    b'}' + b'G\x7f\xf0\x00\x00\x00\x00\x00\x00' + b'Ns',                       # a float key
    b'\x8f(' + b'J\x01\x00\x00\x00' * 100 + b'\x90',
    b'r\xff\xff\xff\xff' + b'j\xff\xff\xff\xff',                              # huge memo indices
    b'\x8e' + struct.pack('<Q', 1 << 40),                                      # BINBYTES8 beyond the file
    b'\x8d' + struct.pack('<Q', (1 << 64) - 1),
    b'\x8b' + struct.pack('<i', 1 << 30),
    b'\x95' + struct.pack('<Q', 1 << 60),
    b'Q', b'P1\n', b'\x82\x01', b'i__builtin__\nobject\n',
]


class Mutator:
  """Random mutations of source files; `cases()` yields (name, bytes) pairs."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self._ops: dict = {}  # (id, start) -> (data, ops) for the sources only, which stay alive

  def choice(self, items):
    return items[int(self.rng.integers(len(items)))]

  def pickle_ops(self, data: bytes, start: int = 0, cache: bool = False) -> Optional[list]:
    """(opcode, argument, position) of the pickle at `data[start:]`, or None if it does not parse."""
    cached = self._ops.get((id(data), start))
    if cached is not None and cached[0] is data:
      return cached[1]
    try:
      ops = [(op, arg, pos + start) for op, arg, pos in pickletools.genops(io.BytesIO(data[start:]))]
    except Exception:  # pylint: disable=broad-except
      ops = None
    if cache:
      self._ops[(id(data), start)] = (data, ops)
    return ops

  def bytes_level(self, data: bytes, others: list) -> bytes:
    n = len(data)
    pos = int(self.rng.integers(max(n, 1)))
    kind = self.choice(['flip', 'interesting', 'truncate', 'delete', 'duplicate', 'splice'])
    if kind == 'flip':
      out = bytearray(data)
      for _ in range(int(self.rng.integers(1, 9))):
        if out:
          out[int(self.rng.integers(len(out)))] = int(self.rng.integers(256))
      return bytes(out)
    if kind == 'interesting':
      value = self.choice(_INTERESTING)
      width = self.choice([1, 2, 4, 8])
      raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, 'little')
      return data[:pos] + raw + data[pos + width:]
    if kind == 'truncate':
      return data[:pos]
    length = int(self.rng.integers(1, 1 + min(4096, max(n - pos, 1))))
    if kind == 'delete':
      return data[:pos] + data[pos + length:]
    if kind == 'duplicate':
      return data[:pos] + data[pos:pos + length] * int(self.rng.integers(2, 5)) + data[pos:]
    other = self.choice(others)
    at = int(self.rng.integers(max(len(other), 1)))
    return data[:pos] + other[at:at + length] + data[pos + length:]

  def structural(self, data: bytes, start: int = 0, cache: bool = False) -> Optional[bytes]:
    ops = self.pickle_ops(data, start, cache)
    if not ops:
      return None
    index = int(self.rng.integers(len(ops)))
    op, arg, pos = ops[index]
    end = ops[index + 1][2] if index + 1 < len(ops) else pos + 1
    kind = self.choice(['length', 'int', 'memo', 'swap', 'insert', 'delete', 'duplicate', 'move'])
    if kind == 'length' and op.name in ('BINBYTES', 'BINUNICODE', 'SHORT_BINBYTES', 'SHORT_BINUNICODE',
                                        'BINBYTES8', 'BINUNICODE8', 'LONG1', 'LONG4', 'FRAME', 'BINSTRING',
                                        'SHORT_BINSTRING', 'BYTEARRAY8'):
      width = {'B': 4, 'X': 4, 'C': 1, '\x8c': 1, '\x8e': 8, '\x8d': 8, '\x8a': 1, '\x8b': 4, '\x95': 8,
               'T': 4, 'U': 1, '\x96': 8}[op.code]
      value = self.choice(_INTERESTING + [len(data), len(data) - pos, int(self.rng.integers(1 << 16))])
      raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, 'little')
      return data[:pos + 1] + raw + data[pos + 1 + width:]
    if kind == 'int' and op.name in ('BININT', 'BININT1', 'BININT2', 'LONG1'):
      value = self.choice([0, -1, -2, 1, 2, 3, 1 << 31, (1 << 31) - 1, -(1 << 31), 1 << 40, 1 << 62, -(1 << 62),
                           int(arg) * 2 if isinstance(arg, int) else 7, int(arg) + 1 if isinstance(arg, int) else 9])
      if -(1 << 31) <= value < (1 << 31):
        new = b'J' + struct.pack('<i', value)
      else:
        raw = value.to_bytes(16, 'little', signed=True)
        new = b'\x8a' + bytes([len(raw)]) + raw
      return data[:pos] + new + data[end:]
    if kind == 'memo' and op.name in ('BINGET', 'BINPUT', 'LONG_BINGET', 'LONG_BINPUT'):
      code = self.choice([b'h', b'j', b'q', b'r'])
      value = self.choice(_INTERESTING + [int(self.rng.integers(64))])
      width = 1 if code in (b'h', b'q') else 4
      return data[:pos] + code + (value & ((1 << (8 * width)) - 1)).to_bytes(width, 'little') + data[end:]
    if kind == 'swap':
      return data[:pos] + self.choice(_HOSTILE_OPS) + data[pos + 1:]
    if kind == 'insert':
      return data[:pos] + self.choice(_INSERTS + _HOSTILE_OPS) + data[pos:]
    if kind == 'delete':
      return data[:pos] + data[end:]
    if kind == 'duplicate':
      stop = ops[min(index + int(self.rng.integers(1, 30)), len(ops) - 1)][2]
      return data[:stop] + data[pos:stop] + data[stop:]
    other = ops[int(self.rng.integers(len(ops)))]
    other_end = next((p for _, _, p in ops if p > other[2]), other[2] + 1)
    return data[:pos] + data[other[2]:other_end] + data[end:]

  def zip_level(self, data: bytes) -> Optional[bytes]:
    """Rewrites a torch.save zip with a mutated data.pkl or storage record."""
    try:
      archive = zipfile.ZipFile(io.BytesIO(data))
      records = [(info, archive.read(info)) for info in archive.infolist()]
    except Exception:  # pylint: disable=broad-except
      return None
    index = int(self.rng.integers(len(records)))
    info, content = records[index]
    if info.filename.endswith('data.pkl'):
      content = self.structural(content) or self.bytes_level(content, [content])
    else:
      content = self.choice([content[:-1], content + b'\0' * 8, b'', content * 2])
    out = io.BytesIO()
    compression = self.choice([zipfile.ZIP_STORED] * 3 + [zipfile.ZIP_DEFLATED])
    renamed = int(self.rng.integers(len(records))) if self.rng.random() < 0.1 else -1
    with zipfile.ZipFile(out, 'w', compression) as rewritten:
      for i, (other_info, other) in enumerate(records):
        info = zipfile.ZipInfo(other_info.filename + ('x' if i == renamed else ''), date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = compression
        rewritten.writestr(info, content if i == index else other)
    return out.getvalue()

  def mutate(self, name: str, data: bytes, others: list, cache: bool = False) -> bytes:
    """One mutation of `data`; `cache` keeps its opcode list (for the sources, which stay alive)."""
    roll = self.rng.random()
    if data[:4] == b'PK\x03\x04' and roll < 0.5:
      mutated = self.zip_level(data)
      if mutated is not None:
        return mutated
    if roll < 0.7:
      start = 0
      if name.startswith('legacy'):  # the main pickle follows three small header pickles
        ops = self.pickle_ops(data, 0, cache)
        start = ops[-1][2] + 1 if ops else 0
        for _ in range(2):
          header_ops = self.pickle_ops(data, start, cache)
          start = header_ops[-1][2] + 1 if header_ops else start
      mutated = self.structural(data, start, cache)
      if mutated is not None:
        return mutated
    return self.bytes_level(data, others)

  def cases(self, sources: dict, count: int, rounds: tuple = (1, 1, 1, 2, 3)) -> Iterator[tuple[str, bytes, str]]:
    """(case name, bytes, reader) for `count` mutants of `sources` ({name: (bytes, reader)})."""
    names = sorted(sources)
    others = [sources[n][0] for n in names]
    for i in range(count):
      name = names[i % len(names)]
      data, reader = sources[name]
      for round_ in range(self.choice(list(rounds))):
        data = self.mutate(name, data, others, cache=round_ == 0)
      yield f'{i:05d}-{name}', data, reader


# ----------------------------------------------------------------------------------------------------
# Sources.


def default_sources() -> dict:
  """{name: (bytes, reader)}: fixture pickles, real torch.save files and synthetic ones."""
  sys.path.insert(0, str(REPO / 'tests'))
  import torch_pickles  # pylint: disable=import-outside-toplevel
  sources = {}
  fixtures = pathlib.Path(os.environ.get('SIDA_FIXTURES', REPO.parent / 'shared' / 'fixtures'))
  for path in sorted(fixtures.glob('*/*.pkl')):
    sources[f'fixture-{path.stem}'] = (path.read_bytes(), 'any')
  for path in sorted((REPO / 'tests' / 'data' / 'official_states').glob('*.pt*')):
    sources[f'{"legacy" if path.suffix == ".pth" else "zip"}-official-{path.stem}'] = (path.read_bytes(), 'torch')
  sources.update(synthetic_sources(torch_pickles))
  return sources


def synthetic_sources(torch_pickles) -> dict:
  """Small plain, zip and legacy torch files with strided, shared, bf16/bool/int tensors and modules."""
  rng = np.random.default_rng(0)
  storages = [torch_pickles.Storage(rng.normal(size=24).astype(np.float32), key='1'),
              torch_pickles.Storage(rng.normal(size=12).astype(np.float16), key='2'),
              torch_pickles.Storage(np.arange(10, dtype=np.int64), key='3')]
  tensors = {}
  for s in storages:
    tensors[f'{s.key}/c'] = torch_pickles.Tensor.view_of(s, s.array[2:8].reshape(2, 3), parameter=True)
    tensors[f'{s.key}/t'] = torch_pickles.Tensor.view_of(s, s.array[:6].reshape(2, 3).T)
  module = torch_pickles.Persistent('Net', {
      '_parameters': collections.OrderedDict(w=tensors['1/c']), '_buffers': collections.OrderedDict(),
      '_modules': collections.OrderedDict(), '_init_args': (),
      '_init_kwargs': torch_pickles.EasyDict(channels=np.int64(3), scale=np.float64(0.5))})
  obj = {'ema': module, 'tensors': tensors, 'step': 3, 'array': np.arange(6.0).reshape(2, 3).T}
  sources = {f'plain-p{p}': (torch_pickles.plain_pickle(obj, p), 'any') for p in (2, 4)}
  sources['legacy-synthetic'] = (torch_pickles.legacy_torch_save({'tensors': tensors, 'net': module}), 'torch')
  with tempfile.TemporaryDirectory() as tmp:
    torch_pickles.zip_torch_save({'tensors': tensors, 'net': module}, pathlib.Path(tmp) / 'a.pt')
    sources['zip-synthetic'] = ((pathlib.Path(tmp) / 'a.pt').read_bytes(), 'torch')
  stats = {'fid': {'mu': rng.normal(size=8), 'sigma': np.eye(8)}, 'num_images': 50000}
  sources['plain-stats-p5'] = (pickle.dumps(stats, protocol=5), 'plain')
  return sources


def fuzz(sources: dict, count: int, seed: int, folder: pathlib.Path, timeout_s: float = 10.0,
         as_limit_mb: int = 1024) -> list[dict]:
  """Writes `count` mutants into `folder`, reads them all; the results, with case names."""
  cases = []
  for name, data, reader in Mutator(seed).cases(sources, count):
    path = folder / f'{name}.bin'
    path.write_bytes(data)
    cases.append({'id': name, 'path': str(path), 'reader': reader})
  return run_cases(cases, timeout_s, as_limit_mb)


def failures(results: list[dict]) -> list[dict]:
  return [r for r in results if r['outcome'] not in ('ok', 'refused')]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--timeout-s', type=float, default=10.0)
  parser.add_argument('--as-limit-mb', type=int, default=1024)
  parser.add_argument('--keep', type=pathlib.Path, help='folder to keep the failing cases in')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.as_limit_mb)
    return 0
  sources = default_sources()
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    results = fuzz(sources, args.cases, args.seed, pathlib.Path(tmp), args.timeout_s, args.as_limit_mb)
    bad = failures(results)
    if bad and args.keep:
      args.keep.mkdir(parents=True, exist_ok=True)
      for r in bad:
        (args.keep / f'{r["id"]}.bin').write_bytes((pathlib.Path(tmp) / f'{r["id"]}.bin').read_bytes())
  outcomes = collections.Counter(r['outcome'] for r in results)
  causes = collections.Counter(r.get('cause') for r in results if r['outcome'] == 'refused')
  timed = [r['seconds'] for r in results if 'seconds' in r]
  slowest = max((r for r in results if 'seconds' in r), key=lambda r: r['seconds'])
  print(f'{len(results)} cases from {len(sources)} sources in {time.time() - t0:.0f} s (seed {args.seed})')
  print('outcomes:', dict(outcomes))
  print('causes of refusals:', dict(causes))
  print(f'slowest case {max(timed):.2f} s ({slowest["id"]}); median {float(np.median(timed)):.3f} s; '
        f'largest resident-memory growth of a child {max(r.get("rss_growth_mb", 0) for r in results):.0f} MB')
  for r in bad:
    print('FAILED', r)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
