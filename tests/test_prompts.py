"""Prompt datasets: the official file and folder layouts, and sida_jax.data's shuffled, resumable, sharded order."""
import numpy as np
import pytest

from sida_jax import data as data_lib
from sida_jax.text import prompts as prompts_lib


def _write(path, text):
  path.write_bytes(text.encode('utf-8'))
  return path


def test_a_text_file_is_one_prompt_per_line_as_the_official_loader_reads_it(tmp_path):
  path = _write(tmp_path / 'prompts.txt', 'a cat\n  two dogs \n\nCafé crème\nno newline at the end')
  dataset = prompts_lib.read_prompts(str(path))
  # Only the newline is stripped: inner/outer spaces stay and the empty line is the empty prompt.
  assert dataset.prompts == ['a cat', '  two dogs ', '', 'Café crème', 'no newline at the end']
  assert len(dataset) == 5


def test_official_prompt_folder(tmp_path):
  _write(tmp_path / 'aesthetics_65_plus.txt', 'third choice\n')
  _write(tmp_path / 'aesthetics_625_plus.txt', 'second choice\n')
  assert prompts_lib.read_prompts(str(tmp_path)).prompts == ['second choice']
  _write(tmp_path / 'aesthetics_6_plus.txt', 'first choice\n')
  assert prompts_lib.read_prompts(str(tmp_path)).prompts == ['first choice']
  other = tmp_path / 'other'
  other.mkdir()
  _write(other / 'captions.txt', 'only file\n')
  assert prompts_lib.read_prompts(str(other)).prompts == ['only file']
  _write(other / 'more.txt', 'x\n')
  with pytest.raises(ValueError, match=r"expected one of aesthetics_6_plus.txt.*found \['captions.txt', 'more.txt'\]"):
    prompts_lib.read_prompts(str(other))


def test_batches_follow_the_data_order_and_resume_and_shard(tmp_path):
  prompts = [f'prompt {i}' for i in range(10)]
  dataset = prompts_lib.read_prompts(str(_write(tmp_path / 'p.txt', '\n'.join(prompts) + '\n')))
  batches = [dataset.batch(k, 4, seed=7) for k in range(5)]   # 20 prompts: two full epochs
  flat = sum(batches, [])
  # Each epoch is the permutation numpy draws from (seed, epoch), as sida_jax.data's loader uses.
  for epoch in range(2):
    order = np.random.default_rng([7, epoch]).permutation(10)
    assert flat[10 * epoch:10 * (epoch + 1)] == [prompts[i] for i in order]
  assert sorted(flat[:10]) == sorted(prompts)
  assert dataset.batch(3, 4, seed=7) == batches[3]                    # a pure function of the position
  assert dataset.batch(0, 4, seed=8) != batches[0]
  halves = [dataset.batch(2, 4, seed=7, process_index=p, process_count=2) for p in range(2)]
  assert halves[0] + halves[1] == batches[2]
  order = data_lib.Dataset('x', np.zeros((10, 0)), None, None).batch_items(2, 4, 7)
  assert batches[2] == [prompts[i] for i in order]


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='prompt file not found'):
    prompts_lib.read_prompts(str(tmp_path / 'missing.txt'))
  with pytest.raises(ValueError, match='no prompt source given'):
    prompts_lib.read_prompts('')
  with pytest.raises(ValueError, match='no prompts'):
    prompts_lib.read_prompts(str(_write(tmp_path / 'empty.txt', '')))
  with pytest.raises(ValueError, match='not a positive multiple of the process count'):
    prompts_lib.read_prompts(str(_write(tmp_path / 'p.txt', 'a\n'))).batch(0, 3, 0, 0, 2)


def test_tfds_text_feature_nested_and_flattened(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  captions = [['a cat', 'a small cat'], ['a dog', 'Café au lait']]

  class SidaTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'captions': tfds.features.Sequence({'text': tfds.features.Text()}), 'id': tfds.features.Scalar(np.int32)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, texts in enumerate(captions):
        yield i, {'captions': {'text': texts}, 'id': i}

  source = 'tfds:sida_tiny_captions'
  with pytest.raises(ValueError, match='not prepared'):
    prompts_lib.read_prompts(source, 'captions/text', str(tmp_path))
  SidaTinyCaptions(data_dir=str(tmp_path)).download_and_prepare()
  dataset = prompts_lib.read_prompts(source, 'captions/text', str(tmp_path))
  assert sorted(dataset.prompts) == sorted(sum(captions, []))   # tfds may store examples in any order
  with pytest.raises(ValueError, match="no text feature 'text'"):
    prompts_lib.read_prompts(source, 'text', str(tmp_path))
