"""Writes torch_written.safetensors (with torch's own safetensors writer) and its float32/int values.

Run with an environment that has torch and safetensors:  python tests/data/safetensors/make_reference.py
"""
import pathlib

import numpy as np
import torch
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).resolve().parent


def main():
  gen = torch.Generator().manual_seed(0)
  tensors = {
      'conv.weight': (torch.randn(4, 3, 2, 2, generator=gen) * 3).to(torch.bfloat16),
      'conv.bias': (torch.randn(4, generator=gen) * 1e-3).to(torch.float16),
      'norm.weight': torch.randn(5, generator=gen),
      'steps': torch.arange(-3, 3, dtype=torch.int64),
      'mask': torch.tensor([True, False, True]),
      'scalar': torch.tensor(2.5, dtype=torch.bfloat16),
      'empty': torch.zeros(0, 7, dtype=torch.float16),
  }
  save_file(tensors, HERE / 'torch_written.safetensors', metadata={'format': 'pt'})
  # What a reader must return: half precision widened to float32 exactly, the rest as stored.
  np.savez(HERE / 'torch_written_values.npz',
           **{name: (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
              for name, t in tensors.items()})


if __name__ == '__main__':
  main()
