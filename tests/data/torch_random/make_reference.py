"""Writes draws.npz: what torch.Generator('cpu') draws for the official scripts' per-seed pattern.

Run once with torch installed (x86-64 with AVX2, the CPU capability whose `normal_` sida_jax reproduces):

    python tests/data/torch_random/make_reference.py

For every seed s and shape: `g = torch.Generator().manual_seed(s % 2**32)`, `torch.randn(shape, generator=g)`,
and, from fresh generators, the same randn followed by `torch.randint(label_dim, size=[], generator=g)` for each
label_dim. Draws of at most 128 elements are stored whole; larger ones as the SHA-256 of their float32 bytes
(C order) plus a few slices, so the file stays small.
"""
import hashlib
import os

import numpy as np
import torch

SEEDS = [0, 1, 2, 42, 12345, 999_999, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 123]
SHAPES = [(1,), (2,), (3,), (5,), (15,), (16,), (17,), (31,), (32,), (33,), (47,), (2, 3, 4, 4), (1, 28, 28),
          (3, 32, 32), (3, 64, 64), (4, 64, 64)]
LABEL_DIMS = [10, 1000, 2**28 + 3]   # the last one takes torch's 64-bit randint path
FULL_MAX = 128


def slices(numel):
  """The elements stored next to the hash of a large draw."""
  return {"head": slice(0, 16), "mid": slice(numel // 2, numel // 2 + 16), "tail": slice(numel - 16, numel)}


def draw(seed, shape, label_dim=0):
  g = torch.Generator().manual_seed(int(seed) % (1 << 32))
  z = torch.randn(shape, generator=g).numpy()
  label = int(torch.randint(label_dim, size=[], generator=g)) if label_dim else None
  return z, label


def main():
  out = {"seeds": np.array(SEEDS, np.uint64), "label_dims": np.array(LABEL_DIMS, np.int64),
         "torch_version": np.array(torch.__version__),
         "cpu_capability": np.array(torch.backends.cpu.get_cpu_capability())}
  for k, shape in enumerate(SHAPES):
    out[f"shape_{k}"] = np.array(shape, np.int64)
    draws = np.stack([draw(s, shape)[0].reshape(-1) for s in SEEDS])
    if draws.shape[1] <= FULL_MAX:
      out[f"full_{k}"] = draws
    else:
      out[f"sha256_{k}"] = np.array([hashlib.sha256(d.astype("<f4").tobytes()).hexdigest() for d in draws])
      for name, sl in slices(draws.shape[1]).items():
        out[f"{name}_{k}"] = draws[:, sl]
    out[f"labels_{k}"] = np.array([[draw(s, shape, n)[1] for n in LABEL_DIMS] for s in SEEDS], np.int64)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "draws.npz")
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({os.path.getsize(path)} bytes) with torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
  main()
