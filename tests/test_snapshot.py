"""Tests for sida_jax.formats.snapshot: the official fixture pickles, read and loaded as networks."""
import json
import pathlib

import jax
import numpy as np
import pytest

from conftest import fixture_files, fixtures_dir
from sida_jax import checkpoint
from sida_jax.formats import snapshot, torch_files
from sida_jax.formats.pickle import UnsafePickleError
from sida_jax.models import convert, registry

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


# ----------------------------------------------------------------------------------------------------
# Official SiD training states (tests/data/official_states, written by make_states.py with torch and
# the official SiD modules): the generator EMA loads, from a module or from a bare state_dict.

STATES = pathlib.Path(__file__).parent / 'data' / 'official_states'


def _teacher(stem):
  """A teacher Network of the class and kwargs recorded next to a training state."""
  info = json.loads((STATES / f'{stem}.json').read_text())
  module = registry.build_network(info['class_name'], info['init_kwargs'])
  return registry.Network(module, convert.init_variables(module, jax.random.key(0)), info['class_name'],
                          info['init_kwargs'])


def _assert_state_equal(net, stem):
  state = convert.state_dict_from_variables(net.module, net.variables)
  with np.load(STATES / f'{stem}_reference.npz') as ref:  # torch's own G_ema.state_dict()
    assert sorted(state) == sorted(ref.files)
    for name in ref.files:
      np.testing.assert_array_equal(state[name], ref[name], err_msg=name)


def test_sid_main_training_state_holds_modules():
  path = STATES / 'sid_main_state.pt'
  top = snapshot.read_snapshot(path)
  assert sorted(top) == ['G', 'G_ema', 'fake_score', 'fake_score_optimizer_state', 'g_optimizer_state']
  assert all(isinstance(top[k], torch_files.PersistentObject) for k in ('G', 'G_ema', 'fake_score'))
  adam = top['g_optimizer_state']
  assert adam['param_groups'][0]['betas'] == (0.0, 0.999)
  assert sorted(adam['state'][0]) == ['exp_avg', 'exp_avg_sq', 'step'] and adam['state'][0]['step'] == 1
  num_parameters = sum(value is not None for _, module in top['G'].named_modules()
                       for value in module.state['_parameters'].values())
  assert len(adam['state']) == len(adam['param_groups'][0]['params']) == num_parameters == 48
  # `ema` means G_ema in a training state; the class and kwargs are the ones the module recorded.
  net = snapshot.load_snapshot(path)
  assert net.class_name == 'EDMPrecond'
  assert net.init_kwargs == json.loads((STATES / 'sid_main_state.json').read_text())['init_kwargs']
  _assert_state_equal(net, 'sid_main_state')
  generator = snapshot.load_snapshot(path, key='G')
  assert not np.array_equal(generator.params['model']['map_layer0']['weight'], net.params['model']['map_layer0']['weight'])


@pytest.mark.parametrize('stem, class_name', [('sida_edm_state', 'EDMPrecond'),
                                              ('sida_edm2_state', 'EDM_2_Precond_Generator')])
def test_sida_training_state_holds_state_dicts(stem, class_name):
  path = STATES / f'{stem}.pt'
  top = snapshot.read_snapshot(path)
  assert sorted(top) == ['G_ema_state', 'G_state', 'fake_score_optimizer_state', 'fake_score_state',
                         'g_optimizer_state']
  with pytest.raises(ValueError, match=r"'G_ema_state' is a bare state_dict .*teacher"):
    snapshot.load_snapshot(path)
  teacher = _teacher(stem)
  net = snapshot.load_snapshot(path, like=teacher)
  # EDM2 generators have no logvar head: the teacher's Precond becomes EDM_2_Precond_Generator.
  assert net.class_name == class_name and net.init_kwargs == teacher.init_kwargs
  _assert_state_equal(net, stem)
  # --config.generator_init goes through checkpoint.load_network with the run's teacher.
  via_checkpoint = checkpoint.load_network(str(path), like=teacher)
  jax.tree.map(np.testing.assert_array_equal, via_checkpoint.variables, net.variables)


def test_other_torch_files_get_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"legacy_state_dict\.pth: no key 'ema'; keys present: \['bf16'"):
    snapshot.load_snapshot(STATES / 'legacy_state_dict.pth')
  notes = tmp_path / 'training-state-000100.pt'
  notes.write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(UnsafePickleError, match=r'training-state-000100\.pt as a snapshot pickle or torch\.save file'):
    snapshot.load_snapshot(notes)
