"""End to end on a 2-D mixture of Gaussians: a near-exact toy teacher, then SiD, SiDA, SIM, SiD-LSG and GDD
distilled through the shared step until every mode is covered and the energy distance to the data is small."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sida_jax import sampling, toy2d
from sida_jax.losses import gdd, lsg, sid, sida, sim
from sida_jax.losses.method import Networks
from sida_jax.models import toy
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

BATCH = 128
STEPS = 300
EVAL = 2000
ED_BOUND = 0.03          # the teacher's own 18-step samples reach ≈ 0.004; data vs data ≈ 0.002
MIN_MODE_FRACTION = 0.03  # of samples within 3 std of each mode (ideal 0.124)


@functools.lru_cache(maxsize=None)
def _problem():
  mog = toy2d.ring()
  den = toy.toy_denoiser((64, 64))
  init = toy.init_toy(den, jax.random.key(0), toy2d.SHAPE)
  teacher = toy2d.train_teacher(mog, den, init, jax.random.key(1), steps=1000, batch=256, learning_rate=1e-2)
  data = mog.sample(jax.random.key(2), EVAL)
  z = jax.random.normal(jax.random.key(3), (EVAL, *toy2d.SHAPE))
  return mog, den, teacher, data, z


def _meets_bounds(mog, samples, data):
  distance = float(toy2d.energy_distance(samples, data))
  coverage = np.asarray(toy2d.mode_coverage(mog, samples))
  return distance < ED_BOUND and coverage.min() >= MIN_MODE_FRACTION, distance, coverage


def test_mixture_denoiser_is_tweedies_formula():
  mog = toy2d.MixtureOfGaussians(((0.0, 1.0), (2.0, -1.0), (-1.5, 0.0)), 0.3)
  x = jax.random.normal(jax.random.key(0), (6, *toy2d.SHAPE)) * 2
  sigma = jnp.array([0.01, 0.1, 0.5, 1.0, 3.0, 20.0])

  def log_density(point, s):
    var = mog.std ** 2 + s ** 2
    sq = jnp.sum((point[None] - mog.centers) ** 2, axis=1)
    return jax.scipy.special.logsumexp(-0.5 * sq / var) - jnp.log(var)

  # E[x₀|x] = x + σ²∇log p_σ(x) with p_σ the mixture convolved with N(0, σ²I).
  score = jax.vmap(jax.grad(log_density))(x.reshape(6, 2), sigma)
  expected = x.reshape(6, 2) + sigma[:, None] ** 2 * score
  np.testing.assert_allclose(mog.denoise(x, sigma).reshape(6, 2), expected, rtol=1e-4, atol=1e-5)


def test_energy_distance_matches_brute_force():
  rng = np.random.RandomState(0)
  x, y = rng.randn(15, 2), rng.randn(11, 2) + 0.5
  mean = lambda a, b: np.mean([np.linalg.norm(p - q) for p in a for q in b])
  expected = 2 * mean(x, y) - mean(x, x) - mean(y, y)
  np.testing.assert_allclose(toy2d.energy_distance(jnp.asarray(x), jnp.asarray(y)), expected, rtol=1e-4)


def test_teacher_is_near_exact_and_samples_the_mixture():
  mog, den, teacher, data, z = _problem()
  error = float(toy2d.regression_error(mog, den, teacher, jax.random.key(4), 8192))
  # RMS error of the raw network output (unit-scale target; untrained ≈ 0.46): ≈ 0.17, nearly all of it
  # at σ ∈ [0.02, 0.2] where the exact denoiser switches sharply between modes.
  assert error < 0.2
  samples = jax.jit(functools.partial(sampling.heun_sample, den, num_steps=18))(teacher, z)
  ok, distance, _ = _meets_bounds(mog, samples, data)
  assert ok and distance < ED_BOUND / 3


def _kappa_one():
  return dict(kappa1=1.0, kappa2=1.0, kappa3=1.0, kappa4=1.0)


# The toy's C·H·W is 2, not 3072: SiDA's per-sample discriminator term is scaled down by about that ratio
# so that it does not swamp the per-element denoising loss of the shared fake score network.
METHODS = {
    "sid": (sid, dict(alpha=1.2)),
    "sida": (sida, dict(alpha=1.2, discriminator_scale=1e-3, critic_only_kimg=0.0,
                        sid_only_kimg=100 * BATCH / 1000)),
    # The default c = 0.00054·√(C·H·W) is 0.0008 here, which makes SIM a pure unit-direction loss whose
    # minibatch noise does not shrink as the generator converges; c on the scale of the modes' width keeps
    # it quadratic near the optimum.
    "sim": (sim, dict(huber_c=0.05)),
    "lsg": (lsg, _kappa_one()),
    "gdd": (gdd, dict()),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_distillation_covers_every_mode(name):
  mog, den, teacher, data, z = _problem()
  module, loss = METHODS[name]
  nets = Networks(den, den, den)
  method = module.make(ml_collections.ConfigDict({"loss": loss}), nets)
  init_sigma = method.init_sigma or 2.5
  ok, distance, _ = _meets_bounds(mog, sampling.generate(den, teacher, z, None, init_sigma), data)
  assert not ok and distance > 5 * ED_BOUND   # the untrained generator (teacher at σ_init) fails the bounds

  spec = step_lib.StepSpec(
      method=method, nets=nets, batch_size=BATCH, image_shape=toy2d.SHAPE, init_sigma=init_sigma,
      generator_tx=state_lib.make_optimizer(1e-3, trainable_mask=method.generator_trainable_mask),
      critic_tx=state_lib.make_optimizer(1e-3, clip_value=method.critic_grad_clip),
      ema_halflife_mimg=0.005)   # with the 0.05 ramp-up: an average over the last ≈ 15 steps
  train_step = step_lib.make_train_step(spec, step_lib.make_mesh(1))
  critic = (method.init_critic_variables(jax.random.key(5), teacher, toy2d.SHAPE)
            if method.init_critic_variables else teacher)
  state = state_lib.init_state(jax.random.key(6), teacher, critic, spec.generator_tx, spec.critic_tx)
  real = np.asarray(mog.sample(jax.random.key(7), 2 * STEPS * BATCH)).reshape(STEPS, 2, BATCH, *toy2d.SHAPE)
  for i in range(STEPS):
    state, metrics = train_step(state, teacher, {"critic": {"images": real[i, 0]},
                                                 "generator": {"images": real[i, 1]}})
  assert np.isfinite(float(metrics["loss_generator"]))
  samples = sampling.generate(den, {"params": state.generator_ema}, z, None, init_sigma)
  ok, distance, coverage = _meets_bounds(mog, samples, data)
  assert ok, f"{name}: energy distance {distance:.4f}, mode coverage {np.round(coverage, 3)}"
