"""SD U-Net port (diffusers UNet2DConditionModel): stored diffusers outputs, real SD configs, strict conversion,
config refusals, and live parity with diffusers (optional, parity environment)."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sida_jax.models.t2i import layers, sd_unet

DATA = pathlib.Path(__file__).resolve().parent / 'data' / 't2i'

# Published unet/config.json of stable-diffusion-v1-5 and stable-diffusion-2-1-base.
SD15 = dict(_class_name='UNet2DConditionModel', _diffusers_version='0.6.0', act_fn='silu', attention_head_dim=8,
            block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=768,
            down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'], downsample_padding=1,
            flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
            norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
            up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3)
SD21_BASE = dict(SD15, _diffusers_version='0.10.0.dev0', attention_head_dim=[5, 10, 20, 20],
                 cross_attention_dim=1024, dual_cross_attention=False, num_class_embeds=None,
                 only_cross_attention=False, use_linear_projection=True)
TINY = dict(block_out_channels=[16, 32], layers_per_block=1,
            down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
            up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'], cross_attention_dim=16, attention_head_dim=2,
            norm_num_groups=4)


def assert_close(got, ref, rel, what=''):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  err, scale = np.max(np.abs(got - ref)), np.max(np.abs(ref))
  assert err <= rel * scale, f'{what}: max error {err:.3g} vs max |ref| {scale:.3g}'


def run(unet, variables, *inputs):
  """One compiled forward pass (eager op-by-op dispatch of a U-Net is far slower on CPU)."""
  return jax.jit(unet.apply)(variables, *inputs)


def random_state(unet, seed=0):
  rng = np.random.default_rng(seed)
  shapes = layers.param_shapes(sd_unet.params_template(unet))
  return {name: rng.normal(size=shape).astype(np.float32) * 0.1 for name, shape in shapes.items()}


def test_timestep_embedding_closed_form():
  t = jnp.array([0.0, 1.0, 17.0, 999.0])
  for flip, shift in ((True, 0), (False, 1)):
    emb = np.asarray(sd_unet.timestep_embedding(t, 8, flip, shift))
    freqs = np.exp(-math.log(10000) * np.arange(4) / (4 - shift))
    args = np.asarray(t, np.float64)[:, None] * freqs
    ref = np.concatenate([np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)], axis=1)
    np.testing.assert_allclose(emb, ref, atol=2e-4)  # float32 phases near 1000
  assert sd_unet.timestep_embedding(t, 7, True, 0).shape == (4, 7)


def test_upsample_nearest_sizes():
  x = jnp.arange(2 * 3 * 3).reshape(1, 2, 3, 3).astype(jnp.float32)
  doubled = np.asarray(sd_unet.upsample_nearest(x, (4, 6)))
  np.testing.assert_array_equal(doubled, np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))
  # Sizes below 2x (odd skips): row i takes source row floor(i * in / out).
  odd = np.asarray(sd_unet.upsample_nearest(x, (3, 5)))
  np.testing.assert_array_equal(odd, np.asarray(x)[:, [0, 0, 1]][:, :, [0, 0, 1, 1, 2]])


def test_matches_stored_diffusers_outputs():
  config = json.loads((DATA / 'tiny-sd' / 'unet' / 'config.json').read_text())
  unet = sd_unet.from_diffusers_config(config)
  state = load_file(str(DATA / 'tiny-sd' / 'unet' / 'diffusion_pytorch_model.safetensors'))
  variables = sd_unet.convert_diffusers_state(state, unet)
  ref = np.load(DATA / 'reference.npz')
  eps = run(unet, variables, ref['sd1_unet_sample'].transpose(0, 2, 3, 1), ref['sd1_unet_t'],
            ref['sd1_unet_context'])
  assert eps.dtype == jnp.float32
  assert_close(eps, ref['sd1_unet_eps'].transpose(0, 2, 3, 1), 1e-4, 'eps')
  # bfloat16 compute: parameters stay float32, the output is float32 and within bf16 rounding.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  half = run(unet.clone(dtype=jnp.bfloat16), variables, ref['sd1_unet_sample'].transpose(0, 2, 3, 1),
             ref['sd1_unet_t'], ref['sd1_unet_context'])
  assert half.dtype == jnp.float32
  assert_close(half, ref['sd1_unet_eps'].transpose(0, 2, 3, 1), 5e-2, 'bf16 eps')
  assert not np.array_equal(np.asarray(half), np.asarray(eps))


@pytest.mark.parametrize('name,config,count', [('sd15_unet', SD15, 859_520_964),
                                                ('sd21_base_unet', SD21_BASE, 865_910_724)])
def test_real_configs_names_and_shapes(name, config, count):
  """Every parameter name and shape of diffusers' module for the published config (table written by
  tests/data/t2i/make_reference.py from diffusers), and the published parameter counts."""
  unet = sd_unet.from_diffusers_config(config)
  ours = layers.param_shapes(sd_unet.params_template(unet))
  table = json.loads((DATA / 'sd_shapes.json').read_text())[name]
  assert ours == {k: tuple(v) for k, v in table.items()}
  assert sum(math.prod(s) for s in ours.values()) == count
  assert 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight' in ours
  heads = (8,) * 4 if name == 'sd15_unet' else (5, 10, 20, 20)
  assert unet.num_attention_heads == heads  # diffusers' `attention_head_dim` is the head count
  # 512 x 512 images: 64 x 64 latents, 77 text tokens.
  variables = {'params': sd_unet.params_template(unet)}
  out = jax.eval_shape(unet.apply, variables, jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32),
                       jax.ShapeDtypeStruct((2,), jnp.float32),
                       jax.ShapeDtypeStruct((2, 77, unet.cross_attention_dim[0]), jnp.float32))
  assert out.shape == (2, 64, 64, 4) and out.dtype == jnp.float32


def test_resolves_sd_configs():
  sd15, sd21 = sd_unet.from_diffusers_config(SD15), sd_unet.from_diffusers_config(SD21_BASE, jnp.bfloat16)
  assert not sd15.use_linear_projection and sd21.use_linear_projection
  assert sd15.cross_attention_dim == (768,) * 4 and sd21.cross_attention_dim == (1024,) * 4
  assert sd15.layers_per_block == (2,) * 4 and sd21.dtype == jnp.bfloat16
  # Channels per head: 40/80/160/160 (SD1) and 64 everywhere (SD2).
  assert [c // h for c, h in zip(sd21.block_out_channels, sd21.num_attention_heads)] == [64] * 4


@pytest.mark.parametrize('key,value', [
    ('class_embed_type', 'timestep'), ('addition_embed_type', 'text_time'), ('num_class_embeds', 10),
    ('num_attention_heads', 8), ('only_cross_attention', True), ('resnet_time_scale_shift', 'scale_shift'),
    ('time_cond_proj_dim', 256), ('encoder_hid_dim', 1024), ('act_fn', 'gelu'), ('attention_type', 'gated'),
    ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'), ('dropout', 0.1), ('time_embedding_type', 'fourier')])
def test_refuses_unsupported_features(key, value):
  with pytest.raises(ValueError, match=f'unsupported {key}=') as info:
    sd_unet.from_diffusers_config(dict(SD15, **{key: value}))
  assert '\n' not in str(info.value)


def test_refuses_bad_configs():
  with pytest.raises(ValueError, match="unknown key 'frobnicate'"):
    sd_unet.from_diffusers_config(dict(SD15, frobnicate=1))
  with pytest.raises(ValueError, match='unsupported down_block_types'):
    sd_unet.from_diffusers_config(dict(SD15, down_block_types=['AttnDownBlock2D'] * 4))
  with pytest.raises(ValueError, match='unsupported up_block_types'):
    sd_unet.from_diffusers_config(dict(SD15, up_block_types=['UpBlock2D'] * 3))
  with pytest.raises(ValueError, match='attention_head_dim must be an int or 4 ints'):
    sd_unet.from_diffusers_config(dict(SD15, attention_head_dim=[8, 8]))
  with pytest.raises(ValueError, match='attention_head_dim 3 does not divide 320'):
    sd_unet.from_diffusers_config(dict(SD15, attention_head_dim=3))
  # Switched-off features at their off values are accepted (configs written by newer diffusers).
  unet = sd_unet.from_diffusers_config(dict(SD15, class_embed_type=None, only_cross_attention=[False] * 4,
                                            resnet_out_scale_factor=1, upcast_attention=True, dropout=0.0))
  assert unet == sd_unet.from_diffusers_config(SD15)


def test_strict_conversion_errors():
  unet = sd_unet.from_diffusers_config(TINY)
  state = random_state(unet)
  variables = sd_unet.convert_diffusers_state(state, unet)
  flat = layers.param_shapes(variables['params'])
  assert flat == {k: v.shape for k, v in state.items()}
  name = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
  assert state[name].shape == (16, 16)  # [out, in] as in PyTorch
  assert state['conv_in.weight'].shape == (16, 4, 3, 3)  # OIHW
  missing = {k: v for k, v in state.items() if k != name}
  with pytest.raises(ValueError, match=f"1 missing key.*'{name}'"):
    sd_unet.convert_diffusers_state(missing, unet)
  with pytest.raises(ValueError, match="1 unexpected key.*'mid_block.extra.weight'"):
    sd_unet.convert_diffusers_state(dict(state, **{'mid_block.extra.weight': np.zeros(1)}), unet)
  with pytest.raises(ValueError, match=r"'conv_out.weight' has shape \(4, 16, 1, 1\), expected \(4, 16, 3, 3\)"):
    sd_unet.convert_diffusers_state(dict(state, **{'conv_out.weight': np.zeros((4, 16, 1, 1))}), unet)


# ----------------------------------------------------------------------------------------------------
# Live parity with diffusers (parity environment).


def _diffusers():
  torch = pytest.importorskip('torch', reason='parity test needs torch (parity environment)')
  diffusers = pytest.importorskip('diffusers', reason='parity test needs diffusers (parity environment)')
  return torch, diffusers


PARITY_CONFIGS = {
    # SD1-like: 1x1-conv projections, one head count.
    'sd1': (TINY, [(8, 8)]),
    # SD2-like: linear projections, per-level head counts, deeper transformers, uneven layers, odd sizes.
    'sd2': (dict(block_out_channels=[16, 32, 32], layers_per_block=[1, 2, 1],
                 down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
                 up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'], cross_attention_dim=24,
                 attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 1], use_linear_projection=True,
                 norm_num_groups=8, norm_eps=1e-6), [(8, 8), (10, 6)]),
    # Cross-attention in the deepest level too, downsample padding 0, shifted frequencies, centred input.
    'variants': (dict(block_out_channels=[8, 16], layers_per_block=2,
                      down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D'],
                      up_block_types=['CrossAttnUpBlock2D', 'UpBlock2D'], cross_attention_dim=12,
                      attention_head_dim=[1, 2], norm_num_groups=4, downsample_padding=0, freq_shift=1,
                      flip_sin_to_cos=False, center_input_sample=True, mid_block_scale_factor=1.5,
                      time_embedding_dim=40, in_channels=3, out_channels=5), [(8, 8)]),
}


@pytest.mark.parametrize('name', list(PARITY_CONFIGS))
def test_parity_with_diffusers(name):
  torch, diffusers = _diffusers()
  config, sizes = PARITY_CONFIGS[name]
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():
    for p in ref.parameters():  # zero-initialised layers and unit norms become non-trivial
      p.add_(0.1 * torch.randn_like(p))
  unet = sd_unet.from_diffusers_config(dict(ref.config))
  variables = sd_unet.convert_diffusers_state({k: v.numpy() for k, v in ref.state_dict().items()}, unet)
  rng = np.random.default_rng(0)
  for size in sizes:
    x = rng.normal(size=(2, ref.config.in_channels, *size)).astype(np.float32)
    t = np.array([3.0, 999.0], np.float32)
    ctx = rng.normal(size=(2, 5, unet.cross_attention_dim[0])).astype(np.float32)
    with torch.no_grad():
      eps_ref = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    eps = run(unet, variables, x.transpose(0, 2, 3, 1), t, ctx)
    assert_close(eps, eps_ref.transpose(0, 2, 3, 1), 1e-4, f'{name} {size}')


def test_real_config_counts_match_diffusers():
  torch, diffusers = _diffusers()
  for config in (SD15, SD21_BASE):
    with torch.device('meta'):
      ref = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith('_')})
    ours = layers.param_shapes(sd_unet.params_template(sd_unet.from_diffusers_config(config)))
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(math.prod(s) for s in ours.values()) == sum(p.numel() for p in ref.parameters())
