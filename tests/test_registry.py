"""Official class names and constructor kwargs → our modules (build_network and the families' tables)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_files
from sida_jax.models import convert, registry
from sida_jax.models.edm import precond
from sida_jax.models.edm2 import networks as edm2


def test_build_network_rejects_bad_input():
  kwargs = dict(img_resolution=8, img_channels=3, model_type='SongUNet')
  with pytest.raises(ValueError, match="'training.networks.iDDPMPrecond'"):
    registry.build_network('training.networks.iDDPMPrecond', kwargs)
  with pytest.raises(ValueError, match="'channel_multiplier'"):
    registry.build_network('EDMPrecond', dict(kwargs, channel_multiplier=[1]))
  with pytest.raises(ValueError, match="'UNetPlusPlus'"):
    registry.build_network('EDMPrecond', dict(kwargs, model_type='UNetPlusPlus'))
  with pytest.raises(ValueError, match="'img_channels'"):
    registry.build_network('VEPrecond', {'img_resolution': 8})


def test_build_network_maps_official_kwargs():
  kwargs = dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=True, sigma_data=0.6,
                model_type='SongUNet_EncoderDecoder', channel_mult=[1, 2], augment_dim=9,
                init_weight_unused_by_edm=None)
  with pytest.raises(ValueError, match="'init_weight_unused_by_edm'"):
    registry.build_network('EDMPrecond_EncoderDecoder', kwargs)
  del kwargs['init_weight_unused_by_edm']
  module = registry.build_network('sida_training.sida_networks.EDMPrecond_EncoderDecoder', kwargs,
                                  dtype=jnp.bfloat16)
  assert isinstance(module, precond.EDMPrecond) and module.dtype == jnp.bfloat16
  assert (module.sigma_data, module.img_resolution, module.img_channels) == (0.6, 16, 4)
  assert (module.model.channel_mult, module.label_dim, module.augment_dim) == ((1, 2), 10, 9)
  vp = registry.build_network('VPPrecond', dict(img_resolution=8, img_channels=3, M=100, beta_d=10))
  assert (vp.M, vp.beta_d, type(vp.model).__name__) == (100, 10.0, 'SongUNet')


def test_rewrap_puts_the_same_unet_under_another_edm_preconditioner():
  """GDD's generator: a teacher's U-Net (VP, VE or EDM class, model_type explicit or default) under GDDPrecond;
  the old preconditioner's kwargs are dropped and the default U-Net of the old class is kept."""
  unet = dict(img_resolution=8, img_channels=3, label_dim=10, channel_mult=[1, 2], dropout=0.0)
  cases = {'VPPrecond': dict(beta_d=10.0, M=100), 'VEPrecond': dict(sigma_min=0.02, sigma_max=100.0),
           'training.networks.EDMPrecond': dict(sigma_data=0.5, model_type='SongUNet')}
  for class_name, own in cases.items():
    kwargs = registry.rewrap(class_name, {**unet, **own}, 'GDDPrecond')
    assert kwargs == {**unet, 'model_type': 'SongUNet' if class_name != 'training.networks.EDMPrecond' or
                      'model_type' in own else 'DhariwalUNet'}
    module = registry.build_network('GDDPrecond', kwargs)
    assert isinstance(module, precond.GDDPrecond) and type(module.model).__name__ == 'SongUNet'
  assert registry.rewrap('EDMPrecond', unet, 'GDDPrecond')['model_type'] == 'DhariwalUNet'   # EDM's default
  with pytest.raises(ValueError, match="GDDPrecond goes around the U-Net of an EDM preconditioner .*'ToyPrecond'"):
    registry.rewrap('ToyPrecond', {'features': [8]}, 'GDDPrecond')


@pytest.mark.fixtures
@pytest.mark.parametrize('kwargs_path', fixture_files('edm2', '*_kwargs.json', exclude='block_*'))
def test_edm2_classes_are_delegated(kwargs_path):
  kwargs = json.loads(kwargs_path.read_text())
  module = registry.build_network(kwargs['class_name'], kwargs['init_kwargs'])
  assert isinstance(module, edm2.Precond)
  stem = kwargs_path.name[:-len('_kwargs.json')]
  state = dict(np.load(kwargs_path.with_name(f'{stem}_state_before.npz')))
  back = convert.state_dict_from_variables(module, convert.variables_from_state_dict(module, state))
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_block_remat_clones_the_unet_and_refuses_networks_without_blocks():
  edm2_module = registry.build_network('Precond', dict(img_resolution=8, img_channels=4, label_dim=0,
                                                       model_channels=8, channel_mult=[1], num_blocks=1,
                                                       attn_resolutions=[]))
  assert registry.with_block_remat(edm2_module).remat_blocks and not edm2_module.remat_blocks
  edm_module = registry.build_network('EDMPrecond', dict(img_resolution=8, img_channels=3, model_type='SongUNet',
                                                         model_channels=8, channel_mult=[1], num_blocks=1,
                                                         attn_resolutions=[]))
  assert registry.with_block_remat(edm_module).model.remat_blocks
  with pytest.raises(ValueError, match='needs an EDM or EDM2 U-Net, not ToyPrecond'):
    registry.with_block_remat(registry.build_network('ToyPrecond', dict(img_resolution=4, img_channels=2)))
