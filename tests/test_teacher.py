"""EDM teacher training: resumable, writes a loadable network, refuses a new batch size on a resume."""
import sys
import pathlib

import jax
import numpy as np
import pytest

from sida_jax.checkpoint import load_network
from sida_jax.train import teacher
from sida_jax.train import workdir as workdir_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import mnist_teacher  # noqa: E402


def _config(total_kimg):
  c = mnist_teacher.get_config()
  c.network.kwargs = dict(mnist_teacher.mnist_network(8), img_resolution=8, channel_mult=[1, 2],
                          attn_resolutions=[])
  c.data.source = "digits"
  c.data.resolution = 8
  c.batch_size = 16
  c.total_kimg = total_kimg
  c.log_every_kimg = 0.016
  c.checkpoint_every_kimg = 0.064
  return c


@pytest.mark.slow
def test_teacher_training_resumes_exactly_and_writes_the_network(tmp_path):
  config = _config(8 * 16 / 1000)
  straight = teacher.train_teacher(config, str(tmp_path / "a"))
  teacher.train_teacher(config, str(tmp_path / "b"), stop_after_steps=4)
  resumed = teacher.train_teacher(config, str(tmp_path / "b"))
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  net = load_network(str(tmp_path / "a" / "network"))
  for a, b in zip(jax.tree.leaves(net.params), jax.tree.leaves(straight.ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_data_shape_is_a_clear_error(tmp_path):
  config = _config(0.016)
  config.data.resolution = 16
  import pytest
  with pytest.raises(ValueError, match="expects"):
    teacher.train_teacher(config, str(tmp_path))


def test_a_resumed_teacher_refuses_another_batch_size_before_writing(tmp_path):
  config = _config(2 * 16 / 1000)
  workdir_lib.record(str(tmp_path), config)             # a workdir trained with batch 16 (its checkpoint is
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # not read: the refusal comes first)
  before = (tmp_path / "config.json").read_bytes()
  config.batch_size = 32
  config.total_kimg = 0.064
  import pytest
  with pytest.raises(workdir_lib.ConfigMismatch, match="batch_size 16 → 32"):
    teacher.train_teacher(config, str(tmp_path))
  assert (tmp_path / "config.json").read_bytes() == before
