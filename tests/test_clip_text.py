"""CLIP text encoder port (transformers CLIPTextModel): stored transformers outputs, real SD configs, masks,
strict conversion, and live parity with transformers (optional, parity environment)."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sida_jax.models.t2i import clip_text, layers

DATA = pathlib.Path(__file__).resolve().parent / 'data' / 't2i'

# Published text_encoder/config.json of stable-diffusion-v1-5 (OpenAI CLIP ViT-L/14) and
# stable-diffusion-2-1-base (OpenCLIP ViT-H/14 without its last layer).
SD15 = dict(_name_or_path='openai/clip-vit-large-patch14', architectures=['CLIPTextModel'], attention_dropout=0.0,
            bos_token_id=0, dropout=0.0, eos_token_id=2, hidden_act='quick_gelu', hidden_size=768,
            initializer_factor=1.0, initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-05,
            max_position_embeddings=77, model_type='clip_text_model', num_attention_heads=12,
            num_hidden_layers=12, pad_token_id=1, projection_dim=768, torch_dtype='float32',
            transformers_version='4.22.0.dev0', vocab_size=49408)
SD21_BASE = dict(SD15, _name_or_path='hf-models/stable-diffusion-v2-768x768/text_encoder', hidden_act='gelu',
                 hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 projection_dim=512, transformers_version='4.25.0.dev0')
TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12, eos_token_id=49)


def assert_close(got, ref, rel, what=''):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  err, scale = np.max(np.abs(got - ref)), np.max(np.abs(ref))
  assert err <= rel * scale, f'{what}: max error {err:.3g} vs max |ref| {scale:.3g}'


def random_state(encoder, seed=0):
  rng = np.random.default_rng(seed)
  shapes = layers.param_shapes(clip_text.params_template(encoder))
  return {name: rng.normal(size=shape).astype(np.float32) * 0.3 for name, shape in shapes.items()}


def test_matches_stored_transformers_outputs():
  """SD1.5-style folder: published names (`text_model.` prefix, `position_ids` buffer), quick_gelu, the old
  eos convention (pooled at the largest id)."""
  folder = DATA / 'tiny-sd' / 'text_encoder'
  encoder = clip_text.from_transformers_config(json.loads((folder / 'config.json').read_text()))
  state = load_file(str(folder / 'model.safetensors'))
  assert 'text_model.embeddings.position_ids' in state
  variables = clip_text.convert_transformers_state(state, encoder)
  ref = np.load(DATA / 'reference.npz')
  hidden, pooled = jax.jit(encoder.apply, static_argnames='return_pooled')(
      variables, ref['sd1_text_ids'], return_pooled=True)
  assert_close(hidden, ref['sd1_text_hidden'], 1e-4, 'last_hidden_state')
  assert_close(pooled, ref['sd1_text_pooled'], 1e-4, 'pooled')


@pytest.mark.parametrize('name,config,count', [('sd15_text', SD15, 123_060_480),
                                                ('sd21_base_text', SD21_BASE, 340_387_840)])
def test_real_configs_names_and_shapes(name, config, count):
  """Every name and shape of transformers' module for the published config (table written by
  tests/data/t2i/make_reference.py), and the parameter counts."""
  ours = layers.param_shapes(clip_text.params_template(clip_text.from_transformers_config(config)))
  table = json.loads((DATA / 'sd_shapes.json').read_text())[name]
  assert ours == {k: tuple(v) for k, v in table.items()}
  assert sum(math.prod(s) for s in ours.values()) == count
  assert ours['text_model.encoder.layers.0.self_attn.q_proj.weight'] == (config['hidden_size'],) * 2


def test_causal_and_padding_masks():
  encoder = clip_text.CLIPTextModel(**TINY)
  variables = clip_text.convert_transformers_state(random_state(encoder), encoder)
  apply = jax.jit(encoder.apply)
  ids = np.random.default_rng(0).integers(0, 49, size=(2, 12))
  base = np.asarray(apply(variables, ids))
  # Causal: changing token 7 leaves positions 0..6 unchanged and changes 7.
  changed = ids.copy()
  changed[:, 7] = (changed[:, 7] + 1) % 49
  out = np.asarray(apply(variables, changed))
  np.testing.assert_allclose(out[:, :7], base[:, :7], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(out[:, 7:] - base[:, 7:])) > 1e-3
  # Padding mask: keys beyond the mask are invisible, so padded ids do not change the valid positions.
  mask = np.ones_like(ids)
  mask[:, 9:] = 0
  masked = np.asarray(apply(variables, ids, mask))
  other_padding = ids.copy()
  other_padding[:, 9:] = 3
  np.testing.assert_allclose(np.asarray(apply(variables, other_padding, mask))[:, :9], masked[:, :9], rtol=1e-6,
                             atol=1e-6)
  # Valid positions attend only to valid earlier keys: the same as the causal run there.
  np.testing.assert_allclose(masked[:, :9], base[:, :9], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(masked[:, 9:] - base[:, 9:])) > 1e-3


def test_pooled_output_positions():
  ids = np.array([[0, 5, 49, 49, 49], [0, 5, 7, 9, 49]])
  for eos, positions in ((49, [2, 4]), (2, [2, 4])):  # first end token; largest id (old configs)
    encoder = clip_text.CLIPTextModel(**dict(TINY, eos_token_id=eos))
    variables = clip_text.convert_transformers_state(random_state(encoder), encoder)
    hidden, pooled = encoder.apply(variables, ids, return_pooled=True)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(hidden)[[0, 1], positions])
  # With the old convention an id larger than the end token moves the pooling position.
  ids_big = np.array([[0, 48, 5, 47, 46]])
  hidden, pooled = encoder.apply(variables, ids_big, return_pooled=True)
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(hidden)[:, 1])


def test_state_dict_spellings_and_errors():
  encoder = clip_text.CLIPTextModel(**TINY)
  state = random_state(encoder)
  variables = clip_text.convert_transformers_state(state, encoder)
  # transformers >= 5 writes the same weights without `text_model.`.
  bare = {k[len('text_model.'):]: v for k, v in state.items()}
  same = clip_text.convert_transformers_state(bare, encoder)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, same, variables))
  mixed = dict(bare, **{'text_model.final_layer_norm.weight': state['text_model.final_layer_norm.weight']})
  mixed.pop('final_layer_norm.weight')
  with pytest.raises(ValueError, match="lacks the 'text_model.' prefix"):
    clip_text.convert_transformers_state(mixed, encoder)
  positions = np.arange(12)[None]
  clip_text.convert_transformers_state(dict(state, **{'text_model.embeddings.position_ids': positions}), encoder)
  with pytest.raises(ValueError, match='position_ids is not arange'):
    clip_text.convert_transformers_state(
        dict(state, **{'text_model.embeddings.position_ids': positions[:, ::-1]}), encoder)
  name = 'text_model.encoder.layers.1.mlp.fc2.bias'
  with pytest.raises(ValueError, match=f"1 missing key.*'{name}'"):
    clip_text.convert_transformers_state({k: v for k, v in state.items() if k != name}, encoder)
  with pytest.raises(ValueError, match="unexpected key.*'text_model.encoder.layers.2.mlp.fc2.bias'"):
    clip_text.convert_transformers_state(
        dict(state, **{'text_model.encoder.layers.2.mlp.fc2.bias': np.zeros(16)}), encoder)
  with pytest.raises(ValueError, match=r"'text_model.embeddings.token_embedding.weight' has shape \(49, 16\)"):
    clip_text.convert_transformers_state(
        dict(state, **{'text_model.embeddings.token_embedding.weight': np.zeros((49, 16))}), encoder)


def test_config_errors_and_lengths():
  with pytest.raises(ValueError, match="unknown key 'rope_theta'"):
    clip_text.from_transformers_config(dict(SD15, rope_theta=1e4))
  with pytest.raises(ValueError, match="unsupported hidden_act='relu'"):
    clip_text.from_transformers_config(dict(SD15, hidden_act='relu'))
  with pytest.raises(ValueError, match='unsupported pruned_heads'):
    clip_text.from_transformers_config(dict(SD15, pruned_heads={'0': [1]}))
  encoder = clip_text.from_transformers_config(dict(SD21_BASE, do_sample=False, top_k=50), jnp.bfloat16)
  assert (encoder.num_hidden_layers, encoder.hidden_act, encoder.dtype) == (23, 'gelu', jnp.bfloat16)
  tiny = clip_text.CLIPTextModel(**TINY)
  with pytest.raises(ValueError, match='13 tokens exceed max_position_embeddings 12'):
    tiny.init(jax.random.key(0), jnp.zeros((1, 13), jnp.int32))


# ----------------------------------------------------------------------------------------------------
# Live parity with transformers (parity environment).


def _transformers():
  torch = pytest.importorskip('torch', reason='parity test needs torch (parity environment)')
  transformers = pytest.importorskip('transformers', reason='parity test needs transformers (parity environment)')
  return torch, transformers


@pytest.mark.parametrize('act,eos', [('quick_gelu', 2), ('gelu', 99)])
def test_parity_with_transformers(act, eos):
  torch, transformers = _transformers()
  config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
                                       bos_token_id=98, eos_token_id=eos, pad_token_id=0)
  torch.manual_seed(0)
  ref = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  encoder = clip_text.from_transformers_config(config.to_dict())
  variables = clip_text.convert_transformers_state({k: v.numpy() for k, v in ref.state_dict().items()}, encoder)
  ids = np.random.default_rng(0).integers(1, 98, size=(3, 16))
  ids[:, 0] = 98
  ids[0, 5], ids[1, 15], ids[2, 9] = 99, 99, 99
  mask = np.ones_like(ids)
  mask[0, 6:], mask[2, 10:] = 0, 0
  apply = jax.jit(encoder.apply, static_argnames='return_pooled')
  for m in (None, mask):
    with torch.no_grad():
      out = ref(torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m))
    hidden, pooled = apply(variables, ids, m, return_pooled=True)
    assert_close(hidden, out.last_hidden_state.numpy(), 1e-4, f'{act} mask={m is not None}')
    assert_close(pooled, out.pooler_output.numpy(), 1e-4, f'{act} pooled')


def test_real_config_counts_match_transformers():
  torch, transformers = _transformers()
  for config in (SD15, SD21_BASE):
    kwargs = {k: v for k, v in config.items()
              if not k.startswith('_') and k not in ('architectures', 'model_type', 'torch_dtype',
                                                      'transformers_version')}
    with torch.device('meta'):
      ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs))
    ref_shapes = {k if k.startswith('text_model.') else 'text_model.' + k: tuple(v.shape)
                  for k, v in ref.state_dict().items()}
    ours = layers.param_shapes(clip_text.params_template(clip_text.from_transformers_config(config)))
    assert ours == ref_shapes
    assert sum(math.prod(s) for s in ours.values()) == sum(p.numel() for p in ref.parameters())
