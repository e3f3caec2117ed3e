"""Writes the torch-free reference data of tests/test_pixart.py, test_t5.py and test_t5_tokenizer.py.

Run once with the parity environment (torch, diffusers, transformers, sentencepiece), from the repo root:
    python tests/data/t2i_pixart/make_reference.py
It trains a tiny SentencePiece unigram model on corpus.txt (no real T5 vocabulary is downloadable here),
saves tiny random T5 text encoder and PixArt transformer folders with save_pretrained(safetensors), and
stores the reference tokenizer ids and network outputs in reference.npz.
"""
import json
import os
import pathlib
import tempfile

import numpy as np
import sentencepiece
import torch
import transformers
from diffusers import PixArtTransformer2DModel

HERE = pathlib.Path(__file__).resolve().parent
MAX_LENGTH = 120

PROMPTS = [
    'A photograph of an astronaut riding a horse on the moon.',
    'Crème brûlée — naïve style, 50% more colour!',
    '  extra   spaces\tand\nnew lines ',
    'ＡＢＣ full-width letters, ﬁ ligature, ① ½ and 日本語',
    'an emoji 🐱 and a zero\u200bwidth space',
    'special tokens </s> and <extra_id_0> inside<pad>',
    '',
    'a very long prompt ' * 40,
]
# Relative-position bucket configurations (num_buckets, max_distance) checked against transformers.
BUCKET_CONFIGS = ((32, 128), (8, 20), (16, 64), (64, 256), (6, 4))
BUCKET_SPAN = 300


def train_tokenizer(folder: pathlib.Path) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    sentencepiece.SentencePieceTrainer.train(
        input=str(HERE / 'corpus.txt'), model_prefix=os.path.join(tmp, 'spiece'), vocab_size=200,
        model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        normalization_rule_name='nmt_nfkc', minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    # The model records where it was trained from; keep only the file names (no paths of this machine).
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    model = sentencepiece_model_pb2.ModelProto()
    with open(os.path.join(tmp, 'spiece.model'), 'rb') as f:
      model.ParseFromString(f.read())
    del model.trainer_spec.input[:]
    model.trainer_spec.input.append('corpus.txt')
    model.trainer_spec.model_prefix = 'spiece'
    (folder / 'spiece.model').write_bytes(model.SerializeToString())
  # The files PixArt's tokenizer folder holds next to spiece.model.
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'T5Tokenizer', 'extra_ids': 100, 'model_max_length': 512, 'eos_token': '</s>',
       'pad_token': '<pad>', 'unk_token': '<unk>'}, indent=2) + '\n')


def perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
  """Random offsets so that no parameter keeps a trivial value (ones, zeros, symmetric inits)."""
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))


def main():
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  ref = {}

  train_tokenizer(HERE / 'tokenizer')
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(HERE / 'tokenizer'))
  tokens = tokenizer(PROMPTS, padding='max_length', max_length=MAX_LENGTH, truncation=True,
                     add_special_tokens=True, return_tensors='np')
  ref['input_ids'] = tokens['input_ids'].astype(np.int32)
  ref['attention_mask'] = tokens['attention_mask'].astype(np.int32)
  short = tokenizer(PROMPTS, padding='max_length', max_length=8, truncation=True, return_tensors='np')
  ref['input_ids_8'] = short['input_ids'].astype(np.int32)

  t5_config = transformers.T5Config(
      vocab_size=320, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_heads=3, feed_forward_proj='gated-gelu',
      relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.1)
  text_encoder = transformers.T5EncoderModel(t5_config).eval()
  perturb(text_encoder)
  text_encoder.save_pretrained(str(HERE / 'text_encoder'), safe_serialization=True)
  with torch.no_grad():
    hidden = text_encoder(input_ids=torch.from_numpy(ref['input_ids']).long(),
                          attention_mask=torch.from_numpy(ref['attention_mask']).long()).last_hidden_state
  ref['t5_hidden'] = hidden.numpy()

  transformer = PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
      cross_attention_dim=24, caption_channels=16, sample_size=8, patch_size=2, use_additional_conditions=True).eval()
  perturb(transformer)
  transformer.save_pretrained(str(HERE / 'transformer'), safe_serialization=True)
  n = len(PROMPTS)
  latents = rng.normal(size=(n, 4, 8, 12)).astype(np.float32)   # not the square training grid
  timesteps = rng.uniform(0, 1000, size=(n,)).astype(np.float32)
  resolution = np.tile(np.array([[64.0, 96.0]], np.float32), (n, 1))
  aspect_ratio = np.full((n, 1), 1.5, np.float32)
  with torch.no_grad():
    out = transformer(torch.from_numpy(latents), encoder_hidden_states=hidden, timestep=torch.from_numpy(timesteps),
                      added_cond_kwargs={'resolution': torch.from_numpy(resolution),
                                         'aspect_ratio': torch.from_numpy(aspect_ratio)},
                      encoder_attention_mask=torch.from_numpy(ref['attention_mask']).float()).sample
  ref.update(latents=latents, timesteps=timesteps, resolution=resolution, aspect_ratio=aspect_ratio,
             pixart_out=out.numpy())

  relative = torch.arange(-BUCKET_SPAN, BUCKET_SPAN + 1)
  for num_buckets, max_distance in BUCKET_CONFIGS:
    buckets = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    ref[f'buckets_{num_buckets}_{max_distance}'] = buckets.numpy().astype(np.int16)

  np.savez_compressed(HERE / 'reference.npz', **ref)
  (HERE / 'prompts.json').write_text(json.dumps(PROMPTS, ensure_ascii=False, indent=1) + '\n')
  print('wrote', sorted(ref), 'versions:', torch.__version__, transformers.__version__)


if __name__ == '__main__':
  main()
