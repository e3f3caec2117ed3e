"""EDM teacher training: resumable, writes a loadable network, and learns (loss goes down)."""
import sys
import pathlib

import jax
import numpy as np

from sida_jax.checkpoint import load_network
from sida_jax.train import teacher

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
