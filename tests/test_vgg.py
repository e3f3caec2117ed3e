"""torchvision vgg16_bn in Flax: parameter counts, stored torchvision outputs, strict conversion, parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import backbone_reference as ref
from sida_jax.models.backbones import torch_layers, vgg


def _template(module):
  return torch_layers.variables_template(module, vgg.example_input(module))


def test_parameter_counts_match_torchvision():
  # torchvision: sum(p.numel() for p in vgg16_bn().parameters()) and the same over .features.
  assert torch_layers.count_params(_template(vgg.VGG())) == 138_365_992
  assert torch_layers.count_params(_template(vgg.VGG(include_head=False))) == 14_723_136


def test_reduced_network_matches_stored_torchvision_outputs():
  data = np.load(ref.DATA / 'vgg_tiny.npz')
  module = ref.tiny_vgg()
  state_dict = ref.recipe_state_dict(ref.template_shapes(_template(module)), ref.RECIPE_SEED)
  out = jax.jit(module.apply)(vgg.variables_from_state_dict(module, state_dict), data['input'])
  assert out.logits is None and len(out.features) == 4
  for i, feature in enumerate(out.features):
    ref.assert_close(feature, data[f'tap{i}'])


def test_conversion_is_strict():
  module = ref.tiny_vgg(include_head=False)
  state_dict = ref.recipe_state_dict(ref.template_shapes(_template(module)), 0)
  with pytest.raises(ValueError, match="missing key\\(s\\) 'features.41.running_var'"):
    vgg.variables_from_state_dict(module, {k: v for k, v in state_dict.items() if k != 'features.41.running_var'})
  with pytest.raises(ValueError, match="unexpected key\\(s\\) 'features.2.weight'"):
    vgg.variables_from_state_dict(module, {**state_dict, 'features.2.weight': np.zeros(3)})
  with pytest.raises(ValueError, match="shape mismatch for 'features.0.weight'"):
    vgg.variables_from_state_dict(module, {**state_dict, 'features.0.weight': np.zeros((8, 3, 3, 1))})
  with pytest.raises(ValueError, match='taps \\[50\\] outside the 44 layers'):
    vgg.VGG(taps=(13, 50)).init(jax.random.key(0), vgg.example_input(None))


def test_headless_module_takes_the_full_file():
  full = ref.tiny_vgg(include_head=True).clone(hidden=16, num_classes=5)
  state_dict = ref.recipe_state_dict(ref.template_shapes(_template(full)), 1)
  trunk = vgg.variables_from_state_dict(full.clone(include_head=False), state_dict)
  assert 'classifier' not in trunk['params']
  np.testing.assert_array_equal(trunk['params']['features']['3']['weight'], state_dict['features.3.weight'])
  with pytest.raises(ValueError, match="shape mismatch for 'classifier.6.bias'"):  # head entries are checked too
    vgg.variables_from_state_dict(full.clone(include_head=False), {**state_dict, 'classifier.6.bias': np.zeros(4)})


@pytest.mark.parametrize('file_format', ['pth', 'safetensors'])
def test_parity_with_torchvision(tmp_path, file_format):
  torch = pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')
  torchvision = pytest.importorskip('torchvision', reason='parity test needs torchvision')
  torch.manual_seed(0)
  model = ref.perturb_batch_norm(torchvision.models.vgg16_bn())
  state_dict = ref.saved_state_dict(model, tmp_path, file_format)
  x = np.random.RandomState(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
  taps, logits = ref.hooked_outputs(model, x, [model.features[i - 1] for i in vgg.PROJECTED_GAN_TAPS])
  module = vgg.VGG()
  out = jax.jit(module.apply)(vgg.variables_from_state_dict(module, state_dict), jnp.asarray(ref.nhwc(x)))
  for ours, theirs in zip(out.features, taps):
    ref.assert_close(ours, ref.nhwc(theirs))
  ref.assert_close(out.logits, logits)
