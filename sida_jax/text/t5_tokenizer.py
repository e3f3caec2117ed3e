"""T5's SentencePiece tokenizer, as PixArt's pipeline calls it: ids + `</s>`, truncated and padded.

    tokenizer = T5Tokenizer.from_folder('PixArt-XL-2-512x512/tokenizer')
    batch = tokenizer(['a cat on a mat', 'a dog'], max_length=120)
    batch['input_ids'], batch['attention_mask']        # int32 [2, 120] each

This reproduces transformers' `T5Tokenizer` / `T5TokenizerFast` called with
`padding='max_length', truncation=True, add_special_tokens=True`: the SentencePiece pieces of the
text, cut to max_length − 1, then `</s>`, then `<pad>` up to max_length; the mask is 1 on the pieces
and on `</s>`. Special-token strings written in the text (`</s>`, `<pad>`, `<unk>`,
`<extra_id_N>`) map to their ids, as in transformers; sentinel `<extra_id_N>` has id
vocab + extra_ids − 1 − N.

The folder's `spiece.model` is read with the `sentencepiece` library. A folder holding only
`tokenizer.json` (transformers ≥ 5 saves that alone) is read with the `tokenizers` library when it
is installed.
"""
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Callable, Union

import numpy as np

PIXART_MAX_LENGTH = 120   # PixArt-α's caption length (diffusers' max_sequence_length)
_DEFAULT_EXTRA_IDS = 100


class T5Tokenizer:
  """Text → T5 ids through an `encode(text) -> list[int]` of the plain pieces (no special tokens)."""

  def __init__(self, encode_pieces: Callable[[str], list], vocab_size: int, pad_id: int = 0, eos_id: int = 1,
               unk_id: int = 2, extra_ids: int = _DEFAULT_EXTRA_IDS):
    self._encode_pieces = encode_pieces
    self.pad_id, self.eos_id, self.unk_id = pad_id, eos_id, unk_id
    self.vocab_size = vocab_size + extra_ids
    self.special_ids = {'<pad>': pad_id, '</s>': eos_id, '<unk>': unk_id}
    self.special_ids.update({f'<extra_id_{i}>': vocab_size + extra_ids - 1 - i for i in range(extra_ids)})
    # Longest first, so that e.g. <extra_id_10> is not read as <extra_id_1> followed by '0>'.
    names = sorted(self.special_ids, key=len, reverse=True)
    self._special_pattern = re.compile('(' + '|'.join(map(re.escape, names)) + ')')

  @classmethod
  def from_sentencepiece(cls, model_file: Union[str, os.PathLike], extra_ids: int = _DEFAULT_EXTRA_IDS):
    import sentencepiece  # pylint: disable=import-outside-toplevel
    processor = sentencepiece.SentencePieceProcessor(model_file=os.fspath(model_file))
    ids = dict(pad_id=processor.pad_id(), eos_id=processor.eos_id(), unk_id=processor.unk_id())
    for name, value in ids.items():
      if value < 0:
        raise ValueError(f'{os.fspath(model_file)}: the SentencePiece model defines no {name[:-3]} token')
    return cls(lambda text: processor.encode(text), processor.get_piece_size(), extra_ids=extra_ids, **ids)

  @classmethod
  def from_tokenizer_json(cls, path: Union[str, os.PathLike], extra_ids: int = _DEFAULT_EXTRA_IDS):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f'{os.fspath(path)}: reading tokenizer.json needs the `tokenizers` package '
                        '(or put spiece.model in the folder)') from e
    tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
    ids = {name: tokenizer.token_to_id(token) for name, token in
           (('pad_id', '<pad>'), ('eos_id', '</s>'), ('unk_id', '<unk>'))}
    for name, value in ids.items():
      if value is None:
        raise ValueError(f'{os.fspath(path)}: no {name[:-3]} token in the vocabulary')
    # The vocabulary holds the pieces followed by the extra ids.
    pieces = tokenizer.get_vocab_size(with_added_tokens=False) - extra_ids
    return cls(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, pieces,
               extra_ids=extra_ids, **ids)

  @classmethod
  def from_folder(cls, folder: Union[str, os.PathLike]) -> 'T5Tokenizer':
    """A transformers T5 tokenizer folder: `spiece.model` (preferred) or `tokenizer.json`, and
    `tokenizer_config.json` for `extra_ids` (default 100)."""
    folder = os.fspath(folder)
    extra_ids = _DEFAULT_EXTRA_IDS
    config_path = os.path.join(folder, 'tokenizer_config.json')
    if os.path.isfile(config_path):
      with open(config_path, encoding='utf-8') as f:
        extra_ids = int(json.load(f).get('extra_ids', _DEFAULT_EXTRA_IDS))
    if os.path.isfile(os.path.join(folder, 'spiece.model')):
      return cls.from_sentencepiece(os.path.join(folder, 'spiece.model'), extra_ids)
    if os.path.isfile(os.path.join(folder, 'tokenizer.json')):
      return cls.from_tokenizer_json(os.path.join(folder, 'tokenizer.json'), extra_ids)
    raise FileNotFoundError(f'{folder}: no spiece.model or tokenizer.json')

  def encode(self, text: str) -> list:
    """The ids of `text` followed by `</s>`, without truncation or padding."""
    if not isinstance(text, str):
      raise TypeError(f'T5Tokenizer: expected a string, got {type(text).__name__}')
    ids = []
    for part in self._special_pattern.split(text):
      if part in self.special_ids:
        ids.append(self.special_ids[part])
      elif part:
        ids.extend(self._encode_pieces(part))
    return ids + [self.eos_id]

  def __call__(self, texts: Union[str, Sequence[str]], max_length: int = PIXART_MAX_LENGTH) -> dict[str, Any]:
    """{'input_ids', 'attention_mask'}: int32 [N, max_length] (N = 1 for a single string)."""
    if max_length < 1:
      raise ValueError(f'T5Tokenizer: max_length must be at least 1, got {max_length}')
    if isinstance(texts, str):
      texts = [texts]
    input_ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    attention_mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text)
      if len(ids) > max_length:   # keep the final </s>
        ids = ids[:max_length - 1] + [self.eos_id]
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
    return {'input_ids': input_ids, 'attention_mask': attention_mask}

