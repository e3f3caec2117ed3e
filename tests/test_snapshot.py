"""Tests for sida_jax.formats.snapshot: the official fixture pickles, read and loaded as networks."""
import json

import numpy as np
import pytest

from conftest import fixture_files, fixtures_dir
from sida_jax.formats import snapshot, torch_files
from sida_jax.models import convert

NETWORK_IO = fixture_files('edm', '*_io.npz', exclude='block_*')

# ----------------------------------------------------------------------------------------------------
# Official snapshot pickles (written by the official PyTorch code).


def _state_npz(pkl):
  """The state_dict fixture of a pickle: `<stem>_state.npz`, or EDM2's `<stem>_state_before.npz`."""
  for suffix in ('_state.npz', '_state_before.npz'):
    path = pkl.with_name(pkl.stem + suffix)
    if path.exists():
      return path
  raise AssertionError(f'no state_dict fixture next to {pkl}')


@pytest.mark.fixtures
@pytest.mark.parametrize('pkl', fixture_files('edm', '*.pkl') + fixture_files('edm2', '*.pkl'))
def test_official_snapshot(pkl):
  top = snapshot.read_snapshot(pkl)
  report = json.loads((pkl.parent / 'pickle_report.json').read_text())[pkl.stem]
  top_type = {'builtins.dict': dict, 'dnnlib.util.EasyDict': torch_files.EasyDict}[report['top_level_type']]
  assert type(top) is top_type
  assert list(top) == report['top_level_keys']
  assert set(report['globals']) <= torch_files.ALLOWED_GLOBALS

  net = top['ema']
  kwargs = json.loads(pkl.with_name(pkl.stem + '_kwargs.json').read_text())
  assert net.class_name == kwargs['class_name'].rsplit('.', 1)[-1]
  assert json.loads(json.dumps(net.init_kwargs)) == kwargs['init_kwargs']
  assert list(net.init_args) == kwargs['init_args']
  assert sorted(net.state) == report['root_state_keys']

  persistent = [m for _, m in net.named_modules() if isinstance(m, torch_files.PersistentObject)]
  assert len(persistent) == report['num_persistent_objects']
  assert sorted({m.class_name for m in persistent}) == report['persistent_class_names']
  num_parameters = sum(value.size for _, m in net.named_modules()
                       for value in m.state['_parameters'].values() if value is not None)
  assert num_parameters == report['num_parameters']

  state = net.state_dict()
  with np.load(_state_npz(pkl)) as ref:
    assert sorted(state) == sorted(ref.files)
    for name in ref.files:
      # EDM2 snapshots hold float16 weights that are exact on the float16 grid.
      assert state[name].dtype in (ref[name].dtype, np.float16), name
      assert state[name].shape == ref[name].shape, name
      np.testing.assert_array_equal(state[name].astype(ref[name].dtype), ref[name], err_msg=name)


# ----------------------------------------------------------------------------------------------------
# Snapshots loaded as networks.


def _stem(path, suffix):
  return path.name[:-len(suffix)]


@pytest.mark.fixtures
@pytest.mark.parametrize('io_path', NETWORK_IO[:1])
def test_load_snapshot_and_network_call(io_path):
  """A snapshot pickle read without torch gives a Network reproducing the official outputs."""
  stem = _stem(io_path, '_io.npz')
  kwargs = json.loads(io_path.with_name(f'{stem}_kwargs.json').read_text())
  net = snapshot.load_snapshot(io_path.with_name(f'{stem}.pkl'))
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
    snapshot.load_snapshot(path, key='generator')
  with pytest.raises(ValueError, match="'loss_fn' holds NoneType, not a network"):
    snapshot.load_snapshot(path, key='loss_fn')
