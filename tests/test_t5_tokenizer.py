"""T5 SentencePiece tokenizer: ids stored from transformers (torch-free), padding/truncation rules, and
live comparison with transformers' T5Tokenizer on a tiny trained vocabulary (parity environment)."""
import json
import pathlib

import numpy as np
import pytest

from sida_jax.text import t5_tokenizer
from sida_jax.text.t5_tokenizer import T5Tokenizer

DATA = pathlib.Path(__file__).parent / 'data' / 't2i_pixart'
PROMPTS = json.loads((DATA / 'prompts.json').read_text(encoding='utf-8'))


@pytest.fixture(scope='module')
def tokenizer():
  return T5Tokenizer.from_folder(DATA / 'tokenizer')


def test_reference_ids_from_transformers(tokenizer):
  ref = np.load(DATA / 'reference.npz')
  batch = tokenizer(PROMPTS)
  assert batch['input_ids'].shape == (len(PROMPTS), t5_tokenizer.PIXART_MAX_LENGTH) == (8, 120)
  assert batch['input_ids'].dtype == np.int32 and batch['attention_mask'].dtype == np.int32
  np.testing.assert_array_equal(batch['input_ids'], ref['input_ids'])
  np.testing.assert_array_equal(batch['attention_mask'], ref['attention_mask'])
  np.testing.assert_array_equal(tokenizer(PROMPTS, max_length=8)['input_ids'], ref['input_ids_8'])


def test_eos_padding_and_truncation(tokenizer):
  ids = tokenizer.encode('a horse on the moon')
  assert ids[-1] == tokenizer.eos_id == 1 and 0 not in ids
  batch = tokenizer(['a horse on the moon', ''], max_length=len(ids) + 3)
  np.testing.assert_array_equal(batch['input_ids'][0], ids + [0, 0, 0])
  np.testing.assert_array_equal(batch['attention_mask'][0], [1] * len(ids) + [0, 0, 0])
  np.testing.assert_array_equal(batch['input_ids'][1], [1] + [0] * (len(ids) + 2))   # empty prompt: </s>
  short = tokenizer('a horse on the moon', max_length=3)
  np.testing.assert_array_equal(short['input_ids'][0], ids[:2] + [1])   # the cut keeps the final </s>
  np.testing.assert_array_equal(short['attention_mask'][0], [1, 1, 1])
  assert tokenizer('x', max_length=1)['input_ids'].tolist() == [[1]]


def test_special_token_strings(tokenizer):
  assert tokenizer.vocab_size == 300   # 200 pieces + 100 sentinels
  assert tokenizer.encode('<extra_id_0>') == [299, 1]
  assert tokenizer.encode('<extra_id_99>') == [200, 1]
  assert tokenizer.encode('<extra_id_10><extra_id_1>') == [289, 298, 1]
  assert tokenizer.encode('</s><pad><unk>') == [1, 0, 2, 1]
  # An unknown sentinel is plain text.
  assert 299 not in tokenizer.encode('<extra_id_100>')


def test_errors(tokenizer, tmp_path):
  with pytest.raises(ValueError, match='max_length must be at least 1'):
    tokenizer('a', max_length=0)
  with pytest.raises(TypeError, match='expected a string'):
    tokenizer([b'bytes'])
  with pytest.raises(FileNotFoundError, match='no spiece.model or tokenizer.json'):
    T5Tokenizer.from_folder(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Live comparison with transformers (optional: the parity environment).


def _random_prompts(seed: int, count: int) -> list:
  """Mixed-script prompts with punctuation, odd whitespace and special-token strings."""
  rng = np.random.default_rng(seed)
  words = ['horse', 'moon', 'Crème', 'brûlée', '—', '50%', 'naïve', 'ＡＢＣ', '①', '日本', '🐱', '\u00a0', '\t',
           '\n', '  ', '</s>', '<pad>', '<extra_id_3>', 'ﬁ', 'über', '...', '"quoted"', "it's", '(x)', 'café']
  return [''.join(rng.choice(words) + rng.choice(['', ' ', ', ']) for _ in range(rng.integers(0, 60)))
          for _ in range(count)]


def test_matches_transformers_live(tokenizer, tmp_path):
  transformers = pytest.importorskip('transformers', reason='comparison needs transformers (parity environment)')
  pytest.importorskip('tokenizers', reason='comparison needs tokenizers (parity environment)')
  reference = transformers.AutoTokenizer.from_pretrained(str(DATA / 'tokenizer'))
  # transformers >= 5 saves tokenizer.json alone: read it through the `tokenizers` library.
  reference.save_pretrained(str(tmp_path))
  assert not (tmp_path / 'spiece.model').exists()
  from_json = T5Tokenizer.from_folder(tmp_path)
  prompts = PROMPTS + _random_prompts(0, 40)
  for max_length in (120, 16, 2):
    expected = reference(prompts, padding='max_length', max_length=max_length, truncation=True)
    for ours in (tokenizer, from_json):
      batch = ours(prompts, max_length=max_length)
      np.testing.assert_array_equal(batch['input_ids'], np.array(expected['input_ids']))
      np.testing.assert_array_equal(batch['attention_mask'], np.array(expected['attention_mask']))
