"""PyTorch state_dict <-> Flax conversion: strictness, round trips, safetensors, snapshots, fresh init."""
import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from conftest import fixture_files, fixtures_dir
from sida_jax.models import convert, edm2, precond

KWARGS = fixture_files('edm', '*_kwargs.json')
NETWORK_IO = fixture_files('edm', '*_io.npz', exclude='block_*')
EDM2_KWARGS = fixture_files('edm2', '*_kwargs.json', exclude='block_*')


def _stem(path, suffix):
  return path.name[:-len(suffix)]


def _build(kwargs_path):
  kwargs = json.loads(kwargs_path.read_text())
  state = dict(np.load(kwargs_path.with_name(f'{_stem(kwargs_path, "_kwargs.json")}_state.npz')))
  return kwargs, convert.build_network(kwargs['class_name'], kwargs['init_kwargs']), state


def _first_network(folder='edm'):
  """Kwargs, module and state of the first (listed) full network fixture of a folder."""
  kwargs_path = next(p for p in sorted(fixtures_dir(folder).glob('*_kwargs.json'))
                     if not p.name.startswith('block_'))
  return _build(kwargs_path)


@pytest.mark.fixtures
@pytest.mark.parametrize('kwargs_path', KWARGS)
def test_state_dict_round_trip(kwargs_path):
  """state_dict -> variables -> state_dict returns the same names and arrays (buffers included)."""
  _, module, state = _build(kwargs_path)
  variables = convert.variables_from_state_dict(module, state)
  back = convert.state_dict_from_variables(module, variables)
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    assert back[name].dtype == np.float32
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.fixtures
@pytest.mark.parametrize('kwargs_path', KWARGS)
def test_template_matches_official_parameters(kwargs_path):
  """Freshly built networks have the official parameter names, shapes and count (abstractly)."""
  kwargs, module, state = _build(kwargs_path)
  template = convert.variables_template(module)
  shapes = {name: leaf.shape for col in template
            for name, leaf in traverse_util.flatten_dict(template[col], sep='.').items()}
  expected = {name: value.shape for name, value in state.items() if not name.endswith('resample_filter')}
  assert shapes == expected
  if 'num_parameters' in kwargs.get('construction', {}):
    assert convert.count_params(template) == kwargs['construction']['num_parameters']


@pytest.mark.fixtures
def test_safetensors_round_trip(tmp_path):
  _, module, state = _first_network()
  variables = convert.variables_from_state_dict(module, state)
  path = tmp_path / 'net.safetensors'
  convert.export_safetensors(module, variables, path, metadata={'class_name': 'EDMPrecond'})
  read = convert.read_safetensors(path)
  assert sorted(read) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(read[name], value, err_msg=name)
  reloaded = convert.variables_from_state_dict(module, read)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, variables)


@pytest.mark.fixtures
def test_strict_loading_names_the_offending_key():
  _, module, state = _first_network()
  name = sorted(k for k in state if k.endswith('.weight'))[0]
  with pytest.raises(ValueError, match=f"missing key.*'{name}'"):
    convert.variables_from_state_dict(module, {k: v for k, v in state.items() if k != name})
  with pytest.raises(ValueError, match="unexpected key.*'model.extra.weight'"):
    convert.variables_from_state_dict(module, dict(state, **{'model.extra.weight': np.zeros(3)}))
  wrong = state[name][..., :1]
  with pytest.raises(ValueError, match=re.escape(
      f"shape mismatch for '{name}': expected {state[name].shape}, got {wrong.shape}")):
    convert.variables_from_state_dict(module, dict(state, **{name: wrong}))
  filters = [k for k in state if k.endswith('resample_filter')]
  if filters:
    with pytest.raises(ValueError, match=f"'{filters[0]}' differs"):
      convert.variables_from_state_dict(module, dict(state, **{filters[0]: 2 * state[filters[0]]}))
    # Recomputable buffers may be left out.
    convert.variables_from_state_dict(module, {k: v for k, v in state.items() if k not in filters})


@pytest.mark.fixtures
def test_low_precision_sources_are_cast_to_float32():
  """fp16 sources (the fixtures are on the fp16 grid) load exactly; bf16 sources keep bf16 values."""
  _, module, state = _first_network()
  reference = convert.variables_from_state_dict(module, state)
  half = convert.variables_from_state_dict(module, {k: v.astype(np.float16) for k, v in state.items()})
  jax.tree_util.tree_map(np.testing.assert_array_equal, half, reference)
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
  loaded = convert.state_dict_from_variables(module, convert.variables_from_state_dict(module, bf16))
  for name, value in bf16.items():
    assert loaded[name].dtype == np.float32
    np.testing.assert_array_equal(loaded[name], value.astype(np.float32), err_msg=name)


def test_build_network_rejects_bad_input():
  kwargs = dict(img_resolution=8, img_channels=3, model_type='SongUNet')
  with pytest.raises(ValueError, match="'training.networks.iDDPMPrecond'"):
    convert.build_network('training.networks.iDDPMPrecond', kwargs)
  with pytest.raises(ValueError, match="'channel_multiplier'"):
    convert.build_network('EDMPrecond', dict(kwargs, channel_multiplier=[1]))
  with pytest.raises(ValueError, match="'UNetPlusPlus'"):
    convert.build_network('EDMPrecond', dict(kwargs, model_type='UNetPlusPlus'))
  with pytest.raises(ValueError, match="'img_channels'"):
    convert.build_network('VEPrecond', {'img_resolution': 8})


def test_build_network_maps_official_kwargs():
  kwargs = dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=True, sigma_data=0.6,
                model_type='SongUNet_EncoderDecoder', channel_mult=[1, 2], augment_dim=9,
                init_weight_unused_by_edm=None)
  with pytest.raises(ValueError, match="'init_weight_unused_by_edm'"):
    convert.build_network('EDMPrecond_EncoderDecoder', kwargs)
  del kwargs['init_weight_unused_by_edm']
  module = convert.build_network('sida_training.sida_networks.EDMPrecond_EncoderDecoder', kwargs,
                                 dtype=jnp.bfloat16)
  assert isinstance(module, precond.EDMPrecond) and module.dtype == jnp.bfloat16
  assert (module.sigma_data, module.img_resolution, module.img_channels) == (0.6, 16, 4)
  assert (module.model.channel_mult, module.label_dim, module.augment_dim) == ((1, 2), 10, 9)
  vp = convert.build_network('VPPrecond', dict(img_resolution=8, img_channels=3, M=100, beta_d=10))
  assert (vp.M, vp.beta_d, type(vp.model).__name__) == (100, 10.0, 'SongUNet')


@pytest.mark.fixtures
@pytest.mark.parametrize('kwargs_path', EDM2_KWARGS)
def test_edm2_classes_are_delegated(kwargs_path):
  kwargs = json.loads(kwargs_path.read_text())
  module = convert.build_network(kwargs['class_name'], kwargs['init_kwargs'])
  assert isinstance(module, edm2.Precond)
  state = dict(np.load(kwargs_path.with_name(f'{_stem(kwargs_path, "_kwargs.json")}_state_before.npz')))
  back = convert.state_dict_from_variables(module, convert.variables_from_state_dict(module, state))
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', NETWORK_IO[:1])
def test_load_snapshot_and_network_call(io_path):
  """A snapshot pickle read without torch gives a Network reproducing the official outputs."""
  stem = _stem(io_path, '_io.npz')
  kwargs = json.loads(io_path.with_name(f'{stem}_kwargs.json').read_text())
  net = convert.load_snapshot(io_path.with_name(f'{stem}.pkl'))
  assert net.class_name == kwargs['class_name'].rsplit('.', 1)[-1]
  assert net.init_kwargs == kwargs['init_kwargs']
  assert net.params is net.variables['params'] and 'model' in net.params
  state = dict(np.load(io_path.with_name(f'{stem}_state.npz')))
  assert convert.count_params(net.variables) == sum(v.size for k, v in state.items()
                                                    if not k.endswith(('resample_filter', '.freqs')))
  io = np.load(io_path)
  case = kwargs['case_names'][0]
  get = lambda key: io[f'{case}/{key}'] if f'{case}/{key}' in io else None
  x = io[f'{case}/x'].transpose(0, 2, 3, 1)
  d_x, logits = net(x, get('sigma'), get('class_labels'), get('augment_labels'),
                    return_flag='encoder_decoder')
  ref = io[f'{case}/D'].transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(d_x) - ref).max() <= 1e-5 * np.abs(ref).max()
  assert logits.ndim == 4 and logits.shape[-1] == 1


@pytest.mark.fixtures
def test_load_snapshot_reports_bad_keys():
  path = next(p for p in sorted(fixtures_dir('edm').glob('*.pkl')))
  with pytest.raises(ValueError, match=r"no key 'generator'; keys present: \[.*'ema'"):
    convert.load_snapshot(path, key='generator')
  with pytest.raises(ValueError, match="'loss_fn' holds NoneType, not a network"):
    convert.load_snapshot(path, key='loss_fn')


def test_fresh_adm_init_is_official():
  """ADM: zero-initialised layers are exactly zero, kaiming layers have the official spread."""
  module = convert.build_network('EDMPrecond', dict(
      img_resolution=8, img_channels=3, label_dim=10, augment_dim=9, model_type='DhariwalUNet',
      model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
  params = convert.init_variables(module, jax.random.key(0))['params']['model']
  for zero in (params['out_conv']['weight'], params['map_augment']['weight'],
               params['enc.8x8_block0']['conv1']['weight']):
    assert not np.any(np.asarray(zero))
  w = np.asarray(params['map_layer1']['weight'])  # kaiming_uniform x sqrt(1/3): std = 1/sqrt(3 fan_in)
  np.testing.assert_allclose(w.std(), 1 / np.sqrt(3 * w.shape[1]), rtol=0.03)
  label = np.asarray(params['map_label']['weight'])  # kaiming_normal x sqrt(label_dim): std 1
  np.testing.assert_allclose(label.std(), 1.0, rtol=0.1)
