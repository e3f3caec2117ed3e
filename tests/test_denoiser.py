"""Denoiser: the uniform call over Precond modules — modes, logvar, labels, dropout, errors."""
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax.models import build_network, denoiser_for
from sida_jax.models import convert
from sida_jax.models.denoiser import Denoiser
from sida_jax.models.toy import init_toy, toy_denoiser

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import smoke  # noqa: E402

EDM2_CLASS = "training.networks_edm2.Precond"


def _inputs(shape, label_dim, augment_dim=0, n=3, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32)
  sigma = jnp.asarray(np.exp(rng.normal(size=(n,))), jnp.float32)
  labels = jnp.asarray(np.eye(label_dim)[rng.integers(0, label_dim, n)], jnp.float32) if label_dim else None
  aug = jnp.asarray(rng.normal(size=(n, augment_dim)), jnp.float32) if augment_dim else None
  return x, sigma, labels, aug


def _random_variables(module, seed):
  """Random normal variables (the official init zeroes output layers and gains, hiding every input)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape), jnp.float32),
                      convert.variables_template(module))


@functools.lru_cache(maxsize=None)
def _edm():
  kwargs = smoke.tiny_ddpmpp(resolution=8, channels=3, label_dim=4, model_channels=8) | {"augment_dim": 9}
  module = build_network("EDMPrecond", kwargs)
  return denoiser_for(module, "EDMPrecond", kwargs), _random_variables(module, 0)


def _toy():
  den = toy_denoiser((16, 16), label_dim=4, augment_dim=9)
  return den, init_toy(den, jax.random.key(1), (2, 2, 3))


@pytest.mark.parametrize("net", ["toy", "edm"])
def test_modes_match_the_raw_module(net):
  denoiser, variables = _toy() if net == "toy" else _edm()
  assert (denoiser.label_dim, denoiser.augment_dim, denoiser.has_logvar) == (4, 9, False)
  shape = (2, 2, 3) if net == "toy" else (8, 8, 3)
  x, sigma, labels, aug = _inputs(shape, 4, 9)
  call, raw = denoiser.__call__, denoiser.module.apply   # eager: cheaper than compiling each mode
  d_ref, logits_ref = raw(variables, x, sigma, labels, aug, return_flag="encoder_decoder")
  dec = call(variables, x, sigma, labels, aug, mode="decoder")
  enc = call(variables, x, sigma, labels, aug, mode="encoder")
  both = call(variables, x, sigma, labels, aug, mode="encoder_decoder")
  assert dec.logits is None and dec.logvar is None and enc.denoised is None and both.logvar is None
  np.testing.assert_allclose(dec.denoised, d_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(both.denoised, d_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(enc.logits, logits_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(both.logits, logits_ref, rtol=1e-6, atol=1e-6)
  assert dec.denoised.shape == x.shape and enc.logits.shape[0] == 3 and enc.logits.shape[-1] == 1
  # Augment labels reach the network: the zero vector and random ones give different outputs.
  zero = call(variables, x, sigma, labels, denoiser.zero_augment_labels(3), mode="decoder")
  assert not np.allclose(zero.denoised, dec.denoised)


def test_label_dim_zero_drops_labels():
  den, variables = _toy()
  x, sigma, labels, aug = _inputs((2, 2, 3), 4, 9)
  unconditional = Denoiser(den.module, label_dim=0, augment_dim=9)
  out = unconditional(variables, x, sigma, labels, aug).denoised
  # The official convention: class_labels=None on a conditional net means zeros.
  np.testing.assert_allclose(out, den.module.apply(variables, x, sigma, jnp.zeros((3, 4)), aug), rtol=1e-6)
  assert not np.allclose(out, den(variables, x, sigma, labels, aug).denoised)


def test_dropout_only_in_train_mode_with_the_rng():
  den = toy_denoiser((32,), dropout=0.5)
  variables = init_toy(den, jax.random.key(2), (2, 2, 1))
  x, sigma, _, _ = _inputs((2, 2, 1), 0)
  key = jax.random.key(3)
  train = den(variables, x, sigma, train=True, rng=key).denoised
  ref = den.module.apply(variables, x, sigma, train=True, rngs={"dropout": key})
  np.testing.assert_allclose(train, ref, rtol=1e-6)
  evaluation = den(variables, x, sigma, rng=key).denoised
  np.testing.assert_allclose(evaluation, den.module.apply(variables, x, sigma), rtol=1e-6)
  assert not np.allclose(train, evaluation)


def test_logvar_plumbing_on_edm2():
  kwargs = dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], channels_per_head=8, logvar_channels=8)
  module = build_network(EDM2_CLASS, kwargs)
  variables = _random_variables(module, 4)
  den = denoiser_for(module, EDM2_CLASS, kwargs, use_logvar=True)
  assert den.has_logvar and not denoiser_for(module, EDM2_CLASS, kwargs).has_logvar
  assert not denoiser_for(module, "EDMPrecond", kwargs, use_logvar=True).has_logvar
  x, sigma, labels, _ = _inputs((8, 8, 2), 3)
  call, raw = den.__call__, module.apply
  d_ref, logits_ref, logvar_ref = raw(variables, x, sigma, labels, return_flag="encoder_decoder",
                                      return_logvar=True)
  assert logvar_ref.shape == (3, 1, 1, 1)
  for mode in ("decoder", "encoder", "encoder_decoder"):
    out = call(variables, x, sigma, labels, mode=mode, want_logvar=True)
    np.testing.assert_allclose(out.logvar, logvar_ref, rtol=1e-5, atol=1e-6)
    if mode != "encoder":
      np.testing.assert_allclose(out.denoised, d_ref, rtol=1e-5, atol=1e-5)
    if mode != "decoder":
      np.testing.assert_allclose(out.logits, logits_ref, rtol=1e-5, atol=1e-5)


class _NoAugment(nn.Module):
  """A network whose call has no augment_labels argument."""

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, train=False, return_flag="decoder"):
    return x * self.param("scale", nn.initializers.constant(2.0), ())


def test_modules_without_augment_labels_and_errors():
  den = Denoiser(_NoAugment(), accepts_augment_labels=False)
  variables = den.module.init(jax.random.key(0), jnp.ones((1, 1, 1, 1)), 1.0)
  np.testing.assert_array_equal(den(variables, jnp.full((1, 1, 1, 1), 3.0), 1.0).denoised, [[[[6.0]]]])
  assert den.zero_augment_labels(2) is None
  np.testing.assert_array_equal(Denoiser(den.module, augment_dim=9).zero_augment_labels(2), np.zeros((2, 9)))
  with pytest.raises(ValueError, match="unknown network mode 'decode'"):
    den(variables, jnp.ones((1, 1, 1, 1)), 1.0, mode="decode")
  with pytest.raises(ValueError, match="no log-variance head"):
    den(variables, jnp.ones((1, 1, 1, 1)), 1.0, want_logvar=True)
  toy, toy_vars = _toy()
  with pytest.raises(ValueError, match="no log-variance head"):
    toy(toy_vars, jnp.ones((1, 2, 2, 3)), 1.0, want_logvar=True)
