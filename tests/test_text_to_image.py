"""The text side of text-to-image runs: empty-prompt embedding, images from (seed, prompt) pairs whatever the batch,
the official COCO resize, and FID plumbing with a stub detector."""
import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax import evaluation, sampling, text_to_image
from sida_jax.metrics import fid as fid_lib

pytest.importorskip('tokenizers', reason='the pipeline tokenizer needs the tokenizers package')

PIPE = pathlib.Path(__file__).resolve().parent / 'data' / 't2i' / 'tiny-lsg'
LATENT = (8, 8, 4)


@pytest.fixture(scope='module')
def text():
  return text_to_image.load_text_side(str(PIPE))


def _generate(z, embeddings):
  """A stand-in one-step generator: latents depend on the noise and on the prompt's embedding."""
  return 0.5 * z + jnp.mean(embeddings, axis=(1, 2))[:, None, None, None]


def test_text_side_of_the_pipeline(text):
  assert text.embedding_shape == (77, 32)
  np.testing.assert_allclose(text.null_embedding, text.embed_prompts(['']), rtol=1e-6, atol=1e-6)
  ids = text.token_ids(['a cat', ''])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert not np.allclose(text.embed_prompts(['a cat']), text.null_embedding)
  # decode = the VAE's decoder on latents / scaling_factor.
  z = np.random.default_rng(0).standard_normal((2, *LATENT)).astype(np.float32)
  expected = text.vae(z / text.vae.config['scaling_factor'], method='decode')
  np.testing.assert_allclose(text.decode(z), expected, rtol=1e-6, atol=1e-6)
  # bfloat16 runs: the text encoder computes in bfloat16, the VAE stays float32 (as the official code upcasts it).
  half = text_to_image.load_text_side(str(PIPE), jnp.bfloat16)
  assert half.text_encoder.module.dtype == jnp.bfloat16 and half.vae.module.dtype == jnp.float32
  np.testing.assert_allclose(half.null_embedding, text.null_embedding, atol=0.05 * np.abs(text.null_embedding).max())


def test_images_pair_seed_i_with_prompt_i_mod_n_whatever_the_batch(text):
  prompts = ['a cat', 'a dog', 'a red car']
  seeds = [5, 6, 7, 8, 9]
  in_threes = np.concatenate(list(text_to_image.generated_images(_generate, text, LATENT, seeds, prompts, 3)))
  in_twos = np.concatenate(list(text_to_image.generated_images(_generate, text, LATENT, seeds, prompts, 2)))
  np.testing.assert_array_equal(in_threes, in_twos)
  assert in_threes.shape == (5, 16, 16, 3) and in_threes.dtype == np.uint8
  for i in (0, 4):   # image 4 is seed 9 with prompt 4 mod 3 = 1
    z, _ = sampling.seed_noise([seeds[i]], LATENT)
    alone = sampling.to_uint8(text.decode(_generate(jnp.asarray(z), text.embed_prompts([prompts[i % 3]]))))
    np.testing.assert_array_equal(in_threes[i], alone[0])


def test_resize_matches_the_official_torchvision_round_trip():
  torch = pytest.importorskip('torch', reason='the official resize path needs torch and torchvision')
  functional = pytest.importorskip('torchvision.transforms.functional')
  import PIL.Image  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  ours = text_to_image.resize_like_official(images, 20)
  for image, got in zip(images, ours):
    pil = functional.to_pil_image(torch.from_numpy(image).permute(2, 0, 1))
    official = (functional.to_tensor(pil.resize((20, 20), PIL.Image.LANCZOS)) * 255).byte()
    np.testing.assert_array_equal(got, official.permute(1, 2, 0).numpy())
  assert text_to_image.resize_like_official(images, 0) is images


def test_fid_and_clip_hook_plumbing(text):
  """FID of the generated images' features against a reference, with a stub detector (mean colour)."""
  features = lambda images: (np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(axis=1), None)
  detector = evaluation.Detector('stub', features)
  prompts = ['a cat', 'a dog', 'a red car']
  reference = (np.zeros(3), np.eye(3) * 100.0)
  seen = []

  def clip_score_fn(images, texts):
    seen.extend(texts)
    return np.full(len(images), 0.25)

  results = text_to_image.evaluate(_generate, text, LATENT, prompts, detector, reference, num_images=5,
                                   batch_size=2, seed_offset=3, resolution=8, clip_score_fn=clip_score_fn)
  images = np.concatenate(list(text_to_image.generated_images(_generate, text, LATENT, range(3, 8), prompts, 5)))
  feats = features(text_to_image.resize_like_official(images, 8))[0]
  expected = fid_lib.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), *reference)
  np.testing.assert_allclose(results['fid'], expected, rtol=1e-6)
  assert seen == ['a cat', 'a dog', 'a red car', 'a cat', 'a dog'] and results['clip_score'] == 0.25


PIXART = pathlib.Path(__file__).resolve().parent / 'data' / 't2i' / 'tiny-pixart'
T5_REFERENCE = pathlib.Path(__file__).resolve().parent / 'data' / 't2i_pixart'


def test_t5_text_side_carries_attention_masks():
  """PixArt's text side: T5 tokens with their mask (120 long), the encoder called with it (transformers' outputs
  in tests/data/t2i_pixart), and the condition {'embedding', 'mask'} split over the devices like the tokens."""
  import json  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from sida_jax.text import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  from sida_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  text = text_to_image.load_text_side(str(PIXART))
  assert text.masked and text.embedding_shape == (120, 16)
  ref = np.load(T5_REFERENCE / 'reference.npz')
  prompts = json.loads((T5_REFERENCE / 'prompts.json').read_text())
  tokens = text.tokens(prompts)
  np.testing.assert_array_equal(tokens['input_ids'], ref['input_ids'])
  np.testing.assert_array_equal(tokens['attention_mask'], ref['attention_mask'])
  condition = text.embed_prompts(prompts)
  np.testing.assert_array_equal(condition['mask'], ref['attention_mask'])
  np.testing.assert_allclose(condition['embedding'], ref['t5_hidden'], rtol=1e-5, atol=1e-5)
  # Without the mask the padded positions would change every embedding (so the mask is really used).
  unmasked = text.embed(jnp.asarray(tokens['input_ids']))
  assert np.abs(np.asarray(unmasked) - ref['t5_hidden']).max() > 1e-3
  np.testing.assert_allclose(text.null_embedding, text.embed_prompts([''])['embedding'], rtol=1e-6, atol=1e-6)

  text = dataclasses.replace(text, prompts=prompts_lib.PromptDataset('test', prompts))
  batch = next(text.host_batches(8, seed=0, start_step=0))
  assert set(batch['critic']) == {'input_ids', 'attention_mask'} and batch['critic']['input_ids'].shape == (8, 120)
  mesh = step_lib.make_mesh()
  device = text.device_batch(step_lib.shard_batch(batch, mesh))
  labels = device['generator']['labels']
  assert labels['embedding'].shape == (8, 120, 16) and labels['mask'].shape == (8, 120)
  assert labels['embedding'].sharding.is_equivalent_to(jax.NamedSharding(mesh, jax.sharding.PartitionSpec('data')), 3)
  host = text.condition({k: jnp.asarray(v) for k, v in batch['generator'].items()})
  np.testing.assert_allclose(labels['embedding'], host['embedding'], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels['mask'], batch['generator']['attention_mask'])


def test_text_encoder_is_stored_in_the_compute_dtype():
  """float32 runs keep the converted float32 weights (embeddings unchanged: the encoder applied to the weights
  read directly from the folder); bfloat16 runs store bfloat16 weights, embeddings within bfloat16 tolerance."""
  import jax  # pylint: disable=import-outside-toplevel
  from sida_jax.formats import pretrained  # pylint: disable=import-outside-toplevel
  prompts = ['a photo of a cat', '', 'two dogs in the park']
  for folder in (PIPE, PIXART):
    direct = pretrained.load_network(str(folder / 'text_encoder'))
    full, half = text_to_image.load_text_side(str(folder)), text_to_image.load_text_side(str(folder), jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(full.text_encoder.variables)} == {np.dtype('float32')}
    assert {x.dtype for x in jax.tree.leaves(half.text_encoder.variables)} == {np.dtype(jnp.bfloat16)}
    tokens = full.tokens(prompts)
    expected = direct(*[jnp.asarray(v) for v in tokens.values()])
    got = full.embed_prompts(prompts)
    got_half = half.embed_prompts(prompts)
    if full.masked:
      np.testing.assert_array_equal(got['mask'], tokens['attention_mask'])
      got, got_half = got['embedding'], got_half['embedding']
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert np.asarray(got_half).dtype == np.float32
    err = np.abs(np.asarray(got_half) - np.asarray(expected)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(expected)).max(), (folder.name, err)


def test_fsdp_split_text_encoder_gives_the_replicated_embeddings():
  """On a data = 2 × fsdp = 4 mesh the encoder's weights are split along 'fsdp' (by the parameters' rules), and
  the embeddings equal those of the encoder replicated on a data-only mesh."""
  import jax  # pylint: disable=import-outside-toplevel
  from sida_jax.train import sharding, step as step_lib  # pylint: disable=import-outside-toplevel
  prompts = ['a photo of a cat', 'a dog', '', 'a red car', 'a bowl of fruit', 'a bird', 'a train', 'snow']
  for folder in (PIPE, PIXART):
    text = text_to_image.load_text_side(str(folder), min_shard_size=0)
    tokens = text.tokens(prompts)
    split_mesh, data_mesh = sharding.make_mesh(2, 4), sharding.make_mesh(8, 1)
    split = text.condition(step_lib.shard_batch(tokens, split_mesh))
    replicated = text.condition(step_lib.shard_batch(tokens, data_mesh))
    placed = {mesh: weights for mesh, (weights, _) in text._placed.items()}  # pylint: disable=protected-access
    rules = sharding.Layout(split_mesh, 0)
    for x in jax.tree.leaves(placed[split_mesh]):
      assert x.sharding.spec == rules.spec(x.shape)
    assert {x.sharding.spec for x in jax.tree.leaves(placed[data_mesh])} == {jax.sharding.PartitionSpec()}
    first = split_mesh.devices.reshape(-1)[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves(placed[split_mesh]) for s in x.addressable_shards
               if s.device == first)
    whole = sum(x.nbytes for x in jax.tree.leaves(placed[split_mesh]))
    assert held < 0.5 * whole
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(replicated)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    emb = split['embedding'] if text.masked else split
    assert emb.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
