"""T5 encoder port: transformers reference folder (torch-free), relative-position buckets, tied embedding,
config rules, T5-v1.1-XXL size, and parity with transformers on random weights (needs torch)."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from sida_jax.models.t2i import t5

DATA = pathlib.Path(__file__).parent / 'data' / 't2i_pixart'

# google/t5-v1_1-xxl encoder config.json (as in PixArt-XL-2's text_encoder folder).
T5_V1_1_XXL = {
    'architectures': ['T5EncoderModel'], 'd_ff': 10240, 'd_kv': 64, 'd_model': 4096, 'decoder_start_token_id': 0,
    'dense_act_fn': 'gelu_new', 'dropout_rate': 0.1, 'eos_token_id': 1, 'feed_forward_proj': 'gated-gelu',
    'initializer_factor': 1.0, 'is_encoder_decoder': True, 'is_gated_act': True, 'layer_norm_epsilon': 1e-06,
    'model_type': 't5', 'num_decoder_layers': 24, 'num_heads': 64, 'num_layers': 24, 'output_past': True,
    'pad_token_id': 0, 'relative_attention_max_distance': 128, 'relative_attention_num_buckets': 32,
    'tie_word_embeddings': False, 'torch_dtype': 'float32', 'transformers_version': '4.33.0.dev0',
    'use_cache': True, 'vocab_size': 32128}


def _assert_close(got, ref, rel, what=''):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (what, got.shape, ref.shape)
  err = np.max(np.abs(got - ref))
  assert err <= rel * np.max(np.abs(ref)), f'{what}: max err {err:.3g} vs scale {np.max(np.abs(ref)):.3g}'


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _reference_folder():
  config = json.loads((DATA / 'text_encoder' / 'config.json').read_text())
  return config, load_file(str(DATA / 'text_encoder' / 'model.safetensors')), np.load(DATA / 'reference.npz')


def test_reference_folder_matches_transformers():
  config, state, ref = _reference_folder()
  encoder = t5.from_config(config)
  assert (encoder.feed_forward_proj, encoder.relative_attention_num_buckets) == ('gated-gelu', 8)
  assert 'encoder.embed_tokens.weight' not in state   # save_pretrained keeps only shared.weight
  variables = t5.variables_from_state_dict(encoder, state)
  out = jax.jit(encoder.apply)(variables, ref['input_ids'], ref['attention_mask'])
  # 120 tokens > max_distance 20: the far buckets are exercised.
  assert out.shape == ref['t5_hidden'].shape == (8, 120, 16)
  _assert_close(out, ref['t5_hidden'], 1e-4, 'last_hidden_state')


def test_padding_does_not_reach_tokens():
  config, state, ref = _reference_folder()
  encoder = t5.from_config(config)
  variables = t5.variables_from_state_dict(encoder, state)
  ids = np.array(ref['input_ids'])
  mask = ref['attention_mask'].astype(bool)
  ids[~mask] = 7   # other ids behind the mask
  out = np.asarray(jax.jit(encoder.apply)(variables, ids, ref['attention_mask']))
  _assert_close(out[mask], ref['t5_hidden'][mask], 1e-5, 'tokens')
  unmasked = np.asarray(jax.jit(encoder.apply)(variables, ref['input_ids']))
  assert np.max(np.abs(unmasked[mask] - ref['t5_hidden'][mask])) > 1e-2


def test_bfloat16_compute_tracks_float32():
  config, state, ref = _reference_folder()
  encoder = t5.from_config(config, dtype=jnp.bfloat16)
  variables = t5.variables_from_state_dict(encoder, state)
  out = np.asarray(jax.jit(encoder.apply)(variables, ref['input_ids'], ref['attention_mask']))
  assert out.dtype == np.float32
  _assert_close(out, ref['t5_hidden'], 3e-2, 'bfloat16 output')
  assert np.max(np.abs(out - ref['t5_hidden'])) > 1e-6


def test_relative_position_buckets_match_transformers():
  ref = np.load(DATA / 'reference.npz')
  span = (ref['buckets_32_128'].shape[0] - 1) // 2
  for name in ref.files:
    if not name.startswith('buckets_'):
      continue
    num_buckets, max_distance = map(int, name.split('_')[1:])
    # Query at position `span`, keys 0..2·span: relative positions −span..span.
    got = np.asarray(t5.relative_position_buckets(2 * span + 1, 2 * span + 1, num_buckets, max_distance))[span]
    np.testing.assert_array_equal(got, ref[name], err_msg=name)
  # Closed form near the diagonal: exact buckets below num_buckets/4, keys after the query offset by half.
  buckets = t5.relative_position_buckets(1, 8, 32, 128)[0]
  np.testing.assert_array_equal(buckets, [0, 17, 18, 19, 20, 21, 22, 23])


def test_t5_v1_1_xxl_parameter_count():
  encoder = t5.from_config(T5_V1_1_XXL)
  assert encoder.feed_forward_proj == 'gated-gelu' and encoder.num_layers == 24
  template = t5.params_template(encoder)
  d, d_ff, inner, vocab, layers = 4096, 10240, 64 * 64, 32128, 24
  expected = vocab * d + layers * (4 * d * inner + 3 * d * d_ff + 2 * d) + 32 * 64 + d
  assert _count(template) == expected == 4_762_310_656
  names = traverse_util.flatten_dict(template, sep='.')
  assert names['shared.weight'].shape == (32128, 4096)
  assert names['encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'].shape == (32, 64)
  assert 'encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight' not in names
  assert names['encoder.block.23.layer.1.DenseReluDense.wi_1.weight'].shape == (10240, 4096)


def test_tied_embedding_and_strict_copy():
  config, state, _ = _reference_folder()
  encoder = t5.from_config(config)
  shared = state['shared.weight']
  both = t5.variables_from_state_dict(encoder, state | {'encoder.embed_tokens.weight': shared})
  only_tied = {k: v for k, v in state.items() if k != 'shared.weight'} | {'encoder.embed_tokens.weight': shared}
  only_tied = t5.variables_from_state_dict(encoder, only_tied)
  for variables in (both, only_tied):
    np.testing.assert_array_equal(variables['params']['shared.weight'], shared)
  with pytest.raises(ValueError, match="'encoder.embed_tokens.weight' differs from 'shared.weight'"):
    t5.variables_from_state_dict(encoder, state | {'encoder.embed_tokens.weight': shared + 1})
  missing = {k: v for k, v in state.items() if k != 'shared.weight'}
  with pytest.raises(ValueError, match="1 missing key.*'shared.weight'"):
    t5.variables_from_state_dict(encoder, missing)
  with pytest.raises(ValueError, match="unexpected key.*'decoder.final_layer_norm.weight'"):
    t5.variables_from_state_dict(encoder, state | {'decoder.final_layer_norm.weight': np.ones(16)})
  bias = 'encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight'
  with pytest.raises(ValueError, match=f"unexpected key.*'{bias}'"):   # only the first block has the table
    t5.variables_from_state_dict(encoder, state | {bias: np.ones((8, 3))})
  wrong = state | {'encoder.block.0.layer.1.DenseReluDense.wi_0.weight': np.zeros((16, 24))}
  with pytest.raises(ValueError, match=r"'encoder.block.0.layer.1.DenseReluDense.wi_0.weight' has shape"):
    t5.variables_from_state_dict(encoder, wrong)


def test_from_config_refuses_unsupported_values():
  config, _, _ = _reference_folder()
  relu = t5.from_config(config | {'feed_forward_proj': 'relu', 'dense_act_fn': 'relu', 'is_gated_act': False})
  assert relu.feed_forward_proj == 'relu'
  assert t5.from_config({}) == t5.T5EncoderModel()   # T5Config's defaults (t5-small)
  cases = {
      'unknown key': (config | {'rotary_dim': 8}, "unknown key 'rotary_dim'"),
      'bad projection': (config | {'feed_forward_proj': 'gelu-gated'}, "unsupported feed_forward_proj 'gelu-gated'"),
      'bad activation': (config | {'feed_forward_proj': 'gated-tanhshrink'}, 'unsupported feed_forward_proj'),
      'decoder': (config | {'is_decoder': True}, 'unsupported is_decoder'),
      'act mismatch': (config | {'dense_act_fn': 'relu'}, 'dense_act_fn'),
      'gating mismatch': (config | {'is_gated_act': False}, 'is_gated_act'),
      'model type': (config | {'model_type': 'mt5'}, "unsupported model_type 'mt5'"),
  }
  for what, (bad, message) in cases.items():
    with pytest.raises(ValueError, match=message):
      t5.from_config(bad)
      pytest.fail(what)


# ----------------------------------------------------------------------------------------------------
# Parity with transformers (optional: the parity environment).


def _transformers():
  torch = pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')
  transformers = pytest.importorskip('transformers', reason='parity test needs transformers')
  return torch, transformers


_PARITY_CASES = {
    # name: (T5Config kwargs, sequence length)
    'v1_1_gated_gelu': (dict(feed_forward_proj='gated-gelu', relative_attention_num_buckets=32,
                             relative_attention_max_distance=128), 40),
    'relu_small_buckets': (dict(feed_forward_proj='relu', relative_attention_num_buckets=8,
                                relative_attention_max_distance=20), 45),
    'gated_silu_16_buckets': (dict(feed_forward_proj='gated-silu', relative_attention_num_buckets=16,
                                   relative_attention_max_distance=12, num_heads=2), 30),
    'gelu_exact_odd_buckets': (dict(feed_forward_proj='gelu', relative_attention_num_buckets=10,
                                    relative_attention_max_distance=64, layer_norm_epsilon=1e-3), 20),
}


@pytest.mark.parametrize('case', sorted(_PARITY_CASES))
def test_parity_with_transformers(case, tmp_path):
  torch, transformers = _transformers()
  kwargs, length = _PARITY_CASES[case]
  config = transformers.T5Config(**dict(dict(vocab_size=64, d_model=16, d_kv=6, d_ff=24, num_layers=3,
                                             num_heads=3), **kwargs))
  torch.manual_seed(0)
  ref_encoder = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():   # layer norm weights away from one
    for p in ref_encoder.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ref_encoder.save_pretrained(str(tmp_path))   # the config.json transformers writes must be accepted
  encoder = t5.from_config(json.loads((tmp_path / 'config.json').read_text()))
  state = {k: v.numpy() for k, v in ref_encoder.state_dict().items()}
  assert 'encoder.embed_tokens.weight' in state   # state_dict() lists the tied copy too
  variables = t5.variables_from_state_dict(encoder, state)

  rng = np.random.default_rng(2)
  ids = rng.integers(0, 64, size=(3, length))
  mask = np.ones((3, length), np.int64)
  mask[0, 7:] = 0
  mask[1, length - 3:] = 0
  with torch.no_grad():
    ref = ref_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    ref_unmasked = ref_encoder(input_ids=torch.from_numpy(ids)).last_hidden_state
  apply = jax.jit(encoder.apply)
  _assert_close(apply(variables, ids, mask), ref.numpy(), 1e-4, case)
  _assert_close(apply(variables, ids, None), ref_unmasked.numpy(), 1e-4, case + ' without mask')


def test_t5_v1_1_xxl_names_shapes_and_count_match_transformers():
  torch, transformers = _transformers()
  config = transformers.T5Config(**{k: v for k, v in T5_V1_1_XXL.items()
                                    if k not in ('architectures', 'transformers_version', 'torch_dtype')})
  with torch.device('meta'):
    ref_encoder = transformers.T5EncoderModel(config)
  ref = {k: tuple(v.shape) for k, v in ref_encoder.state_dict().items() if k != 'encoder.embed_tokens.weight'}
  template = t5.params_template(t5.from_config(T5_V1_1_XXL))
  ours = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(template, sep='.').items()}
  assert ours == ref
  assert _count(template) == sum(p.numel() for p in ref_encoder.parameters())
