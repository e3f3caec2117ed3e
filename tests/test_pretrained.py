"""load_pretrained: tiny diffusers / transformers folders (saved by tests/data/t2i/make_reference.py) against
the outputs diffusers / transformers computed, sharded and .bin weights, variants, and every refusal."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from sida_jax import models
from sida_jax.formats import pretrained

DATA = pathlib.Path(__file__).resolve().parent / 'data' / 't2i'
REF = np.load(DATA / 'reference.npz')
PIXART = DATA.parent / 't2i_pixart'
# PixArt-alpha/PixArt-XL-2-512x512 model_index.json (diffusers 0.22 spelling of the transformer class).
PIXART_INDEX = {'_class_name': 'PixArtAlphaPipeline', '_diffusers_version': '0.22.0.dev0',
                'scheduler': ['diffusers', 'DPMSolverMultistepScheduler'],
                'text_encoder': ['transformers', 'T5EncoderModel'], 'tokenizer': ['transformers', 'T5Tokenizer'],
                'transformer': ['diffusers', 'Transformer2DModel'], 'vae': ['diffusers', 'AutoencoderKL']}


def assert_close(got, ref, rel, what=''):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  err, scale = np.max(np.abs(got - ref)), np.max(np.abs(ref))
  assert err <= rel * scale, f'{what}: max error {err:.3g} vs max |ref| {scale:.3g}'


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_pipeline_folder():
  pytest.importorskip('tokenizers', reason='the pipeline tokenizer needs the tokenizers package')
  sd = models.load_pretrained(str(DATA / 'tiny-sd'))
  assert isinstance(sd, pretrained.Pipeline) and sd.class_name == 'StableDiffusionPipeline'
  assert sd.scheduler['_class_name'] == 'PNDMScheduler' and sd.scheduler['beta_schedule'] == 'scaled_linear'
  assert sd.vae.config['scaling_factor'] == 0.18215
  ids = sd.tokenizer(['a photo of a cat', 'Two dogs playing in the park, 4k!', '']).input_ids
  np.testing.assert_array_equal(ids, REF['sd1_text_ids'])
  hidden, pooled = sd.text_encoder(ids, return_pooled=True)
  assert_close(hidden, REF['sd1_text_hidden'], 1e-4, 'text encoder')
  assert_close(pooled, REF['sd1_text_pooled'], 1e-4, 'pooled')
  eps = sd.unet(nhwc(REF['sd1_unet_sample']), REF['sd1_unet_t'], REF['sd1_unet_context'])
  assert_close(eps, nhwc(REF['sd1_unet_eps']), 1e-4, 'unet')
  image = sd.vae(nhwc(REF['vae_z']), method='decode')
  assert_close(image, nhwc(REF['vae_image']), 1e-4, 'vae decode')


def _pixart_pipeline(tmp_path, index=None):
  """A PixArt pipeline folder from the stored tiny parts (transformer, T5, tokenizer; SD's tiny VAE)."""
  folder = tmp_path / 'pixart'
  folder.mkdir(parents=True)
  for part, source in (('transformer', PIXART), ('text_encoder', PIXART), ('tokenizer', PIXART),
                       ('vae', DATA / 'tiny-sd')):
    (folder / part).symlink_to(source / part, target_is_directory=True)
  (folder / 'scheduler').mkdir()
  (folder / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(
      {'_class_name': 'DPMSolverMultistepScheduler', 'beta_schedule': 'linear', 'beta_start': 0.0001,
       'beta_end': 0.02, 'num_train_timesteps': 1000, 'prediction_type': 'epsilon'}))
  (folder / 'model_index.json').write_text(json.dumps(index or PIXART_INDEX))
  return folder


def test_pixart_pipeline_folder(tmp_path):
  """One call loads PixArt's transformer (legacy class name), T5 encoder, T5 tokenizer, VAE and scheduler;
  the chain tokenizer → T5 → transformer reproduces the transformers / diffusers outputs."""
  pipe = models.load_pretrained(str(_pixart_pipeline(tmp_path)))
  assert isinstance(pipe, pretrained.Pipeline) and pipe.class_name == 'PixArtAlphaPipeline'
  assert pipe.unet is None and pipe.denoiser is pipe.transformer
  assert pipe.transformer.class_name == 'PixArtTransformer2DModel'   # declared as Transformer2DModel
  assert pipe.text_encoder.class_name == 'T5EncoderModel'
  assert pipe.scheduler['_class_name'] == 'DPMSolverMultistepScheduler'
  ref = np.load(PIXART / 'reference.npz')
  prompts = json.loads((PIXART / 'prompts.json').read_text())
  tokens = pipe.tokenizer(prompts, max_length=ref['input_ids'].shape[1])
  np.testing.assert_array_equal(tokens['input_ids'], ref['input_ids'])
  np.testing.assert_array_equal(tokens['attention_mask'], ref['attention_mask'])
  hidden = pipe.text_encoder(tokens['input_ids'], tokens['attention_mask'])
  assert_close(hidden, ref['t5_hidden'], 1e-4, 'T5 encoder')
  out = pipe.transformer(nhwc(ref['latents']), ref['timesteps'], ref['t5_hidden'], ref['attention_mask'],
                         {'resolution': ref['resolution'], 'aspect_ratio': ref['aspect_ratio']})
  assert_close(out, nhwc(ref['pixart_out']), 1e-4, 'PixArt transformer')
  image = pipe.vae(nhwc(REF['vae_z']), method='decode')
  assert_close(image, nhwc(REF['vae_image']), 1e-4, 'vae decode')


def test_pixart_model_folders_and_index_errors(tmp_path):
  text = pretrained.load_pretrained(PIXART / 'text_encoder')
  assert text.class_name == 'T5EncoderModel' and text.module.feed_forward_proj == 'gated-gelu'
  assert 'PixArtTransformer2DModel' in pretrained.supported_classes()
  with pytest.raises(ValueError, match="transformer is declared 'UNet2DConditionModel' but .* holds "
                                       "'PixArtTransformer2DModel'"):
    models.load_pretrained(_pixart_pipeline(tmp_path / 'a', dict(PIXART_INDEX, transformer=['diffusers',
                                                                                          'UNet2DConditionModel'])))
  with pytest.raises(ValueError, match="both 'unet' and 'transformer' entries"):
    models.load_pretrained(_pixart_pipeline(tmp_path / 'b', dict(PIXART_INDEX, unet=['diffusers',
                                                                                   'UNet2DConditionModel'])))
  with pytest.raises(ValueError, match="text_encoder is declared 'CLIPTextModel' but .* holds 'T5EncoderModel'"):
    models.load_pretrained(_pixart_pipeline(tmp_path / 'c', dict(PIXART_INDEX, text_encoder=['transformers',
                                                                                           'CLIPTextModel'])))


def test_model_folders():
  """A U-Net sharded over four safetensors (SD2 layout, 10 x 6 latents), an unprefixed gelu text encoder with a
  padding mask, and a `pytorch_model.bin` text encoder read by the allow-listed torch reader."""
  unet = pretrained.load_pretrained(DATA / 'unet-sd2')
  assert unet.class_name == 'UNet2DConditionModel' and unet.module.use_linear_projection
  assert len(list((DATA / 'unet-sd2').glob('*.safetensors'))) == 4
  eps = unet(nhwc(REF['sd2_unet_sample']), REF['sd2_unet_t'], REF['sd2_unet_context'])
  assert_close(eps, nhwc(REF['sd2_unet_eps']), 1e-4, 'sharded unet')

  text = pretrained.load_pretrained(DATA / 'text_encoder-sd2')
  assert text.module.hidden_act == 'gelu'
  hidden, pooled = text(REF['sd2_text_ids'], attention_mask=REF['sd2_text_mask'], return_pooled=True)
  assert_close(hidden, REF['sd2_text_hidden'], 1e-4, 'text encoder (masked)')
  assert_close(pooled, REF['sd2_text_pooled'], 1e-4, 'pooled (first end token)')

  binary = pretrained.load_pretrained(DATA / 'text_encoder-bin')
  assert_close(binary(REF['bin_text_ids']), REF['bin_text_hidden'], 1e-4, '.bin text encoder')


def test_dtype_and_variant(tmp_path):
  """Half-precision weights under a variant name load as float32 parameters; bfloat16 compute."""
  folder = tmp_path / 'unet'
  folder.mkdir()
  shutil.copy(DATA / 'tiny-sd' / 'unet' / 'config.json', folder)
  state = load_file(str(DATA / 'tiny-sd' / 'unet' / 'diffusion_pytorch_model.safetensors'))
  save_file({k: v.astype(np.float16) for k, v in state.items()},
            str(folder / 'diffusion_pytorch_model.fp16.safetensors'))
  with pytest.raises(FileNotFoundError, match='no weights found.*diffusion_pytorch_model.safetensors'):
    pretrained.load_pretrained(folder)
  unet = pretrained.load_pretrained(folder, dtype=jnp.bfloat16, variant='fp16')
  assert unet.module.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(unet.params))
  name = 'up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight'
  flat = {'.'.join(k): v for k, v in traverse_util.flatten_dict(unet.params).items()}
  np.testing.assert_array_equal(np.asarray(flat[name]), state[name].astype(np.float16).astype(np.float32))
  eps = unet(nhwc(REF['sd1_unet_sample']), REF['sd1_unet_t'], REF['sd1_unet_context'])
  assert eps.dtype == jnp.float32
  assert_close(eps, nhwc(REF['sd1_unet_eps']), 5e-2, 'bf16 compute, fp16 weights')


def _copy_unet(tmp_path, edit):
  folder = tmp_path / 'unet'
  folder.mkdir(parents=True)
  shutil.copy(DATA / 'tiny-sd' / 'unet' / 'config.json', folder)
  state = load_file(str(DATA / 'tiny-sd' / 'unet' / 'diffusion_pytorch_model.safetensors'))
  save_file(edit(dict(state)), str(folder / 'diffusion_pytorch_model.safetensors'))
  return folder


def test_strict_names_and_shapes(tmp_path):
  def drop(state):
    del state['mid_block.attentions.0.proj_out.bias']
    return state
  with pytest.raises(ValueError, match="1 missing key.*'mid_block.attentions.0.proj_out.bias'"):
    pretrained.load_pretrained(_copy_unet(tmp_path / 'a', drop))

  def add(state):
    state['mid_block.attentions.0.proj_out.extra'] = np.zeros(2, np.float32)
    return state
  with pytest.raises(ValueError, match="1 unexpected key.*'mid_block.attentions.0.proj_out.extra'"):
    pretrained.load_pretrained(_copy_unet(tmp_path / 'b', add))

  def reshape(state):
    state['conv_in.weight'] = np.zeros((16, 4, 1, 1), np.float32)
    return state
  with pytest.raises(ValueError, match=r"'conv_in.weight' has shape \(16, 4, 1, 1\), expected \(16, 4, 3, 3\)"):
    pretrained.load_pretrained(_copy_unet(tmp_path / 'c', reshape))


def test_refusals(tmp_path):
  with pytest.raises(FileNotFoundError, match='pretrained folder not found'):
    pretrained.load_pretrained(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    pretrained.load_pretrained(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DModel'}))
  with pytest.raises(ValueError, match="unsupported class 'UNet2DModel'.*UNet2DConditionModel"):
    pretrained.load_pretrained(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DConditionModel',
                                                    'class_embed_type': 'timestep'}))
  with pytest.raises(ValueError, match="unsupported class_embed_type='timestep'"):
    pretrained.load_pretrained(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'clip_text_model'}))
  with pytest.raises(ValueError, match='no `_class_name` and not exactly one `architectures`'):
    pretrained.load_pretrained(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'_class_name': 'AutoencoderKL'}))
  (tmp_path / 'v1-5-pruned.ckpt').write_bytes(b'not read')
  with pytest.raises(ValueError, match='v1-5-pruned.ckpt: single-file checkpoints are not read'):
    pretrained.load_pretrained(tmp_path)


def test_sharded_index_errors(tmp_path):
  folder = tmp_path / 'unet'
  shutil.copytree(DATA / 'unet-sd2', folder)
  index_path = folder / 'diffusion_pytorch_model.safetensors.index.json'
  index = json.loads(index_path.read_text())
  name, shard = next(iter(index['weight_map'].items()))
  other = next(s for s in sorted(set(index['weight_map'].values())) if s != shard)
  moved = dict(index, weight_map=dict(index['weight_map'], **{name: other}))
  index_path.write_text(json.dumps(moved))
  with pytest.raises(ValueError, match=f"key '{name}' is not where the index says"):
    pretrained.load_pretrained(folder)
  index_path.write_text(json.dumps(index))
  state = load_file(str(folder / other))
  save_file(dict(state, **{name: load_file(str(folder / shard))[name]}), str(folder / other))
  with pytest.raises(ValueError, match=f"key '{name}' is also in another shard"):
    pretrained.load_pretrained(folder)


def test_pipeline_index_errors(tmp_path):
  pytest.importorskip('tokenizers', reason='the pipeline tokenizer needs the tokenizers package')
  folder = tmp_path / 'sd'
  shutil.copytree(DATA / 'tiny-sd', folder)
  index = json.loads((folder / 'model_index.json').read_text())
  (folder / 'model_index.json').write_text(json.dumps(dict(index, vae=['diffusers', 'AutoencoderTiny'])))
  with pytest.raises(ValueError, match="vae is declared 'AutoencoderTiny' but .* holds 'AutoencoderKL'"):
    pretrained.load_pretrained(folder)
  (folder / 'model_index.json').write_text(json.dumps({k: v for k, v in index.items() if k != 'unet'}))
  with pytest.raises(ValueError, match="no 'unet' entry"):
    pretrained.load_pretrained(folder)
  (folder / 'model_index.json').write_text(json.dumps(dict(index, tokenizer=['transformers', 'LlamaTokenizer'])))
  with pytest.raises(ValueError, match="unsupported tokenizer class 'LlamaTokenizer'"):
    pretrained.load_pretrained(folder)


def test_pipeline_parts(tmp_path):
  """`parts` loads only some entries (the text side without the U-Net); the others stay None."""
  pytest.importorskip('tokenizers', reason='the pipeline tokenizer needs the tokenizers package')
  sd = pretrained.load_pipeline(str(DATA / 'tiny-sd'), parts=('vae', 'scheduler'))
  assert sd.unet is None and sd.text_encoder is None and sd.tokenizer is None and sd.denoiser is None
  assert sd.scheduler['beta_schedule'] == 'scaled_linear'
  assert_close(sd.vae(nhwc(REF['vae_z']), method='decode'), nhwc(REF['vae_image']), 1e-4, 'vae decode')
  with pytest.raises(ValueError, match="no part 'transformer' to load"):
    pretrained.load_pipeline(str(DATA / 'tiny-sd'), parts=('transformer',))
