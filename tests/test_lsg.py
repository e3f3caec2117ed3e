"""SiD-LSG: κ = 1 is SiD bit for bit; each κ acts exactly where [002] eq. 7–9 put it; null labels; adapter."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sida_jax.losses import common, lsg, sid
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Networks
from sida_jax.models import toy

SHAPE = (2, 2, 2)
N = 16
LABELS = 3


def _setup():
  den = toy.toy_denoiser((16, 16), label_dim=LABELS)
  teacher = toy.init_toy(den, jax.random.key(0), SHAPE)
  critic = toy.init_toy(den, jax.random.key(1), SHAPE)
  labels = jnp.eye(LABELS)[np.random.RandomState(0).randint(LABELS, size=N)]
  return Networks(den, den, den), teacher, critic, labels


def _config(**loss):
  return ml_collections.ConfigDict({"loss": loss})


def _critic_inputs(teacher, labels, seed=2):
  return CriticInputs(x_g=jax.random.normal(jax.random.key(seed), (N, *SHAPE)), augment_labels=None, labels=labels,
                      real_images=None, real_augment_labels=None,
                      draws=lsg.critic_draws(jax.random.key(seed + 1), N, SHAPE), critic_buffers={},
                      teacher_variables=teacher, dropout_rng=jax.random.key(9), nimg=jnp.zeros(()))


def _generator_inputs(teacher, critic, labels):
  return GeneratorInputs(labels=labels, real_images=None, draws=sid.generator_draws(jax.random.key(4), N, SHAPE),
                         critic_variables=critic, teacher_variables=teacher, dropout_rng=jax.random.key(5),
                         nimg=jnp.zeros(()))


def _kappas(k1=1.0, k2=1.0, k3=1.0, k4=1.0):
  return dict(kappa1=k1, kappa2=k2, kappa3=k3, kappa4=k4)


def test_all_kappas_one_is_sid_exactly():
  nets, teacher, critic, labels = _setup()
  loss = dict(alpha=1.2, generator_scale=100.0)
  ours = lsg.make(_config(**loss, **_kappas()), nets)
  ref = sid.make(_config(**loss), nets)
  c_inputs = _critic_inputs(teacher, labels)
  (l1, _), g1 = jax.value_and_grad(ours.critic_loss, has_aux=True)(critic["params"], c_inputs)
  (l2, _), g2 = jax.value_and_grad(ref.critic_loss, has_aux=True)(critic["params"], c_inputs)
  assert float(l1) == float(l2)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
  g_inputs = _generator_inputs(teacher, critic, labels)
  x_g = jax.random.normal(jax.random.key(6), (N, *SHAPE))
  (l1, _), g1 = jax.value_and_grad(ours.generator_loss, has_aux=True)(x_g, g_inputs)
  (l2, _), g2 = jax.value_and_grad(ref.generator_loss, has_aux=True)(x_g, g_inputs)
  assert float(l1) == float(l2) and np.array_equal(g1, g2)
  assert float(jnp.max(jnp.abs(g1))) > 0


@pytest.mark.parametrize("alpha,k2,k3", [(1.0, 0.5, 0.25), (1.2, 2.0, 2.0)])
def test_generator_guidance_matches_eq_8_and_9(alpha, k2, k3):
  nets, teacher, critic, labels = _setup()
  k4, scale = 3.0, 2.0
  method = lsg.make(_config(alpha=alpha, generator_scale=scale, **_kappas(1.7, k2, k3, k4)), nets)
  inputs = _generator_inputs(teacher, critic, labels)
  x_g = jax.random.normal(jax.random.key(6), (N, *SHAPE))
  den = nets.teacher
  null = jnp.zeros_like(labels)

  def reference(x):
    # Independent: separate conditional / unconditional calls, guidance formed here.
    sigma = sid.generator_sigma(sid.SiDHyper(), inputs.draws)
    x_t = x + common.per_sample(sigma) * inputs.draws["noise"]
    call = lambda v, c: den(v, x_t, sigma, c).denoised
    t_u, t_c, f_u, f_c = call(teacher, null), call(teacher, labels), call(critic, null), call(critic, labels)
    f4, f2, f3 = t_u + k4 * (t_c - t_u), f_u + k2 * (f_c - f_u), f_u + k3 * (f_c - f_u)
    w = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(x - f4), axis=(1, 2, 3), keepdims=True), 1e-5))
    return jnp.sum((f4 - f2) * ((f4 - x) - alpha * (f4 - f3)) / w) * scale / N

  loss, grad = jax.value_and_grad(lambda x: method.generator_loss(x, inputs)[0])(x_g)
  ref_loss, ref_grad = jax.value_and_grad(reference)(x_g)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(ref_grad))))
  # κ1 never enters the generator loss; each of κ2, κ3, κ4 does.
  same = lsg.make(_config(alpha=alpha, generator_scale=scale, **_kappas(1.0, k2, k3, k4)), nets)
  assert float(same.generator_loss(x_g, inputs)[0]) == float(loss)
  for changed in (_kappas(1.7, 1.0, k3, k4), _kappas(1.7, k2, 1.0, k4), _kappas(1.7, k2, k3, 1.0),
                  _kappas(1.7, 1.0, 1.0, k4)):
    other = lsg.make(_config(alpha=alpha, generator_scale=scale, **changed), nets)
    assert abs(float(other.generator_loss(x_g, inputs)[0]) - float(loss)) > 1e-4 * abs(float(loss))


def test_critic_guidance_and_null_label_dropout():
  nets, teacher, critic, labels = _setup()
  k1 = 3.0
  method = lsg.make(_config(**_kappas(k1, 1.0, 1.0, 1.0)), nets)
  inputs = _critic_inputs(teacher, labels)
  dropped = np.asarray(inputs.draws["null_uniform"]) < 0.1
  assert 0 < dropped.sum() < N   # this seed exercises both branches
  kept_labels = jnp.where(dropped[:, None], 0.0, labels)
  hp = sid.SiDHyper()
  sigma = sid.critic_sigma(hp, inputs.draws)
  x_t = inputs.x_g + common.per_sample(sigma) * inputs.draws["noise"]
  den = nets.critic
  f_u = den(critic, x_t, sigma, jnp.zeros_like(labels)).denoised
  f_c = den(critic, x_t, sigma, kept_labels).denoised
  guided = f_u + k1 * (f_c - f_u)
  ref = np.sum(np.asarray(common.per_sample(common.edm_weight(sigma))) * (guided - inputs.x_g) ** 2) / N
  np.testing.assert_allclose(method.critic_loss(critic["params"], inputs)[0], ref, rtol=1e-5)
  # The step-side hook drops the same labels (and is idempotent); κ4 alone neither drops labels nor
  # enters the critic loss.
  np.testing.assert_array_equal(method.critic_labels(labels, inputs.draws), kept_labels)
  np.testing.assert_array_equal(method.critic_labels(kept_labels, inputs.draws), kept_labels)
  teacher_only = lsg.make(_config(**_kappas(k1, 1.0, 1.0, 5.0)), nets)
  assert float(teacher_only.critic_loss(critic["params"], inputs)[0]) == float(
      method.critic_loss(critic["params"], inputs)[0])
  plain = lsg.make(_config(**_kappas(1.0, 1.0, 1.0, 5.0)), nets)
  np.testing.assert_array_equal(plain.critic_labels(labels, inputs.draws), labels)
  rate = np.mean(np.asarray(lsg.critic_draws(jax.random.key(8), 40000, (1,))["null_uniform"]) < 0.1)
  assert abs(rate - 0.1) < 0.005


def test_text_embedding_adapter_uses_the_empty_prompt_embedding():
  # D(x; σ, e) = a·x + Σ_tokens e: linear in the embedding, so guidance has a closed form.
  apply_fn = lambda v, x, sigma, e: v["params"]["a"] * x + jnp.sum(e, axis=1).reshape(x.shape[0], 1, 1, -1)
  den = lsg.embedding_denoiser(apply_fn, embedding_dim=2)
  variables = {"params": {"a": jnp.asarray(0.3)}}
  rng = np.random.RandomState(1)
  empty = jnp.asarray(rng.randn(3, 2), jnp.float32)
  emb = jnp.asarray(rng.randn(4, 3, 2), jnp.float32)
  x = jnp.asarray(rng.randn(4, 1, 1, 2), jnp.float32)
  null = lsg.embedding_null_condition(empty)
  (out,) = lsg.guided_outputs(den, variables, x, jnp.ones(4), emb, null, (2.5,))
  base = 0.3 * np.asarray(x) + np.sum(np.asarray(empty), axis=0)
  expected = base + 2.5 * (np.sum(np.asarray(emb), axis=1).reshape(4, 1, 1, 2) - np.sum(np.asarray(empty), axis=0))
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  nets = Networks(den, den, den)
  method = lsg.make(_config(**_kappas(2.0, 2.0, 2.0, 2.0)), nets, null_condition=null)
  draws = {"null_uniform": jnp.asarray([0.05, 0.5, 0.01, 0.9])}
  dropped = method.critic_labels(emb, draws)
  np.testing.assert_array_equal(dropped[0], empty)
  np.testing.assert_array_equal(dropped[1], emb[1])
  inputs = GeneratorInputs(labels=emb, real_images=None, draws=sid.generator_draws(jax.random.key(0), 4, (1, 1, 2)),
                           critic_variables=variables, teacher_variables={"params": {"a": jnp.asarray(0.5)}},
                           dropout_rng=jax.random.key(1), nimg=jnp.zeros(()))
  assert np.isfinite(float(method.generator_loss(x, inputs)[0]))


def test_guidance_on_an_unconditional_network_is_a_clear_error():
  den = toy.toy_denoiser((8,))
  with pytest.raises(ValueError, match="conditional"):
    lsg.make(_config(**_kappas(2.0, 1.0, 1.0, 1.0)), Networks(den, den, den))
  lsg.make(_config(**_kappas()), Networks(den, den, den))
