"""safetensors files: a network's state_dict written and read back exactly (diffusers VAE files: test_vae.py)."""
import json

import jax
import numpy as np
import pytest

from conftest import fixtures_dir
from sida_jax.formats import safetensors
from sida_jax.models import convert, registry


def _first_network():
  """Module and state_dict of the first (listed) full EDM network fixture."""
  kwargs_path = next(p for p in sorted(fixtures_dir('edm').glob('*_kwargs.json'))
                     if not p.name.startswith('block_'))
  kwargs = json.loads(kwargs_path.read_text())
  state = dict(np.load(kwargs_path.with_name(kwargs_path.name.replace('_kwargs.json', '_state.npz'))))
  return registry.build_network(kwargs['class_name'], kwargs['init_kwargs']), state


@pytest.mark.fixtures
def test_safetensors_round_trip(tmp_path):
  module, state = _first_network()
  variables = convert.variables_from_state_dict(module, state)
  path = tmp_path / 'net.safetensors'
  safetensors.export_safetensors(module, variables, path, metadata={'class_name': 'EDMPrecond'})
  read = safetensors.read_safetensors(path)
  assert sorted(read) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(read[name], value, err_msg=name)
  reloaded = convert.variables_from_state_dict(module, read)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, variables)
