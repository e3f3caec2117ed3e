"""CLIP tokenizer (through `tokenizers`): ids stored from transformers' tokenizers on a CLIP-layout test
vocabulary, with SD1's and SD2's pad tokens; live comparison when transformers is installed."""
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip('tokenizers', reason='the CLIP tokenizer needs the tokenizers package (requirements.txt)')

from sida_jax.text import CLIPTokenizer  # noqa: E402  pylint: disable=wrong-import-position
from sida_jax.text import clip_tokenizer  # noqa: E402  pylint: disable=wrong-import-position

DATA = pathlib.Path(__file__).resolve().parent / 'data' / 't2i'
FOLDERS = {'sd1': DATA / 'tiny-sd' / 'tokenizer', 'sd2': DATA / 'tokenizer-sd2'}


def stored(name):
  return json.loads((DATA / name).read_text(encoding='utf-8'))


@pytest.mark.parametrize('folder', list(FOLDERS))
def test_matches_transformers_ids(folder):
  """transformers' tokenizers-backed CLIPTokenizer (= CLIPTokenizerFast): equal ids on every prompt."""
  record = stored('tokenizer_ids.json')
  tokenizer = CLIPTokenizer.from_folder(str(FOLDERS[folder]))
  ids, mask = tokenizer(record['prompts'])
  expected = np.asarray(record[f'fast_{folder}'])
  assert ids.dtype == np.int32 and ids.shape == (len(record['prompts']), 77)
  np.testing.assert_array_equal(ids, expected)
  # The mask covers the start token through the end token.
  lengths = np.array([min(len(tokenizer.encode(p)), 77) for p in record['prompts']])
  np.testing.assert_array_equal(mask, (np.arange(77)[None] < lengths[:, None]).astype(np.int32))


@pytest.mark.parametrize('folder', list(FOLDERS))
def test_matches_transformers4_fast_tokenizer(folder):
  record = stored('tokenizer_ids_slow_ftfy.json')
  assert record['transformers'].startswith('4.')
  ids = CLIPTokenizer.from_folder(str(FOLDERS[folder]))(record['prompts']).input_ids
  np.testing.assert_array_equal(ids, np.asarray(record[f'fast4_{folder}']))


@pytest.mark.parametrize('folder', list(FOLDERS))
def test_matches_pure_python_tokenizer_with_ftfy(folder):
  """transformers 4.x `CLIPTokenizer` (use_fast=False) with ftfy, as SiD-LSG trained: equal ids except where
  ftfy.fix_text rewrites the text (equal there too once the same fix_text runs first, next test)."""
  record = stored('tokenizer_ids_slow_ftfy.json')
  expected = np.asarray(record[f'slow_ftfy_{folder}'])
  ids = CLIPTokenizer.from_folder(str(FOLDERS[folder]))(record['prompts']).input_ids
  sensitive = list(record['ftfy_sensitive'])
  others = [i for i in range(len(record['prompts'])) if i not in sensitive]
  np.testing.assert_array_equal(ids[others], expected[others])
  assert all(not np.array_equal(ids[i], expected[i]) for i in sensitive)


@pytest.mark.parametrize('folder', list(FOLDERS))
def test_fix_text_reproduces_pure_python_tokenizer(folder):
  ftfy = pytest.importorskip('ftfy', reason='the ftfy comparison needs ftfy')
  record = stored('tokenizer_ids_slow_ftfy.json')
  expected = np.asarray(record[f'slow_ftfy_{folder}'])
  fixed = CLIPTokenizer.from_folder(str(FOLDERS[folder]), fix_text=ftfy.fix_text)(record['prompts']).input_ids
  np.testing.assert_array_equal(fixed, expected)


def test_special_tokens_padding_and_truncation():
  sd1 = CLIPTokenizer.from_folder(str(FOLDERS['sd1']))
  sd2 = CLIPTokenizer.from_folder(str(FOLDERS['sd2']))
  vocab = json.loads((FOLDERS['sd1'] / 'vocab.json').read_text(encoding='utf-8'))
  assert (sd1.bos_token_id, sd1.eos_token_id) == (vocab['<|startoftext|>'], vocab['<|endoftext|>'])
  assert sd1.pad_token_id == vocab['<|endoftext|>'] and sd2.pad_token_id == vocab['!'] == 0
  assert sd1.model_max_length == 77 and sd1.vocab_size == len(vocab)
  empty = sd2('').input_ids[0]
  assert list(empty[:3]) == [sd2.bos_token_id, sd2.eos_token_id, 0] and not empty[2:].any()
  long_prompt = ' '.join(['word'] * 100)
  full = sd1.encode(long_prompt)
  assert len(full) > 77 and full[0] == sd1.bos_token_id and full[-1] == sd1.eos_token_id
  ids, mask = sd1([long_prompt])
  np.testing.assert_array_equal(ids[0], full[:76] + [sd1.eos_token_id])
  assert mask.all()
  short = sd1(['a photo of a cat'], max_length=8).input_ids
  np.testing.assert_array_equal(short[0], (sd1.encode('a photo of a cat') + [sd1.eos_token_id] * 8)[:8])
  with pytest.raises(ValueError, match='max_length 1 leaves no room'):
    sd1('x', max_length=1)
  with pytest.raises(TypeError, match='prompts are strings'):
    sd1([None])


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='vocab.json not found'):
    CLIPTokenizer.from_folder(str(tmp_path))
  (tmp_path / 'vocab.json').write_text(json.dumps({'a': 0}))
  (tmp_path / 'merges.txt').write_text('#version: 0.2\na b c\n')
  with pytest.raises(ValueError, match="line 2 is not a merge pair: 'a b c'"):
    CLIPTokenizer.from_folder(str(tmp_path))
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n')
  with pytest.raises(ValueError, match=r"bos_token '<\|startoftext\|>' is not in the vocabulary"):
    CLIPTokenizer.from_folder(str(tmp_path))
  assert clip_tokenizer.read_merges(str(FOLDERS['sd1'] / 'merges.txt'))[0] == ('i', 'n')


def test_live_transformers_tokenizer():
  transformers = pytest.importorskip('transformers', reason='live comparison needs transformers')
  prompts = stored('tokenizer_ids.json')['prompts'] + ['One more: ÀÉÎ õ, 東京タワー 🗼, "quotes" & more']
  for folder in FOLDERS.values():
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = ref(prompts, padding='max_length', max_length=77, truncation=True)
    got = CLIPTokenizer.from_folder(str(folder))(prompts)
    np.testing.assert_array_equal(got.input_ids, expected['input_ids'])
    np.testing.assert_array_equal(got.attention_mask, expected['attention_mask'])
