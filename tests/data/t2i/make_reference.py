"""Writes the reference data of the text-to-image tests (tiny random diffusers / transformers folders, their
outputs, a small CLIP-format BPE vocabulary and tokenizer ids, parameter tables of the real SD configs).

Run once with the parity environment (torch, diffusers, transformers, tokenizers), from the repository root:

    python tests/data/t2i/make_reference.py

and, for the ids of transformers' older pure-Python CLIPTokenizer with ftfy (what SiD-LSG's training used,
`use_fast=False`) and of its CLIPTokenizerFast, with transformers 4.40.1, tokenizers 0.19.1 and ftfy 6.2.0 on
the path:

    python tests/data/t2i/make_reference.py --slow-tokenizer

The CLIP vocabulary itself cannot be shipped here, so the tokenizer folders hold a vocabulary in CLIP's
layout (256 byte symbols, the same with `</w>`, merges, start/end tokens) whose merges the `tokenizers`
BPE trainer learnt from the caption-like corpus below; it is kept unless `--new-vocabulary` is given.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent

# Punctuation, casing, whitespace, contractions, accents (composed and combining), CJK, emoji, digits,
# special tokens written out, ftfy-sensitive text (curly quotes, ligature, full width, HTML entities),
# over-long prompts, the empty prompt.
PROMPTS = [
    'A photo of a cat sitting on a wooden table.',
    'a PHOTO of a Cat, SITTING on a Table!!!',
    '',
    '   leading and trailing spaces   ',
    'tabs\tand\nnewlines\r\n and   multiple    spaces',
    "It's, don't, they're, we've, I'm, she'll, he'd; IT'S DON'T",
    'Café crème brûlée, naïve façade, Straße, İstanbul, ØRESUND',
    'e\u0301 combining accent vs é',
    '中文提示 and 日本語のテキスト, 한국어',
    'emoji 🐱🚀👍🏽 and ❤️ hearts',
    'numbers 1234567890 and 3.14 and 4k 8k',
    'punctuation: (brackets) [square] {curly} <angle> ... --- ??? !!! #hashtag @user $5 100% a&b',
    'hello!',
    'literal <|endoftext|> and <|startoftext|> tokens',
    'curly quotes \u201chello\u201d and don\u2019t',
    'ligature \ufb01ne and fullwidth \uff21\uff22\uff23',
    'html &amp; entities &lt;b&gt;',
    ' '.join(['word'] * 100),
    ' '.join(f'w{i}' for i in range(60)),
    'a' * 200,
]
# The prompts on which ftfy.fix_text changes the text.
FTFY_SENSITIVE = (14, 15, 16)

CORPUS = """A photo of a cat sitting on a wooden table next to a window.
Two dogs are playing with a red ball in the green park.
A man riding a bicycle down a busy city street at night.
A bowl of fresh fruit with apples, oranges and bananas.
An astronaut riding a horse on the moon, digital art.
A close-up photograph of a flower with morning dew on its petals.
A group of people standing around a kitchen counter preparing dinner.
A train passing through a snowy mountain landscape.
A small boat floating on a calm lake surrounded by trees.
A painting of a castle on a hill in the style of an old master.
The living room has a large sofa, a television and a lamp.
A woman holding an umbrella while walking in the rain.
A plate of pasta with tomato sauce and basil leaves.
A cat is sleeping on the bed next to a pillow.
Children are playing football on the beach at sunset.
A bird perched on the branch of a tree in the forest.
A red car parked in front of a white house.
A skateboarder doing a trick on a ramp in the skate park.
A clock tower standing in the middle of the town square.
An elephant walking across a dry savanna under a blue sky.
Portrait of an old man with a long beard, oil painting, highly detailed.
A bus driving on the road with buildings in the background.
A giraffe eating leaves from the top of a tall tree.
A pizza with cheese, mushrooms and peppers on a wooden board.
A laptop computer and a cup of coffee on a desk.
It's a sunny day and the children don't want to go home.
They're walking the dog, we've seen them, I'm sure they'll return and he'd agree.
A sign that says "stop" at the corner of the street.
Café au lait, crème brûlée and a croissant on a plate.
A futuristic city with flying cars, neon lights and tall skyscrapers.
A photo of 3 cats and 12 dogs, 4k, 8k, ultra realistic, trending on artstation."""

START, END = '<|startoftext|>', '<|endoftext|>'
# Tiny configurations: SD1-like (1x1-conv projections, one head count) and SD2-like (linear projections,
# per-level head counts, a deeper transformer, uneven layers per block).
UNET_SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
                up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'], cross_attention_dim=16, attention_head_dim=2,
                norm_num_groups=4)
UNET_SD2 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16, 16],
                layers_per_block=[1, 2, 1], down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                                               'DownBlock2D'],
                up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'], cross_attention_dim=12,
                attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 1], use_linear_projection=True,
                upcast_attention=True, norm_num_groups=4, norm_eps=1e-6)
VAE = dict(sample_size=16, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
           layers_per_block=1, norm_num_groups=4, down_block_types=['DownEncoderBlock2D'] * 2,
           up_block_types=['UpDecoderBlock2D'] * 2, scaling_factor=0.18215)
# SD1.5's scheduler_config.json values.
SCHEDULER = {'_class_name': 'PNDMScheduler', 'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
             'beta_start': 0.00085, 'num_train_timesteps': 1000, 'set_alpha_to_one': False,
             'skip_prk_steps': True, 'steps_offset': 1, 'clip_sample': False, 'prediction_type': 'epsilon',
             'trained_betas': None}


def text_config(vocab_size, **kwargs):
  import transformers
  return transformers.CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, **kwargs)


def seeded(seed, build, scale=0.1):
  """`build()` under a fixed torch seed, then all weights + scale * N(0, 1), so zero-initialised layers and
  unit norms are exercised."""
  import torch
  torch.manual_seed(seed)
  module = build()
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))
  return module.eval()


def byte_alphabet():
  """CLIP's (GPT-2's) printable stand-ins for the 256 byte values, in its vocabulary order."""
  kept = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  chars = list(kept)
  extra = 0
  for b in range(256):
    if b not in kept:
      kept.append(b)
      chars.append(256 + extra)
      extra += 1
  return [chr(c) for c in chars]


def write_tokenizer(folder, vocab, merges, pad_token):
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / 'vocab.json', 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(folder / 'merges.txt', 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))

  def added(token):
    return {'content': token, 'lstrip': False, 'normalized': True, 'rstrip': False, 'single_word': False,
            '__type': 'AddedToken'}
  # The layout of SD1.5's tokenizer_config.json / special_tokens_map.json (SD2 pads with '!').
  config = {'add_prefix_space': False, 'bos_token': added(START), 'do_lower_case': True,
            'eos_token': added(END), 'errors': 'replace', 'model_max_length': 77, 'pad_token': END,
            'tokenizer_class': 'CLIPTokenizer', 'unk_token': added(END)}
  special = {'bos_token': added(START), 'eos_token': added(END), 'pad_token': pad_token, 'unk_token': added(END)}
  with open(folder / 'tokenizer_config.json', 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
  with open(folder / 'special_tokens_map.json', 'w', encoding='utf-8') as f:
    json.dump(special, f, indent=2)


def make_tokenizers(out):
  """A CLIP-layout vocabulary trained on CORPUS; folders `tiny-sd/tokenizer` (SD1) and `tokenizer-sd2`.

  The trainer breaks ties between equally frequent pairs in no fixed order, so a new vocabulary differs
  from the last one: the stored ids of every tokenizer (including --slow-tokenizer) must then be rewritten.
  """
  from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
  from tokenizers.models import BPE
  sys.path.insert(0, str(HERE.parents[2]))
  from sida_jax.text.clip_tokenizer import END_OF_WORD, WORD_PATTERN
  trainer_tokenizer = Tokenizer(BPE(continuing_subword_prefix='', end_of_word_suffix=END_OF_WORD))
  trainer_tokenizer.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
  trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(WORD_PATTERN), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                end_of_word_suffix=END_OF_WORD)
  trainer_tokenizer.train_from_iterator(CORPUS.split('\n') * 3, trainer)
  merges = json.loads(trainer_tokenizer.to_str())['model']['merges']
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(' ')) for m in merges]
  alphabet = byte_alphabet()
  tokens = alphabet + [a + END_OF_WORD for a in alphabet] + [a + b for a, b in merges] + [START, END]
  assert len(set(tokens)) == len(tokens)
  vocab = {t: i for i, t in enumerate(tokens)}
  write_tokenizer(out / 'tiny-sd' / 'tokenizer', vocab, merges, pad_token=END)
  write_tokenizer(out / 'tokenizer-sd2', vocab, merges, pad_token='!')
  print(f'vocabulary: {len(vocab)} tokens, {len(merges)} merges')
  return len(vocab)


def tokenizer_ids(out, slow):
  """Ids (padded to 77) from transformers' tokenizers loaded from both folders."""
  import transformers
  folders = {'sd1': out / 'tiny-sd' / 'tokenizer', 'sd2': out / 'tokenizer-sd2'}
  if slow:
    import ftfy  # noqa: F401  (the pure-Python tokenizer uses it when present)
    classes = {'slow_ftfy': transformers.CLIPTokenizer, 'fast4': transformers.CLIPTokenizerFast}
    assert int(transformers.__version__.split('.')[0]) < 5, 'the pure-Python CLIPTokenizer left transformers 5'
  else:
    classes = {'fast': transformers.AutoTokenizer}
  record = {'transformers': transformers.__version__, 'prompts': PROMPTS, 'ftfy_sensitive': FTFY_SENSITIVE}
  for kind, cls in classes.items():
    for name, folder in folders.items():
      tokenizer = cls.from_pretrained(str(folder))
      ids = tokenizer(PROMPTS, padding='max_length', max_length=77, truncation=True)['input_ids']
      record[f'{kind}_{name}'] = ids
      print(f'{kind} {name}: {type(tokenizer).__name__}, pad {tokenizer.pad_token!r}')
  name = 'tokenizer_ids_slow_ftfy.json' if slow else 'tokenizer_ids.json'
  with open(out / name, 'w', encoding='utf-8') as f:
    json.dump(record, f, ensure_ascii=False)


def save_text_encoder(model, folder, prefixed):
  """transformers >= 5 saves names without `text_model.`; `prefixed` rewrites the file as published
  checkpoints store it (prefix and the `position_ids` buffer of older transformers)."""
  from safetensors.numpy import load_file, save_file
  model.save_pretrained(folder, safe_serialization=True)
  if prefixed:
    path = os.path.join(folder, 'model.safetensors')
    state = {'text_model.' + k: v for k, v in load_file(path).items()}
    state['text_model.embeddings.position_ids'] = np.arange(77, dtype=np.int64)[None]
    save_file(state, path, metadata={'format': 'pt'})


def make_models(out, vocab_size):
  import diffusers
  import torch
  import transformers
  rng = np.random.default_rng(0)
  ref = {}
  pipe = out / 'tiny-sd'

  unet = seeded(1, lambda: diffusers.UNet2DConditionModel(**UNET_SD1))
  unet.save_pretrained(pipe / 'unet', safe_serialization=True)
  text = seeded(2, lambda: transformers.CLIPTextModel(text_config(
      vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      hidden_act='quick_gelu', bos_token_id=0, eos_token_id=2, pad_token_id=1)), scale=0.05)
  save_text_encoder(text, pipe / 'text_encoder', prefixed=True)
  vae = seeded(3, lambda: diffusers.AutoencoderKL(**VAE))
  vae.save_pretrained(pipe / 'vae', safe_serialization=True)
  (pipe / 'scheduler').mkdir(parents=True, exist_ok=True)
  with open(pipe / 'scheduler' / 'scheduler_config.json', 'w', encoding='utf-8') as f:
    json.dump(SCHEDULER, f, indent=2)
  index = {'_class_name': 'StableDiffusionPipeline', '_diffusers_version': diffusers.__version__,
           'feature_extractor': [None, None], 'safety_checker': [None, None],
           'requires_safety_checker': False, 'scheduler': ['diffusers', 'PNDMScheduler'],
           'text_encoder': ['transformers', 'CLIPTextModel'], 'tokenizer': ['transformers', 'CLIPTokenizer'],
           'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL']}
  with open(pipe / 'model_index.json', 'w', encoding='utf-8') as f:
    json.dump(index, f, indent=2)

  # The rewritten text encoder file still loads in transformers and computes the same.
  reloaded = transformers.CLIPTextModel.from_pretrained(str(pipe / 'text_encoder')).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(pipe / 'tokenizer'))
  batch = tokenizer(['a photo of a cat', 'Two dogs playing in the park, 4k!', ''], padding='max_length',
                    max_length=77, truncation=True, return_tensors='pt')
  with torch.no_grad():
    outputs = text(batch['input_ids'])
    np.testing.assert_array_equal(reloaded(batch['input_ids']).last_hidden_state.numpy(),
                                  outputs.last_hidden_state.numpy())
    ref['sd1_text_ids'] = batch['input_ids'].numpy()
    ref['sd1_text_hidden'] = outputs.last_hidden_state.numpy()
    ref['sd1_text_pooled'] = outputs.pooler_output.numpy()

    sample = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    t = np.array([10.0, 981.0], np.float32)
    context = ref['sd1_text_hidden'][:2, :, :16].copy()
    eps = unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    ref.update(sd1_unet_sample=sample, sd1_unet_t=t, sd1_unet_context=context, sd1_unet_eps=eps)

    z = rng.normal(size=(1, 4, 8, 8)).astype(np.float32)
    ref.update(vae_z=z, vae_image=vae.decode(torch.from_numpy(z)).sample.numpy())

    # SD2-like parts: a sharded U-Net at a size its upsamplers must match to the skips (10 x 6), and a
    # gelu text encoder with the new eos convention, saved as transformers 5 does (no prefix).
    unet2 = seeded(4, lambda: diffusers.UNet2DConditionModel(**UNET_SD2))
    unet2.save_pretrained(out / 'unet-sd2', safe_serialization=True, max_shard_size='200KB')
    sample = rng.normal(size=(2, 4, 10, 6)).astype(np.float32)
    t = np.array([999.0, 0.0], np.float32)
    context = rng.normal(size=(2, 7, 12)).astype(np.float32)
    eps = unet2(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    ref.update(sd2_unet_sample=sample, sd2_unet_t=t, sd2_unet_context=context, sd2_unet_eps=eps)

    text2 = seeded(5, lambda: transformers.CLIPTextModel(text_config(
        vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        hidden_act='gelu', bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0)),
                   scale=0.05)
    save_text_encoder(text2, out / 'text_encoder-sd2', prefixed=False)
    tokenizer2 = transformers.AutoTokenizer.from_pretrained(str(out / 'tokenizer-sd2'))
    batch = tokenizer2(['a photo of a cat', 'Two dogs playing in the park, 4k!'], padding='max_length',
                       max_length=77, truncation=True, return_tensors='pt')
    outputs = text2(batch['input_ids'], attention_mask=batch['attention_mask'])
    ref.update(sd2_text_ids=batch['input_ids'].numpy(), sd2_text_mask=batch['attention_mask'].numpy(),
               sd2_text_hidden=outputs.last_hidden_state.numpy(), sd2_text_pooled=outputs.pooler_output.numpy())

    # A PyTorch-pickle (`pytorch_model.bin`) text encoder, read through the allow-listed torch reader.
    text3 = seeded(6, lambda: transformers.CLIPTextModel(text_config(
        64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, bos_token_id=62,
        eos_token_id=63, pad_token_id=0)))
    text3.save_pretrained(out / 'text_encoder-bin', safe_serialization=False)
    if not (out / 'text_encoder-bin' / 'pytorch_model.bin').is_file():  # transformers 5 may refuse .bin
      shutil.rmtree(out / 'text_encoder-bin')
      (out / 'text_encoder-bin').mkdir()
      text3.config.to_json_file(str(out / 'text_encoder-bin' / 'config.json'))
      torch.save(text3.state_dict(), out / 'text_encoder-bin' / 'pytorch_model.bin')
    ids = torch.from_numpy(rng.integers(0, 64, size=(2, 9)))
    ref.update(bin_text_ids=ids.numpy(), bin_text_hidden=text3(ids).last_hidden_state.numpy())
  np.savez_compressed(out / 'reference.npz', **ref)


# Published configs (config.json of stable-diffusion-v1-5 and stable-diffusion-2-1-base).
SD15_UNET = dict(act_fn='silu', attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 center_input_sample=False, cross_attention_dim=768,
                 down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'], downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
                 norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
                 up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3)
SD21_BASE_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                      dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
                      use_linear_projection=True)
SD15_TEXT = dict(architectures=['CLIPTextModel'], attention_dropout=0.0, bos_token_id=0, dropout=0.0,
                 eos_token_id=2, hidden_act='quick_gelu', hidden_size=768, initializer_factor=1.0,
                 initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-05, max_position_embeddings=77,
                 model_type='clip_text_model', num_attention_heads=12, num_hidden_layers=12, pad_token_id=1,
                 projection_dim=768, torch_dtype='float32', vocab_size=49408)
SD21_BASE_TEXT = dict(SD15_TEXT, hidden_act='gelu', hidden_size=1024, intermediate_size=4096,
                      num_attention_heads=16, num_hidden_layers=23, projection_dim=512)


def make_shape_tables(out):
  """name -> shape of the diffusers / transformers modules built from the real configs (meta device)."""
  import diffusers
  import torch
  import transformers
  tables = {}
  with torch.device('meta'):
    for name, config in (('sd15_unet', SD15_UNET), ('sd21_base_unet', SD21_BASE_UNET)):
      tables[name] = {k: list(v.shape) for k, v in diffusers.UNet2DConditionModel(**config).state_dict().items()}
    for name, config in (('sd15_text', SD15_TEXT), ('sd21_base_text', SD21_BASE_TEXT)):
      keys = ('architectures', 'model_type', 'torch_dtype')
      model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
          **{k: v for k, v in config.items() if k not in keys}))
      # Published checkpoints name the parameters `text_model.*` (transformers < 5 layout).
      prefix = '' if next(iter(model.state_dict())).startswith('text_model.') else 'text_model.'
      tables[name] = {prefix + k: list(v.shape) for k, v in model.state_dict().items()}
  for name, table in tables.items():
    print(f'{name}: {sum(int(np.prod(s)) for s in table.values()):,} parameters')
  with open(out / 'sd_shapes.json', 'w', encoding='utf-8') as f:
    json.dump({'diffusers': diffusers.__version__, 'transformers': transformers.__version__, **tables}, f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--slow-tokenizer', action='store_true',
                      help='only write tokenizer_ids_slow_ftfy.json: ids of the pure-Python and the fast '
                           'tokenizer of transformers < 5 (needs ftfy)')
  parser.add_argument('--new-vocabulary', action='store_true',
                      help='train a new test vocabulary instead of keeping the stored one')
  args = parser.parse_args()
  if args.slow_tokenizer:
    tokenizer_ids(HERE, slow=True)
    return
  for name in ('tiny-sd/unet', 'tiny-sd/text_encoder', 'tiny-sd/vae', 'tiny-sd/scheduler', 'unet-sd2',
               'text_encoder-sd2', 'text_encoder-bin'):
    shutil.rmtree(HERE / name, ignore_errors=True)
  vocab_path = HERE / 'tiny-sd' / 'tokenizer' / 'vocab.json'
  if args.new_vocabulary or not vocab_path.is_file():
    vocab_size = make_tokenizers(HERE)
    print('new vocabulary: rerun with --slow-tokenizer under transformers 4.x as well')
  else:
    vocab_size = len(json.loads(vocab_path.read_text(encoding='utf-8')))
  tokenizer_ids(HERE, slow=False)
  make_models(HERE, vocab_size)
  make_shape_tables(HERE)


if __name__ == '__main__':
  main()
