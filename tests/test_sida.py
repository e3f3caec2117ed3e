"""SiDA: pooled discriminator means inside the 8-device step equal per-group means computed by hand."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sida_jax import sampling
from sida_jax.losses import sida
from sida_jax.losses.method import Networks
from sida_jax.models import toy
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

SHAPE = (2, 2, 2)
BATCH = 16


def _softplus(x):
  return np.logaddexp(0.0, x)


def test_per_device_pooled_bce_equals_hand_computed_group_means():
  denoiser = toy.toy_denoiser((32, 32))
  variables = toy.init_toy(denoiser, jax.random.key(0), SHAPE)
  nets = Networks(denoiser, denoiser, denoiser)
  config = ml_collections.ConfigDict({"loss": {"alpha": 1.0, "discriminator_scale": 3.0}})
  method = sida.make(config, nets)           # adv_pool_size 0: pool = per-device batch
  tx = state_lib.make_optimizer(1e-3, clip_value=1.0)
  spec = step_lib.StepSpec(method=method, nets=nets, batch_size=BATCH, image_shape=SHAPE, init_sigma=2.5,
                           generator_tx=tx, critic_tx=tx, ema_halflife_mimg=0.5)
  rng = np.random.RandomState(0)
  real = rng.randn(BATCH, *SHAPE).astype(np.float32)
  batch = {"critic": {"images": real}, "generator": {"images": real}}
  state = state_lib.init_state(jax.random.key(5), variables, variables, tx, tx)
  mesh = step_lib.make_mesh(8)
  draws = step_lib.sample_draws(spec, step_lib.iteration_key(state, 0))["critic"]
  _, metrics = step_lib.make_train_step(spec, mesh)(state, variables, step_lib.shard_batch(batch, mesh))

  # By hand: the same global draws, networks run on the whole batch, BCE averaged per device (2 samples).
  x_g = np.asarray(sampling.generate(denoiser, variables, draws["z"], None, 2.5))
  sigma = np.exp(np.asarray(draws["sigma_normal"]) * 1.2 - 1.2)
  noise = np.asarray(draws["noise"]) * sigma[:, None, None, None]
  apply = lambda x, flag: denoiser.module.apply(variables, jnp.asarray(x), jnp.asarray(sigma), return_flag=flag)
  _, logit_fake = apply(x_g + noise, "encoder_decoder")
  logit_real = np.asarray(apply(real + noise, "encoder")).reshape(BATCH)
  logit_fake = np.asarray(logit_fake).reshape(BATCH)
  pool = BATCH // 8
  bce_real = np.repeat(_softplus(-logit_real).reshape(-1, pool).mean(1), pool)
  bce_fake = np.repeat(_softplus(logit_fake).reshape(-1, pool).mean(1), pool)
  weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
  expected = np.sum(weight * 0.5 * (bce_real + bce_fake)) * 3.0 / BATCH
  np.testing.assert_allclose(metrics["loss_discriminator"], expected, rtol=1e-5)
  # Pooling over the whole batch instead gives a different number: the grouping is really per device.
  whole = np.sum(weight * 0.5 * (_softplus(-logit_real).mean() + _softplus(logit_fake).mean())) * 3.0 / BATCH
  assert abs(whole - expected) > 1e-4 * abs(expected)
