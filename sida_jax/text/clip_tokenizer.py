"""CLIP's byte-level BPE tokenizer (Stable Diffusion's `tokenizer/` folder) through the `tokenizers` library.

    tokenizer = CLIPTokenizer.from_folder('stable-diffusion-v1-5/tokenizer')
    ids, mask = tokenizer(['a photo of a cat', ''])   # int32 [2, 77]: <start> ... <end> <pad> ...

The pipeline is transformers' (tokenizers-backed) `CLIPTokenizer` / `CLIPTokenizerFast`: NFC, runs of
whitespace -> one space, lower case; CLIP's word pattern (contractions, letter runs, single digits,
runs of other symbols); byte-level alphabet; BPE with `</w>` marking word ends; `<|startoftext|>` ...
`<|endoftext|>` around the tokens; truncation to `model_max_length` (77) keeping the end token; padding
with the folder's pad token (SD1.x: `<|endoftext|>`, SD2.x: `!`).

transformers' older pure-Python `CLIPTokenizer` (what `use_fast=False` gave before transformers 5, e.g.
in SiD-LSG's training code) first runs `ftfy.fix_text` when ftfy is installed: it straightens curly
quotes, undoes ligatures and full-width letters, unescapes HTML entities, repairs mojibake. Pass
`fix_text=ftfy.fix_text` to reproduce it; the default leaves text as the tokenizers-backed ones do.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

# CLIP's word pattern (transformers' CLIPTokenizer, from OpenAI's `simple_tokenizer.py`).
WORD_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                r"""[^\s\p{L}\p{N}]+""")
END_OF_WORD = '</w>'
DEFAULT_TOKENS = dict(bos_token='<|startoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>',
                      pad_token='<|endoftext|>')


class Tokens(NamedTuple):
  input_ids: np.ndarray       # int32 [N, length]
  attention_mask: np.ndarray  # int32 [N, length], 1 on real tokens (start and end included)


def _token_text(value: Any) -> Optional[str]:
  """A special token from tokenizer_config.json / special_tokens_map.json: a string or an AddedToken dict."""
  if isinstance(value, Mapping):
    return value.get('content')
  return value


def read_merges(path: str) -> list:
  """merges.txt: an optional `#version` line, then one `left right` pair per line."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  if lines and lines[0].startswith('#version'):
    lines = lines[1:]
  merges = []
  for number, line in enumerate(lines, start=2):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f'{path}: line {number} is not a merge pair: {line!r}')
    merges.append((parts[0], parts[1]))
  return merges


class CLIPTokenizer:
  """Prompts -> (input_ids, attention_mask) numpy arrays padded/truncated to `model_max_length`."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple],
               bos_token: str = DEFAULT_TOKENS['bos_token'], eos_token: str = DEFAULT_TOKENS['eos_token'],
               unk_token: str = DEFAULT_TOKENS['unk_token'], pad_token: str = DEFAULT_TOKENS['pad_token'],
               model_max_length: int = 77,
               fix_text: Optional[Callable[[str], str]] = None):
    # Local import: only building a tokenizer needs the package.
    try:
      from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
      from tokenizers.models import BPE
    except ImportError as error:
      raise ImportError('CLIPTokenizer needs the tokenizers package (pip install tokenizers)') from error
    for role, token in (('bos_token', bos_token), ('eos_token', eos_token), ('unk_token', unk_token),
                        ('pad_token', pad_token)):
      if token not in vocab:
        raise ValueError(f'CLIPTokenizer: {role} {token!r} is not in the vocabulary')
    tokenizer = Tokenizer(BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
                              continuing_subword_prefix='', end_of_word_suffix=END_OF_WORD, fuse_unk=False,
                              unk_token=unk_token))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # Special tokens written in a prompt stay one token, matched before normalisation (as transformers does).
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in dict.fromkeys((bos_token, eos_token, unk_token, pad_token))])
    self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
    self.pad_token_id = vocab[pad_token]
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos_token, self.eos_token_id), (bos_token, self.bos_token_id), trim_offsets=False,
        add_prefix_space=False)
    self.model_max_length = int(model_max_length)
    self.vocab_size = len(vocab)
    self.fix_text = fix_text
    self._tokenizer = tokenizer

  @classmethod
  def from_folder(cls, folder: str, fix_text: Optional[Callable[[str], str]] = None) -> 'CLIPTokenizer':
    """A transformers tokenizer folder: vocab.json, merges.txt, and optionally tokenizer_config.json and
    special_tokens_map.json (special tokens, `model_max_length`); the map overrides the config."""
    paths = {name: os.path.join(folder, name) for name in ('vocab.json', 'merges.txt')}
    for name, path in paths.items():
      if not os.path.isfile(path):
        raise FileNotFoundError(f'CLIPTokenizer: {path} not found (a CLIP tokenizer folder has vocab.json '
                                'and merges.txt)')
    with open(paths['vocab.json'], encoding='utf-8') as f:
      vocab = json.load(f)
    settings = dict(DEFAULT_TOKENS, model_max_length=77)
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
          entries = json.load(f)
        for key in DEFAULT_TOKENS:
          if entries.get(key) is not None:
            settings[key] = _token_text(entries[key])
        if 'model_max_length' in entries:
          settings['model_max_length'] = entries['model_max_length']
    return cls(vocab, read_merges(paths['merges.txt']), **settings, fix_text=fix_text)

  def encode(self, prompt: str) -> list:
    """Token ids of one prompt with start and end tokens, without truncation or padding."""
    return self._tokenizer.encode(self._fixed(prompt)).ids

  def _fixed(self, prompt: str) -> str:
    if not isinstance(prompt, str):
      raise TypeError(f'CLIPTokenizer: prompts are strings, got {type(prompt).__name__}')
    return prompt if self.fix_text is None else self.fix_text(prompt)

  def __call__(self, prompts: Sequence[str] | str, max_length: Optional[int] = None) -> Tokens:
    """Ids and mask padded to `max_length` (default `model_max_length`); longer prompts keep their first
    max_length - 2 tokens between the start and end tokens."""
    if isinstance(prompts, str):
      prompts = [prompts]
    length = self.model_max_length if max_length is None else int(max_length)
    if length < 2:
      raise ValueError(f'CLIPTokenizer: max_length {length} leaves no room for the start and end tokens')
    ids = np.full((len(prompts), length), self.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, encoding in enumerate(self._tokenizer.encode_batch([self._fixed(p) for p in prompts])):
      tokens = encoding.ids
      if len(tokens) > length:
        tokens = tokens[:length - 1] + [self.eos_token_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return Tokens(ids, mask)
