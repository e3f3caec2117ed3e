"""Prompt datasets for text-to-image distillation: a fixed list of prompts read in a deterministic,
resumable, per-process-sharded order.

Sources (`read_prompts(source)`):
  FILE             a text file, one prompt per line. As the official SiD-LSG loader, only the newline is
                   stripped: other whitespace stays, and an empty line is the empty prompt.
  FOLDER           the official layout (`--data_prompt_text`): the first of aesthetics_6_plus.txt,
                   aesthetics_625_plus.txt, aesthetics_65_plus.txt in the folder; else its only `.txt` file.
  tfds:NAME        a prepared tensorflow_datasets builder (never downloaded) read from `data_dir`; every string
                   of its text feature `feature` ('/' separates nested features, e.g. 'captions/text' of
                   coco_captions, whose lists of captions are flattened in order) is one prompt.

The batch order is sida_jax.data's: each epoch is a permutation of all prompts seeded by (seed, epoch),
batches run across epoch boundaries, and batch k (here: 2 per training iteration) is a pure function of
(seed, k), so a resumed run reads exactly the prompts an uninterrupted one would.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np

from sida_jax import data as data_lib

OFFICIAL_FILES = ('aesthetics_6_plus.txt', 'aesthetics_625_plus.txt', 'aesthetics_65_plus.txt')


class PromptDataset:
  """A list of prompts with sida_jax.data's shuffled, shardable, resumable batch order."""

  def __init__(self, name: str, prompts: Sequence[str]):
    if not prompts:
      raise ValueError(f'{name}: no prompts')
    self.name = name
    self.prompts = list(prompts)
    # The order of a labels-only dataset of the same length: one permutation rule for every dataset.
    self._order = data_lib.Dataset(name, np.zeros((len(self.prompts), 0), np.float32), None, None)

  def __len__(self) -> int:
    return len(self.prompts)

  def batch(self, batch_index: int, batch_size: int, seed: int, process_index: int = 0,
            process_count: int = 1) -> list:
    """This process's prompts of global batch `batch_index` (batch_size / process_count of them)."""
    items = self._order.batch_items(batch_index, batch_size, seed, process_index, process_count)
    return [self.prompts[i] for i in items]


def _read_lines(path: str) -> list:
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


def _prompt_file(folder: str) -> str:
  for name in OFFICIAL_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  texts = sorted(name for name in os.listdir(folder) if name.endswith('.txt'))
  if len(texts) != 1:
    raise ValueError(f'{folder}: expected one of {", ".join(OFFICIAL_FILES)} or a single .txt file, '
                     f'found {texts or "none"}')
  return os.path.join(folder, texts[0])


def _tfds_prompts(name: str, feature: str, data_dir: Optional[str], split: str) -> list:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'tfds:{name}: unknown dataset') from e
  if not builder.is_prepared():
    raise ValueError(f'tfds:{name}: not prepared in data_dir={builder.data_dir!r} (this source never '
                     'downloads; run tfds.builder(...).download_and_prepare() first)')
  prompts = []
  for example in tfds.as_numpy(builder.as_dataset(split=split)):
    value = example
    for key in feature.split('/'):
      if key not in value:
        raise ValueError(f'tfds:{name}: no text feature {feature!r}')
      value = value[key]
    values = np.asarray(value).reshape(-1)
    prompts.extend(v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in values)
  return prompts


def read_prompts(source: str, feature: str = 'text', data_dir: Optional[str] = None,
                 split: str = 'train') -> PromptDataset:
  """The prompts of a text file, an official prompt folder or a tfds builder (module docstring)."""
  if not source:
    raise ValueError('no prompt source given (a .txt file, a folder or tfds:NAME)')
  if source.startswith('tfds:'):
    return PromptDataset(source, _tfds_prompts(source[len('tfds:'):], feature, data_dir, split))
  source = os.fspath(source)
  if os.path.isdir(source):
    source = _prompt_file(source)
  elif not os.path.isfile(source):
    raise FileNotFoundError(f'prompt file not found: {source}')
  return PromptDataset(source, _read_lines(source))
