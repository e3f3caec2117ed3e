"""host_memory.release: freed heap memory goes back to the operating system (glibc), measured on a child
process's resident size; elsewhere it is a no-op."""
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sida_jax import host_memory  # noqa: E402

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from sida_jax import host_memory

def resident_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20

base = resident_mib()
blocks = [bytearray(4000) for _ in range(60000)]     # ~240 MB in malloc'ed (not mmap'ed) blocks
keep = bytearray(4000)                               # allocated last: the heap top stays in use
for block in blocks:
  block[::4096 // 2] = b"x" * len(block[::4096 // 2])   # touch every page
allocated = resident_mib()
del blocks
freed = resident_mib()
released = host_memory.release()
after = resident_mib()
print(base, allocated, freed, after, int(released))
"""


@pytest.mark.skipif(not host_memory.available(), reason="this C library has no malloc_trim (not glibc)")
def test_release_returns_freed_heap_memory_to_the_system():
  done = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  base, allocated, freed, after, released = (float(v) for v in done.stdout.split())
  assert allocated - base > 200                    # the blocks were resident
  assert freed - base > 150                        # and stayed so after they were freed (kept in the heap)
  assert released == 1 and after - base < 50       # until release() gave them back

