"""timm deit_base_distilled_patch16_224 in Flax: parameter counts, stored timm outputs, conversion, parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import backbone_reference as ref
from sida_jax.models.backbones import deit, torch_layers


def _template(module):
  return torch_layers.variables_template(module, deit.example_input(module))


def test_parameter_counts_match_timm():
  # timm: deit_base_distilled_patch16_224 parameters, and all but norm/head/head_dist (unused by the taps).
  assert torch_layers.count_params(_template(deit.DistilledVisionTransformer())) == 87_338_192
  assert torch_layers.count_params(_template(deit.DistilledVisionTransformer(include_head=False))) == 85_798_656


def test_reduced_network_matches_stored_timm_outputs():
  data = np.load(ref.DATA / 'deit_tiny.npz')
  module = ref.tiny_deit()
  state_dict = ref.recipe_state_dict(ref.template_shapes(_template(module)), ref.RECIPE_SEED)
  out = jax.jit(module.apply)(deit.variables_from_state_dict(module, state_dict), data['input'])
  for i, tokens in enumerate(out.features):
    ref.assert_close(tokens, data[f'tap{i}'])
  ref.assert_close(out.logits, data['logits'])


def test_position_embedding_resize():
  rng = np.random.RandomState(0)
  pos = rng.standard_normal((1, 2 + 16, 5)).astype(np.float32)
  np.testing.assert_array_equal(deit.resize_pos_embed(jnp.asarray(pos), 4, (4, 4)), pos)  # identity at 224
  out = np.asarray(deit.resize_pos_embed(jnp.asarray(pos), 4, (8, 2)))
  np.testing.assert_array_equal(out[:, :2], pos[:, :2])  # class and distillation tokens untouched
  grid = pos[0, 2:].reshape(4, 4, 5)
  # Upsampling rows by 2 (align_corners=False): row 1 of 8 sits at source 0.25, columns 2 -> sources 0.5, 2.5.
  expected = 0.75 * (0.5 * grid[0, 0] + 0.5 * grid[0, 1]) + 0.25 * (0.5 * grid[1, 0] + 0.5 * grid[1, 1])
  np.testing.assert_allclose(out[0, 2 + 1 * 2 + 0], expected, atol=1e-6)


def test_conversion_is_strict_and_headless_takes_full_file():
  module = ref.tiny_deit()
  state_dict = ref.recipe_state_dict(ref.template_shapes(_template(module)), 0)
  with pytest.raises(ValueError, match="missing key\\(s\\) 'dist_token'"):
    deit.variables_from_state_dict(module, {k: v for k, v in state_dict.items() if k != 'dist_token'})
  with pytest.raises(ValueError, match="shape mismatch for 'pos_embed'"):
    deit.variables_from_state_dict(module, {**state_dict, 'pos_embed': np.zeros((1, 17, 32))})
  trunk = deit.variables_from_state_dict(module.clone(include_head=False), state_dict)
  assert not {'norm', 'head', 'head_dist'} & set(trunk['params'])


def test_parity_with_timm_and_resized_grid(tmp_path):
  """timm's own forward at 224, and Projected GAN's forward_flex rule (bilinearly resized position grid)."""
  torch = pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')
  timm = pytest.importorskip('timm', reason='parity test needs timm')
  torch.manual_seed(0)
  model = timm.create_model('deit_base_distilled_patch16_224', pretrained=False).eval()
  with torch.no_grad():  # timm's init leaves tokens/position embeddings tiny: make them matter
    for name in ('cls_token', 'dist_token', 'pos_embed'):
      getattr(model, name).normal_(0, 0.5)
  for file_format in ('pth', 'safetensors'):
    state_dict = ref.saved_state_dict(model, tmp_path, file_format)
  module = deit.DistilledVisionTransformer()
  variables = deit.variables_from_state_dict(module, state_dict)
  x = np.random.RandomState(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
  taps, logits = ref.hooked_outputs(model, x, [model.blocks[i] for i in deit.PROJECTED_GAN_TAPS])
  out = jax.jit(module.apply)(variables, jnp.asarray(ref.nhwc(x)))
  for ours, theirs in zip(out.features, taps):
    ref.assert_close(ours, theirs)
  ref.assert_close(out.logits, logits)

  x = np.random.RandomState(1).standard_normal((1, 3, 96, 128)).astype(np.float32)
  with torch.no_grad():  # forward_flex, written out with torch ops
    tokens = model.patch_embed.proj(torch.from_numpy(x)).flatten(2).transpose(1, 2)
    grid = model.pos_embed[:, 2:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 8), mode='bilinear', align_corners=False)
    pos = torch.cat([model.pos_embed[:, :2], grid.permute(0, 2, 3, 1).reshape(1, 48, -1)], 1)
    h = torch.cat([model.cls_token, model.dist_token, tokens], 1) + pos
    flex_taps = []
    for i, block in enumerate(model.blocks):
      h = block(h)
      if i in deit.PROJECTED_GAN_TAPS:
        flex_taps.append(h.numpy())
  out = jax.jit(module.apply)(variables, jnp.asarray(ref.nhwc(x)))
  for ours, theirs in zip(out.features, flex_taps):
    ref.assert_close(ours, theirs)
