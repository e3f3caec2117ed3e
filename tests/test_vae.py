"""SD AutoencoderKL port: converter checks, EDM2 latent conventions, parity with diffusers (optional)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from sida_jax.formats.safetensors import load_diffusers_safetensors
from sida_jax.models import vae as vae_lib

_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
             layers_per_block=1, norm_num_groups=4)


def _tiny_vae():
  return vae_lib.AutoencoderKL(**_TINY)


def _random_state(vae, seed=0) -> dict:
  """A diffusers-named state dict (name → numpy array) with random values."""
  template = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))['params']
  rng = np.random.default_rng(seed)
  return {'.'.join(path): rng.normal(size=leaf.shape).astype(np.float32) * 0.2
          for path, leaf in traverse_util.flatten_dict(template).items()}


def _old_spelling(state: dict) -> dict:
  new_to_old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  out = {}
  for name, value in state.items():
    for new, old in new_to_old.items():
      name = name.replace(f'attentions.0.{new}.', f'attentions.0.{old}.')
    out[name] = value
  return out


def _flat_params(variables) -> dict:
  return {'.'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables['params']).items()}


def test_converter_round_trip_both_spellings(tmp_path):
  vae = _tiny_vae()
  state = _random_state(vae)
  assert 'encoder.mid_block.attentions.0.to_out.0.weight' in state
  assert 'decoder.up_blocks.0.upsamplers.0.conv.weight' in state
  assert state['encoder.conv_in.weight'].shape == (8, 3, 3, 3)  # OIHW, as in PyTorch
  converted = _flat_params(vae_lib.convert_diffusers_state(state, vae))
  assert converted.keys() == state.keys()
  for name in state:
    np.testing.assert_array_equal(converted[name], state[name])

  old = _old_spelling(state)
  assert 'decoder.mid_block.attentions.0.proj_attn.bias' in old
  # Old checkpoints may also store the attention projections as 1x1 convolutions.
  old = {k: (v[:, :, None, None] if '.query.' in k and k.endswith('weight') else v) for k, v in old.items()}
  half = {k: v.astype(np.float16) for k, v in old.items()}
  from safetensors.numpy import save_file
  save_file(half, str(tmp_path / 'diffusion_pytorch_model.safetensors'))
  loaded = load_diffusers_safetensors(str(tmp_path / 'diffusion_pytorch_model.safetensors'), vae)
  loaded = _flat_params(loaded)
  for name in state:
    assert loaded[name].dtype == np.float32
    np.testing.assert_array_equal(loaded[name], state[name].astype(np.float16).astype(np.float32))


def test_converter_strict_errors():
  vae = _tiny_vae()
  state = _random_state(vae)
  missing = dict(state)
  del missing['decoder.conv_out.bias']
  with pytest.raises(ValueError, match="1 missing keys.*decoder.conv_out.bias"):
    vae_lib.convert_diffusers_state(missing, vae)
  with pytest.raises(ValueError, match="1 unexpected keys.*encoder.extra.weight"):
    vae_lib.convert_diffusers_state(state | {'encoder.extra.weight': np.zeros(1)}, vae)
  wrong = state | {'quant_conv.weight': np.zeros((8, 8, 3, 3), np.float32)}
  with pytest.raises(ValueError, match="'quant_conv.weight' has shape"):
    vae_lib.convert_diffusers_state(wrong, vae)
  to_q = 'encoder.mid_block.attentions.0.to_q.weight'
  both = state | {to_q.replace('to_q', 'query'): state[to_q]}
  with pytest.raises(ValueError, match='duplicates'):
    vae_lib.convert_diffusers_state(both, vae)


def test_from_diffusers_config():
  config = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'block_out_channels': [128, 256, 512, 512],
            'down_block_types': ['DownEncoderBlock2D'] * 4, 'up_block_types': ['UpDecoderBlock2D'] * 4,
            'in_channels': 3, 'latent_channels': 4, 'layers_per_block': 2, 'norm_num_groups': 32,
            'out_channels': 3, 'sample_size': 256}
  vae = vae_lib.from_diffusers_config(config)
  assert vae == vae_lib.AutoencoderKL(**vae_lib.SD_VAE_FT_MSE)
  with pytest.raises(ValueError, match="unknown key 'norm_type'"):
    vae_lib.from_diffusers_config(config | {'norm_type': 'spatial'})
  with pytest.raises(ValueError, match='up_block_types'):
    vae_lib.from_diffusers_config(config | {'up_block_types': ['UpDecoderBlock2D'] * 3})


def test_edm2_latent_scaling_closed_form():
  raw_mean = np.array([5.81, 3.25, 0.12, -2.15])
  raw_std = np.array([4.17, 4.62, 3.71, 3.28])
  scale, bias = vae_lib.edm2_scale_bias()
  np.testing.assert_allclose(scale, 0.5 / raw_std, rtol=1e-6)
  np.testing.assert_allclose(bias, -raw_mean * 0.5 / raw_std, rtol=1e-6)
  assert scale.dtype == np.float32 and bias.dtype == np.float32

  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 4, 4, 4)) * raw_std + raw_mean
  std = rng.uniform(0.1, 1.0, size=mean.shape)
  raw = np.concatenate([mean, std], axis=-1).astype(np.float32)
  key = jax.random.key(5)
  final = np.asarray(vae_lib.encode_latents(raw, key), np.float64)
  eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32), np.float64)
  np.testing.assert_allclose(final, (mean + std * eps) * 0.5 / raw_std - raw_mean * 0.5 / raw_std,
                             rtol=1e-5, atol=1e-5)
  # Undoing scale/bias recovers the sampled raw latent.
  np.testing.assert_allclose((final - bias) / scale, mean + std * eps, rtol=1e-5, atol=1e-5)
  # A fresh key draws fresh noise.
  assert not np.allclose(np.asarray(vae_lib.encode_latents(raw, jax.random.key(6))), final)

  # Raw latents distributed as EDM2 assumes become mean 0, std 0.5 per channel.
  big_mean = rng.normal(size=(20000, 1, 1, 4)) * raw_std + raw_mean
  big = np.concatenate([big_mean, np.zeros_like(big_mean)], axis=-1).astype(np.float32)
  stats = np.asarray(vae_lib.encode_latents(big, key)).reshape(-1, 4)
  np.testing.assert_allclose(stats.mean(0), 0.0, atol=0.02)
  np.testing.assert_allclose(stats.std(0), 0.5, rtol=0.02)


def test_encode_pixels_and_decode_conventions():
  vae = _tiny_vae()
  variables = vae_lib.convert_diffusers_state(_random_state(vae, seed=1), vae)
  pixels = np.random.default_rng(2).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
  raw = vae_lib.encode_pixels(vae, variables, pixels)
  assert raw.shape == (2, 8, 8, 8)
  # The VAE sees pixels/255 in [0, 1] (EDM2's convention), not [-1, 1].
  mean, std = vae.apply(variables, jnp.asarray(pixels, jnp.float32) / 255, method=vae.encode)
  np.testing.assert_allclose(np.asarray(raw), np.concatenate([mean, std], -1), rtol=1e-6, atol=1e-6)
  mean_pm1, _ = vae.apply(variables, jnp.asarray(pixels, jnp.float32) / 127.5 - 1, method=vae.encode)
  assert np.max(np.abs(np.asarray(mean_pm1) - np.asarray(mean))) > 1e-3

  scale, bias = vae_lib.edm2_scale_bias()
  latents = vae_lib.encode_latents(raw, jax.random.key(0))
  image = np.asarray(vae_lib.decode(vae, variables, latents))
  assert image.dtype == np.uint8 and image.shape == (2, 16, 16, 3)
  z = (np.asarray(latents) - bias) / scale
  ref = np.asarray(vae.apply(variables, jnp.asarray(z), method=vae.decode), np.float64)
  ref = np.floor(np.clip(ref, 0, 1) * 255)
  assert np.max(np.abs(image.astype(np.int32) - ref)) <= 1
  assert np.mean(image == ref) > 0.99


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers (optional: `pip install -r requirements-parity.txt`).


def _diffusers():
  torch = pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')
  diffusers = pytest.importorskip('diffusers', reason='parity test needs diffusers (requirements-parity.txt)')
  return torch, diffusers


def _assert_close(got, ref, rel, what):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  err = np.max(np.abs(got - ref))
  assert err <= rel * np.max(np.abs(ref)), f"{what}: max err {err:.3g} vs scale {np.max(np.abs(ref)):.3g}"


def test_parity_with_diffusers(tmp_path):
  torch, diffusers = _diffusers()
  config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
                layers_per_block=2, norm_num_groups=8, sample_size=16)
  torch.manual_seed(0)
  ref_vae = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():
    for p in ref_vae.parameters():  # non-trivial norms and biases
      p.add_(0.1 * torch.randn_like(p))
  state = {k: v.detach().numpy() for k, v in ref_vae.state_dict().items()}
  vae = vae_lib.from_diffusers_config(dict(ref_vae.config))
  variables = vae_lib.convert_diffusers_state(_old_spelling(state), vae)

  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(2, 3, 16, 16), dtype=np.uint8)
  with torch.no_grad():
    dist = ref_vae.encode(torch.from_numpy(pixels).float() / 255).latent_dist
    z_ref = torch.randn(2, 4, 8, 8)
    decoded_ref = ref_vae.decode(z_ref).sample.numpy()
  raw = np.asarray(vae_lib.encode_pixels(vae, variables, pixels.transpose(0, 2, 3, 1)))
  _assert_close(raw[..., :4], dist.mean.numpy().transpose(0, 2, 3, 1), 1e-5, 'posterior mean')
  _assert_close(raw[..., 4:], dist.std.numpy().transpose(0, 2, 3, 1), 1e-5, 'posterior std')
  decoded = vae.apply(variables, jnp.asarray(z_ref.numpy().transpose(0, 2, 3, 1)), method=vae.decode)
  _assert_close(decoded, decoded_ref.transpose(0, 2, 3, 1), 1e-5, 'decoded image')


def test_sd_vae_ft_mse_names_and_shapes_match_diffusers():
  _, diffusers = _diffusers()
  ref_vae = diffusers.AutoencoderKL(**vae_lib.SD_VAE_FT_MSE, down_block_types=('DownEncoderBlock2D',) * 4,
                                    up_block_types=('UpDecoderBlock2D',) * 4)
  ref = {k: tuple(v.shape) for k, v in ref_vae.state_dict().items()}
  vae = vae_lib.AutoencoderKL(**vae_lib.SD_VAE_FT_MSE)
  abstract = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))['params']
  ours = {'.'.join(k): v.shape for k, v in traverse_util.flatten_dict(abstract).items()}
  assert ours == ref
  assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863  # sd-vae-ft-mse's parameter count
