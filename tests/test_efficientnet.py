"""timm tf_efficientnet_lite0 in Flax: parameter counts, stored timm outputs, strict conversion, parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import backbone_reference as ref
from sida_jax.models.backbones import efficientnet, torch_layers


def _template(module):
  return torch_layers.variables_template(module, efficientnet.example_input(module))


def test_parameter_counts_match_timm():
  # timm: tf_efficientnet_lite0 parameters, and those of conv_stem, bn1 and blocks (the tapped trunk).
  assert torch_layers.count_params(_template(efficientnet.EfficientNet())) == 4_652_008
  assert torch_layers.count_params(_template(efficientnet.EfficientNet(include_head=False))) == 2_958_848


def test_make_divisible_follows_timm():
  assert [efficientnet.make_divisible(v) for v in (16 * 6, 10, 4, 37.0, 1152)] == [96, 16, 8, 40, 1152]


def test_reduced_network_matches_stored_timm_outputs():
  data = np.load(ref.DATA / 'efficientnet_tiny.npz')
  module = ref.tiny_efficientnet()
  state_dict = ref.recipe_state_dict(ref.template_shapes(_template(module)), ref.RECIPE_SEED)
  out = jax.jit(module.apply)(efficientnet.variables_from_state_dict(module, state_dict), data['input'])
  for i, feature in enumerate(out.features):
    ref.assert_close(feature, data[f'tap{i}'])
  ref.assert_close(out.logits, data['logits'])


def test_conversion_is_strict_and_headless_takes_full_file():
  module = ref.tiny_efficientnet()
  state_dict = ref.recipe_state_dict(ref.template_shapes(_template(module)), 0)
  with pytest.raises(ValueError, match="missing key\\(s\\) 'blocks.2.1.conv_dw.weight'"):
    efficientnet.variables_from_state_dict(module, {k: v for k, v in state_dict.items()
                                                    if k != 'blocks.2.1.conv_dw.weight'})
  with pytest.raises(ValueError, match="unexpected key\\(s\\) 'blocks.0.0.se.weight'"):
    efficientnet.variables_from_state_dict(module, {**state_dict, 'blocks.0.0.se.weight': np.zeros(1)})
  with pytest.raises(ValueError, match="shape mismatch for 'conv_stem.weight'"):
    efficientnet.variables_from_state_dict(module, {**state_dict, 'conv_stem.weight': np.zeros((8, 3, 5, 5))})
  trunk = efficientnet.variables_from_state_dict(module.clone(include_head=False), state_dict)
  assert set(trunk['params']) == {'conv_stem', 'bn1', 'blocks'}
  with pytest.raises(ValueError, match="unknown block type 'se'"):
    efficientnet.EfficientNet(stages=(('se', 1, 3, 1, 1, 8),), taps=(0,)).init(
        jax.random.key(0), efficientnet.example_input(None))


@pytest.mark.parametrize('file_format,size', [('pth', 64), ('safetensors', 45)])
def test_parity_with_timm(tmp_path, file_format, size):
  torch = pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')
  timm = pytest.importorskip('timm', reason='parity test needs timm')
  torch.manual_seed(0)
  model = ref.perturb_batch_norm(timm.create_model('tf_efficientnet_lite0', pretrained=False))
  state_dict = ref.saved_state_dict(model, tmp_path, file_format)
  x = np.random.RandomState(0).standard_normal((2, 3, size, size)).astype(np.float32)
  taps, logits = ref.hooked_outputs(model, x, [model.blocks[i] for i in efficientnet.PROJECTED_GAN_TAPS])
  module = efficientnet.EfficientNet()
  out = jax.jit(module.apply)(efficientnet.variables_from_state_dict(module, state_dict), jnp.asarray(ref.nhwc(x)))
  for ours, theirs in zip(out.features, taps):
    ref.assert_close(ours, ref.nhwc(theirs))
  ref.assert_close(out.logits, logits)
