"""PyTorch state_dict <-> Flax variables: strictness, round trips, templates and counts, fresh init."""
import json
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from conftest import fixture_files, fixtures_dir
from sida_jax.models import convert
from sida_jax.models.registry import build_network

KWARGS = fixture_files('edm', '*_kwargs.json')


def _stem(path, suffix):
  return path.name[:-len(suffix)]


def _build(kwargs_path):
  kwargs = json.loads(kwargs_path.read_text())
  state = dict(np.load(kwargs_path.with_name(f'{_stem(kwargs_path, "_kwargs.json")}_state.npz')))
  return kwargs, build_network(kwargs['class_name'], kwargs['init_kwargs']), state


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


def test_fresh_adm_init_is_official():
  """ADM: zero-initialised layers are exactly zero, kaiming layers have the official spread."""
  module = build_network('EDMPrecond', dict(
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


def test_fresh_init_is_compiled_once_per_architecture(compile_events):
  """Two networks built apart with equal kwargs share one compiled init (a resume rebuilds its run); the
  variables are module.init's for the key, and another architecture or key gives others."""
  kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], embedding_type='positional',
                encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1])
  first = convert.init_variables(build_network('EDMPrecond', kwargs), jax.random.key(4))
  compiles = compile_events.count('/jax/core/compile/backend_compile_duration')
  assert compiles >= 1
  again = convert.init_variables(build_network('EDMPrecond', dict(kwargs)), jax.random.key(4))
  other_key = convert.init_variables(build_network('EDMPrecond', dict(kwargs)), jax.random.key(5))
  assert compile_events.count('/jax/core/compile/backend_compile_duration') == compiles
  module = build_network('EDMPrecond', kwargs)
  direct = jax.jit(module.init)(jax.random.key(4), *convert.example_inputs(module))
  for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(again), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other_key)))
  convert.init_variables(build_network('EDMPrecond', {**kwargs, 'model_channels': 16}), jax.random.key(4))
  assert compile_events.count('/jax/core/compile/backend_compile_duration') > compiles
