"""PixArt transformer port: diffusers reference folder (torch-free), config rules, strict copy, sizes,
and parity with diffusers on random weights (needs torch + diffusers)."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from sida_jax.models.t2i import pixart

DATA = pathlib.Path(__file__).parent / 'data' / 't2i_pixart'

# PixArt-alpha/PixArt-XL-2-512x512 transformer/config.json as published (diffusers 0.22 spelling).
XL_2_512 = {
    '_class_name': 'Transformer2DModel', '_diffusers_version': '0.22.0.dev0',
    'activation_fn': 'gelu-approximate', 'attention_bias': True, 'attention_head_dim': 72,
    'attention_type': 'default', 'caption_channels': 4096, 'cross_attention_dim': 1152,
    'double_self_attention': False, 'dropout': 0.0, 'in_channels': 4, 'norm_elementwise_affine': False,
    'norm_eps': 1e-06, 'norm_num_groups': 32, 'norm_type': 'ada_norm_single', 'num_attention_heads': 16,
    'num_embeds_ada_norm': 1000, 'num_layers': 28, 'num_vector_embeds': None, 'only_cross_attention': False,
    'out_channels': 8, 'patch_size': 2, 'sample_size': 64, 'upcast_attention': False,
    'use_linear_projection': False}
# PixArt-XL-2-1024-MS differs in its latent size, which switches on the size conditions.
XL_2_1024_MS = dict(XL_2_512, sample_size=128)


def _assert_close(got, ref, rel, what=''):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (what, got.shape, ref.shape)
  err = np.max(np.abs(got - ref))
  assert err <= rel * np.max(np.abs(ref)), f'{what}: max err {err:.3g} vs scale {np.max(np.abs(ref)):.3g}'


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _expected_count(heads, head_dim, in_ch, out_ch, layers, caption, patch, size_conditions) -> int:
  """PixArt's parameter count in closed form (linear = in·out + out)."""
  d = heads * head_dim
  lin = lambda i, o: i * o + o  # noqa: E731
  attention = 4 * lin(d, d)
  block = 6 * d + 2 * attention + lin(d, 4 * d) + lin(4 * d, d)
  embed = lin(in_ch * patch * patch, d)
  timestep = lin(256, d) + lin(d, d) + lin(d, 6 * d)
  sizes = 2 * (lin(256, d // 3) + lin(d // 3, d // 3)) if size_conditions else 0
  captions = lin(caption, d) + lin(d, d)
  final = 2 * d + lin(d, patch * patch * out_ch)
  return embed + layers * block + timestep + sizes + captions + final


def _reference_folder():
  config = json.loads((DATA / 'transformer' / 'config.json').read_text())
  state = load_file(str(DATA / 'transformer' / 'diffusion_pytorch_model.safetensors'))
  return config, state, np.load(DATA / 'reference.npz')


def _apply(net, variables, ref, **kwargs):
  nhwc = ref['latents'].transpose(0, 2, 3, 1)
  added = {'resolution': ref['resolution'], 'aspect_ratio': ref['aspect_ratio']}
  out = jax.jit(net.apply)(variables, nhwc, ref['timesteps'], ref['t5_hidden'], ref['attention_mask'], added)
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_reference_folder_matches_diffusers():
  config, state, ref = _reference_folder()
  net = pixart.from_config(config)
  assert net.use_additional_conditions and net.interpolation_scale == 1.0 and net.sample_size == 8
  variables = pixart.variables_from_state_dict(net, state)
  out = _apply(net, variables, ref)
  assert out.shape == ref['pixart_out'].shape == (8, 8, 8, 12)   # 8 channels: ε and variance
  _assert_close(out, ref['pixart_out'], 1e-4, 'reference output')


def test_bfloat16_compute_tracks_float32():
  config, state, ref = _reference_folder()
  net = pixart.from_config(config, dtype=jnp.bfloat16)
  variables = pixart.variables_from_state_dict(net, state)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  out = _apply(net, variables, ref)
  assert out.dtype == np.float32
  _assert_close(out, ref['pixart_out'], 3e-2, 'bfloat16 output')
  assert np.max(np.abs(out - ref['pixart_out'])) > 1e-6   # really computed in bfloat16


def test_caption_mask_hides_padded_tokens():
  config, state, ref = _reference_folder()
  net = pixart.from_config(config)
  variables = pixart.variables_from_state_dict(net, state)
  changed = {k: np.array(ref[k]) for k in ref.files}
  padded = ref['attention_mask'] == 0
  changed['t5_hidden'][padded] = 50.0   # anything behind the mask
  _assert_close(_apply(net, variables, changed), ref['pixart_out'], 1e-5, 'masked captions')
  unmasked = _apply(net, variables, changed | {'attention_mask': np.ones_like(ref['attention_mask'])})
  assert np.max(np.abs(unmasked - ref['pixart_out'])) > 1e-2


def test_legacy_class_name_builds_the_same_network():
  config, _, _ = _reference_folder()
  assert pixart.from_config(config | {'_class_name': 'Transformer2DModel'}) == pixart.from_config(config)
  # XL-2-512 (legacy name, unset interpolation_scale / use_additional_conditions): diffusers' rules.
  net = pixart.from_config(XL_2_512)
  assert (net.interpolation_scale, net.use_additional_conditions, net.caption_channels) == (1.0, False, 4096)
  net = pixart.from_config(XL_2_1024_MS)
  assert (net.interpolation_scale, net.use_additional_conditions) == (2.0, True)


def test_xl_2_parameter_counts():
  templates = {}
  for name, config, size_conditions in (('512', XL_2_512, False), ('1024', XL_2_1024_MS, True)):
    templates[name] = pixart.params_template(pixart.from_config(config))
    assert _count(templates[name]) == _expected_count(16, 72, 4, 8, 28, 4096, 2, size_conditions)
  # As counted by diffusers (meta device, see test_xl_2_names_shapes_and_count_match_diffusers).
  assert (_count(templates['512']), _count(templates['1024'])) == (610_856_096, 611_349_152)
  names = traverse_util.flatten_dict(templates['512'], sep='.')
  assert names['transformer_blocks.27.attn2.to_k.weight'].shape == (1152, 1152)
  assert names['transformer_blocks.0.scale_shift_table'].shape == (6, 1152)
  assert names['pos_embed.proj.weight'].shape == (1152, 4, 2, 2)
  assert names['caption_projection.linear_1.weight'].shape == (1152, 4096)
  assert names['proj_out.weight'].shape == (32, 1152)


def test_from_config_refuses_unsupported_values():
  config, _, _ = _reference_folder()
  cases = {
      'unknown key': (config | {'use_rope': True}, "unknown key 'use_rope'"),
      'dropout': (config | {'dropout': 0.1}, 'unsupported dropout'),
      'norm_type': (config | {'norm_type': 'ada_norm_zero'}, 'unsupported norm_type'),
      'attention_type': (config | {'attention_type': 'gated'}, 'unsupported attention_type'),
      'activation': (config | {'activation_fn': 'geglu'}, 'unsupported activation_fn'),
      'class': (config | {'_class_name': 'DiTTransformer2DModel'}, 'unsupported _class_name'),
      'cross dim': (config | {'cross_attention_dim': 16}, 'cross_attention_dim 16 must equal'),
      'size conditions': (config | {'attention_head_dim': 8, 'cross_attention_dim': 16}, 'divisible by 3'),
      'legacy defaults': ({'_class_name': 'Transformer2DModel', 'norm_type': 'ada_norm_single',
                           'num_embeds_ada_norm': 1000}, 'in_channels must be set'),
      'vectorized': (XL_2_512 | {'num_vector_embeds': 16}, 'unsupported num_vector_embeds'),
  }
  for what, (bad, message) in cases.items():
    with pytest.raises(ValueError, match=message):
      pixart.from_config(bad)
      pytest.fail(what)


def test_strict_state_dict_copy():
  config, state, _ = _reference_folder()
  net = pixart.from_config(config)
  variables = pixart.variables_from_state_dict(net, state)
  flat = traverse_util.flatten_dict(variables['params'], sep='.')
  assert flat.keys() == state.keys()
  for name, value in state.items():
    np.testing.assert_array_equal(flat[name], value)
  missing = {k: v for k, v in state.items() if k != 'transformer_blocks.1.attn2.to_v.bias'}
  with pytest.raises(ValueError, match="1 missing key.*'transformer_blocks.1.attn2.to_v.bias'"):
    pixart.variables_from_state_dict(net, missing)
  with pytest.raises(ValueError, match="unexpected key.*'pos_embed.pos_embed'"):
    pixart.variables_from_state_dict(net, state | {'pos_embed.pos_embed': np.zeros((1, 16, 24))})
  with pytest.raises(ValueError, match=r"'scale_shift_table' has shape \(6, 24\), expected \(2, 24\)"):
    pixart.variables_from_state_dict(net, state | {'scale_shift_table': np.zeros((6, 24))})
  # A network without size conditions has no resolution embedder to receive.
  with pytest.raises(ValueError, match="unexpected key.*'adaln_single.emb.aspect_ratio_embedder"):
    pixart.variables_from_state_dict(pixart.from_config(config | {'use_additional_conditions': False}), state)


def test_sincos_position_embedding_layout():
  # 4 rows x 6 columns, base size 4: the first half encodes the column, the second the row.
  emb = pixart.sincos_pos_embed(8, 4, 6, 4, 1.0).reshape(4, 6, 8)
  row_step, col_step = 4 / 4, 4 / 6
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  for i in range(4):
    for j in range(6):
      col, row = j * col_step * omega, i * row_step * omega
      expected = np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)])
      np.testing.assert_allclose(emb[i, j], expected, rtol=1e-6, atol=1e-6)
  scaled = pixart.sincos_pos_embed(8, 4, 6, 4, 2.0).reshape(4, 6, 8)
  np.testing.assert_allclose(scaled[3, 5, :2], np.sin(5 * col_step / 2 * omega), rtol=1e-6)


def test_bad_inputs():
  config, state, _ = _reference_folder()
  net = pixart.from_config(config)
  variables = pixart.variables_from_state_dict(net, state)
  x = jnp.zeros((1, 8, 8, 4))
  context = jnp.zeros((1, 3, 16))
  added = {'resolution': jnp.ones((1, 2)), 'aspect_ratio': jnp.ones((1, 1))}
  apply = jax.jit(net.apply)   # the checks run while tracing
  with pytest.raises(ValueError, match='sample has 3 channels'):
    apply(variables, jnp.zeros((1, 8, 8, 3)), 1.0, context, None, added)
  with pytest.raises(ValueError, match='not a multiple of the patch size 2'):
    apply(variables, jnp.zeros((1, 7, 8, 4)), 1.0, context, None, added)
  with pytest.raises(ValueError, match='needs added_cond_kwargs'):
    apply(variables, x, 1.0, context)
  with pytest.raises(ValueError, match='encoder_attention_mask has shape'):
    apply(variables, x, 1.0, context, jnp.ones((1, 4)), added)


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers (optional: the parity environment).


def _diffusers():
  torch = pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')
  diffusers = pytest.importorskip('diffusers', reason='parity test needs diffusers (requirements-parity.txt)')
  return torch, diffusers


_PARITY_CASES = {
    # name: (diffusers kwargs, latent NCHW shape, caption tokens, mask?, class)
    'p2_size_conditions_nonsquare': (dict(num_attention_heads=2, attention_head_dim=12, num_layers=2,
                                          cross_attention_dim=24, caption_channels=10, sample_size=8,
                                          use_additional_conditions=True), (2, 4, 8, 12), 5, True, 'pixart'),
    'p1_three_heads_no_mask': (dict(num_attention_heads=3, attention_head_dim=8, num_layers=2, patch_size=1,
                                    cross_attention_dim=24, caption_channels=10, sample_size=6,
                                    use_additional_conditions=False), (2, 4, 6, 6), 4, False, 'pixart'),
    'p2_affine_norms_exact_gelu_larger_input': (
        dict(num_attention_heads=4, attention_head_dim=4, num_layers=1, cross_attention_dim=16,
             caption_channels=6, sample_size=8, norm_elementwise_affine=True, activation_fn='gelu',
             attention_bias=False, out_channels=4), (1, 4, 16, 16), 7, True, 'pixart'),
    'size_128_default_rules': (dict(num_attention_heads=2, attention_head_dim=12, num_layers=1,
                                    cross_attention_dim=24, caption_channels=8, sample_size=128,
                                    patch_size=16), (2, 4, 128, 128), 3, True, 'pixart'),
    'no_caption_projection': (dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                   cross_attention_dim=12, caption_channels=None, sample_size=8),
                              (2, 4, 8, 8), 6, True, 'pixart'),
    'legacy_transformer2d_class': (dict(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                        out_channels=8, num_layers=2, cross_attention_dim=24, attention_bias=True,
                                        sample_size=8, patch_size=2, activation_fn='gelu-approximate',
                                        num_embeds_ada_norm=1000, norm_type='ada_norm_single',
                                        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=10),
                                   (2, 4, 8, 8), 5, True, 'legacy'),
}


@pytest.mark.parametrize('case', sorted(_PARITY_CASES))
def test_parity_with_diffusers(case):
  torch, diffusers = _diffusers()
  kwargs, shape, tokens, use_mask, kind = _PARITY_CASES[case]
  torch.manual_seed(0)
  cls = diffusers.PixArtTransformer2DModel if kind == 'pixart' else diffusers.Transformer2DModel
  ref_net = cls(**kwargs).eval()
  with torch.no_grad():   # non-trivial norms, biases and modulation tables
    for p in ref_net.parameters():
      p.add_(0.1 * torch.randn_like(p))
  config = dict(ref_net.config) | {'_class_name': cls.__name__}
  net = pixart.from_config(config)
  variables = pixart.variables_from_state_dict(net, {k: v.numpy() for k, v in ref_net.state_dict().items()})

  rng = np.random.default_rng(1)
  n = shape[0]
  x = rng.normal(size=shape).astype(np.float32)
  t = rng.uniform(0, 1000, size=(n,)).astype(np.float32)
  context_dim = net.caption_channels or net.cross_attention_dim
  context = rng.normal(size=(n, tokens, context_dim)).astype(np.float32)
  mask = None
  if use_mask:
    mask = np.ones((n, tokens), np.float32)
    mask[0, tokens // 2:] = 0
  added = None
  if net.use_additional_conditions:
    added = {'resolution': rng.uniform(256, 1024, size=(n, 2)).astype(np.float32),
             'aspect_ratio': rng.uniform(0.5, 2, size=(n, 1)).astype(np.float32)}
  with torch.no_grad():
    ref = ref_net(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context),
                  timestep=torch.from_numpy(t),
                  added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()} if added else None,
                  encoder_attention_mask=None if mask is None else torch.from_numpy(mask)).sample.numpy()
  out = jax.jit(net.apply)(variables, x.transpose(0, 2, 3, 1), t, context, mask, added)
  _assert_close(np.asarray(out).transpose(0, 3, 1, 2), ref, 1e-4, case)


@pytest.mark.parametrize('name', ['XL_2_512', 'XL_2_1024_MS'])
def test_xl_2_names_shapes_and_count_match_diffusers(name):
  torch, diffusers = _diffusers()
  config = {'XL_2_512': XL_2_512, 'XL_2_1024_MS': XL_2_1024_MS}[name]
  kwargs = {k: v for k, v in config.items() if not k.startswith('_')}
  with torch.device('meta'):
    ref_net = diffusers.Transformer2DModel(**kwargs)
  ref = {k: tuple(v.shape) for k, v in ref_net.state_dict().items()}
  template = pixart.params_template(pixart.from_config(config))
  ours = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(template, sep='.').items()}
  assert ours == ref
  assert _count(template) == sum(p.numel() for p in ref_net.parameters())
