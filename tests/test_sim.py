"""SIM: closed-form generator gradients on linear denoisers, the fake = teacher fixed point, the L2 limit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sida_jax.losses import common, sid, sim
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Networks
from sida_jax.models import toy
from sida_jax.models.denoiser import Denoiser

SHAPE = (2, 2, 3)
N = 8


class LinearDenoiser(nn.Module):
  """D(x) = a·x + b: its Jacobian is a·I, which makes the generator gradient closed-form."""

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, augment_labels=None, train=False, return_flag="decoder"):
    a = self.param("a", nn.initializers.zeros, ())
    b = self.param("b", nn.initializers.zeros, x.shape[1:])
    return a * x + b


def _linear(a, b):
  return {"params": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}


def _generator_inputs(teacher_variables, critic_variables, draws):
  return GeneratorInputs(labels=None, real_images=None, draws=draws, critic_variables=critic_variables,
                         teacher_variables=teacher_variables, dropout_rng=jax.random.key(0),
                         nimg=jnp.zeros(()))


def _method(nets, **loss):
  return sim.make(ml_collections.ConfigDict({"loss": loss}), nets)


def test_generator_gradient_matches_closed_form_with_differentiated_normaliser():
  rng = np.random.RandomState(0)
  den = Denoiser(LinearDenoiser())
  a_q, a_f, c = 0.7, 0.4, 0.5
  b_q, b_f = rng.randn(*SHAPE), rng.randn(*SHAPE)
  x_g = jnp.asarray(rng.randn(N, *SHAPE), jnp.float32)
  draws = sim.generator_draws(jax.random.key(1), N, SHAPE)
  inputs = _generator_inputs(_linear(a_q, b_q), _linear(a_f, b_f), draws)
  method = _method(Networks(den, den, den), huber_c=c)
  loss, grad = jax.value_and_grad(lambda x: method.generator_loss(x, inputs)[0])(x_g)

  # Reference in float64: y = d_ψ − d_q, L = −Σ_i (y_i/‖y_i‖_c)·(d_ψ − x_g)_i / N.
  sigma = np.exp(-3.5 + 2.5 * np.asarray(draws["sigma_normal"], np.float64))
  xg = np.asarray(x_g, np.float64)
  xt = xg + sigma.reshape(-1, 1, 1, 1) * np.asarray(draws["noise"], np.float64)
  y = (a_f - a_q) * xt + (b_f - b_q)
  r = a_f * xt + b_f - xg
  norm = np.sqrt(np.sum(y ** 2, axis=(1, 2, 3), keepdims=True) + c ** 2)
  ref_loss = -np.sum(y * r / norm) / N
  # ∇ = −[(a_ψ − a_q)/‖y‖_c·(r − y(yᵀr)/‖y‖_c²) + (a_ψ − 1)·y/‖y‖_c] / N
  yr = np.sum(y * r, axis=(1, 2, 3), keepdims=True)
  ref_grad = -((a_f - a_q) / norm * (r - y * yr / norm ** 2) + (a_f - 1) * y / norm) / N
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
  # The projection term is what a stop-gradient on the normaliser would drop: it is not negligible here.
  dropped = -(a_f - a_q) / norm * (-y * yr / norm ** 2) / N
  assert np.max(np.abs(dropped)) > 1e-2 * np.max(np.abs(ref_grad))


def test_zero_generator_gradient_when_critic_equals_teacher():
  den = toy.toy_denoiser((16, 16))
  teacher = toy.init_toy(den, jax.random.key(0), SHAPE)
  other = toy.init_toy(den, jax.random.key(1), SHAPE)
  method = _method(Networks(den, den, den))
  x_g = jax.random.normal(jax.random.key(2), (N, *SHAPE))
  draws = sim.generator_draws(jax.random.key(3), N, SHAPE)
  grad_fn = jax.grad(lambda x, critic: method.generator_loss(x, _generator_inputs(teacher, critic, draws))[0])
  # y ≡ 0 and ∂y/∂x ≡ 0 at every x when d_ψ = d_φ, so every term of the gradient vanishes (up to the
  # rounding of two separately compiled network calls, amplified by 1/c).
  assert np.max(np.abs(grad_fn(x_g, teacher))) < 1e-5
  assert np.max(np.abs(grad_fn(x_g, other))) > 1e-2


def test_large_c_limit_is_sid_alpha_one_without_its_normaliser():
  den = toy.toy_denoiser((16, 16))
  teacher = toy.init_toy(den, jax.random.key(0), SHAPE)
  critic = toy.init_toy(den, jax.random.key(1), SHAPE)
  nets = Networks(den, den, den)
  c = 1e4
  method = _method(nets, huber_c=c)
  x_g = jax.random.normal(jax.random.key(2), (N, *SHAPE))
  draws = sim.generator_draws(jax.random.key(3), N, SHAPE)
  inputs = _generator_inputs(teacher, critic, draws)
  hp = sid.SiDHyper(alpha=1.0)

  def sid_alpha_one(x):
    # SiD's α = 1 per-element loss times its (stop-gradient) normaliser w, at SIM's σ and noise.
    sigma = sim.generator_sigma(sim.SIMHyper(), draws)
    x_t = x + common.per_sample(sigma) * draws["noise"]
    d_q = den(teacher, x_t, sigma).denoised
    d_f = den(critic, x_t, sigma).denoised
    terms, w = sid.sid_terms(hp, x, d_q, d_f)
    return jnp.sum(terms * w) / N

  sim_loss, sim_grad = jax.value_and_grad(lambda x: c * method.generator_loss(x, inputs)[0])(x_g)
  ref_loss, ref_grad = jax.value_and_grad(sid_alpha_one)(x_g)
  np.testing.assert_allclose(sim_loss, ref_loss, rtol=1e-4)
  np.testing.assert_allclose(sim_grad, ref_grad, rtol=1e-3, atol=1e-6 * np.max(np.abs(ref_grad)))
  assert np.max(np.abs(ref_grad)) > 1e-3


def test_critic_loss_is_sids_and_sigmas_follow_p_sim():
  den = toy.toy_denoiser((16, 16))
  teacher = toy.init_toy(den, jax.random.key(0), SHAPE)
  nets = Networks(den, den, den)
  draws = sid.critic_draws(jax.random.key(4), N, SHAPE)
  inputs = CriticInputs(x_g=jax.random.normal(jax.random.key(5), (N, *SHAPE)), augment_labels=None, labels=None,
                        real_images=None, real_augment_labels=None, draws=draws, critic_buffers={},
                        teacher_variables=teacher, dropout_rng=jax.random.key(6), nimg=jnp.zeros(()))
  ours = _method(nets).critic_loss(teacher["params"], inputs)[0]
  ref = sid.make(ml_collections.ConfigDict({"loss": {}}), nets).critic_loss(teacher["params"], inputs)[0]
  assert float(ours) == float(ref)
  log_sigma = np.log(np.asarray(sim.generator_sigma(sim.SIMHyper(), sim.generator_draws(
      jax.random.key(7), 20000, (1,)))))
  np.testing.assert_allclose([log_sigma.mean(), log_sigma.std()], [-3.5, 2.5], atol=0.06)


def test_default_distance_constant_scales_with_dimension_and_bad_c_is_rejected():
  np.testing.assert_allclose(sim.SIMHyper().distance_constant((32, 32, 3)), 0.00054 * np.sqrt(3072))
  assert sim.SIMHyper(huber_c=0.3).distance_constant((32, 32, 3)) == 0.3
  with pytest.raises(ValueError, match="huber_c"):
    sim.SIMHyper(huber_c=-1.0).distance_constant(SHAPE)


# ---------------------------------------------------------------------------------------------------------
# Text-to-image form ([001] App. B.3, ALGORITHMS.md §4.6): both phases ln σ ~ N(−2, 2²) truncated to
# [0.01, 156.6155], both weights 1.
T2I_RANGE = (0.01, 156.6155)
T2I_LOSS = {"p_mean": -2.0, "p_std": 2.0, "generator_p_mean": -2.0, "generator_p_std": 2.0}


def _t2i_method(nets, **loss):
  return sim.make(ml_collections.ConfigDict({"loss": {**T2I_LOSS, **loss}}), nets, sigma_range=T2I_RANGE)


def test_t2i_losses_match_a_numpy_transcription():
  rng = np.random.RandomState(1)
  den = Denoiser(LinearDenoiser())
  a_q, a_f = 0.8, 0.55
  b_q, b_f = rng.randn(*SHAPE), rng.randn(*SHAPE)
  method = _t2i_method(Networks(den, den, den))
  x_g = jnp.asarray(rng.randn(N, *SHAPE), jnp.float32)
  xg = np.asarray(x_g, np.float64)

  # Critic: ‖d_ψ(y + σn; σ) − y‖² summed per sample, mean over samples, weight 1 (no λ_EDM).
  draws = method.critic_draws(jax.random.key(4), N, SHAPE)
  sigma = np.exp(-2.0 + 2.0 * np.asarray(draws["sigma_normal"], np.float64))
  xt = xg + sigma.reshape(-1, 1, 1, 1) * np.asarray(draws["noise"], np.float64)
  ref = np.sum((a_f * xt + b_f - xg) ** 2) / N
  inputs = CriticInputs(x_g=x_g, augment_labels=None, labels=None, real_images=None, real_augment_labels=None,
                        draws=draws, critic_buffers={}, teacher_variables=_linear(a_q, b_q),
                        dropout_rng=jax.random.key(6), nimg=jnp.zeros(()))
  np.testing.assert_allclose(method.critic_loss(_linear(a_f, b_f)["params"], inputs)[0], ref, rtol=1e-5)
  edm = np.sum(((sigma ** 2 + 0.25) / (0.5 * sigma) ** 2).reshape(-1, 1, 1, 1) * (a_f * xt + b_f - xg) ** 2) / N
  assert abs(edm - ref) > 0.1 * ref   # λ_EDM would have been visible

  # Generator: −Σ (y/√(‖y‖² + c²))·(d_ψ − x_g) / N at the generator's own truncated log-normal σ, c the default.
  draws = method.generator_draws(jax.random.key(5), N, SHAPE)
  sigma = np.exp(-2.0 + 2.0 * np.asarray(draws["sigma_normal"], np.float64))
  assert np.all((sigma >= T2I_RANGE[0] * (1 - 1e-6)) & (sigma <= T2I_RANGE[1] * (1 + 1e-6)))
  c = 0.00054 * np.sqrt(np.prod(SHAPE))
  xt = xg + sigma.reshape(-1, 1, 1, 1) * np.asarray(draws["noise"], np.float64)
  y = (a_f - a_q) * xt + (b_f - b_q)
  r = a_f * xt + b_f - xg
  norm = np.sqrt(np.sum(y ** 2, axis=(1, 2, 3), keepdims=True) + c ** 2)
  yr = np.sum(y * r, axis=(1, 2, 3), keepdims=True)
  ref_loss = -np.sum(y * r / norm) / N
  ref_grad = -((a_f - a_q) / norm * (r - y * yr / norm ** 2) + (a_f - 1) * y / norm) / N
  g_inputs = _generator_inputs(_linear(a_q, b_q), _linear(a_f, b_f), draws)
  loss, grad = jax.value_and_grad(lambda x: method.generator_loss(x, g_inputs)[0])(x_g)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * np.abs(ref_grad).max())


def test_t2i_sigmas_follow_the_truncated_lognormal_in_both_phases():
  """Truncation is conditioning (redrawn inside the range), not clipping: no mass piles up at the bounds, and the
  mean of ln σ is the truncated normal's."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  den = toy.toy_denoiser((16, 16))
  method = _t2i_method(Networks(den, den, den))
  lo, hi = (np.log(s) for s in T2I_RANGE)
  a, b = (lo + 2.0) / 2.0, (hi + 2.0) / 2.0
  for i, draw in enumerate((method.critic_draws, method.generator_draws)):
    r = np.asarray(draw(jax.random.key(10 + i), 40000, (1,))["sigma_normal"], np.float64)
    log_sigma = -2.0 + 2.0 * r
    assert log_sigma.min() >= lo - 1e-5 and log_sigma.max() <= hi + 1e-5
    assert np.mean(log_sigma < lo + 0.01) < 0.01          # clipping would put ≈ 9.7 % at σ = 0.01
    truncated = stats.truncnorm(a, b, loc=-2.0, scale=2.0)
    np.testing.assert_allclose([log_sigma.mean(), log_sigma.std()], [truncated.mean(), truncated.std()], atol=0.03)
    assert stats.kstest(log_sigma, truncated.cdf).pvalue > 1e-3
  assert stats.norm.cdf(a) > 0.09                          # what clipping would have moved to the bound


def test_t2i_form_refuses_a_bad_range():
  den = toy.toy_denoiser((16, 16))
  with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
    sim.make(ml_collections.ConfigDict({"loss": T2I_LOSS}), Networks(den, den, den), sigma_range=(1.0, 0.5))
