"""SiD-LSG: κ = 1 is SiD bit for bit; each κ acts exactly where [002] eq. 7–9 put it; null labels; adapter; the
text-to-image form (integer t, ε-MSE, t_init) against a numpy transcription of eq. 7–9 and the official code."""
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sida_jax.losses import common, lsg, sid
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Networks
from sida_jax.models import toy
from sida_jax.models.t2i import ddpm

T2I_DATA = pathlib.Path(__file__).resolve().parent / 'data' / 't2i'
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


# ---------------------------------------------------------------------------------------------------------
# Text-to-image form: a DDPM ε-prediction network at integer times ([002] eq. 7–9; official SiD-LSG code).

T2I_SHAPE = (4, 4, 3)       # latents; the toy's text embeddings are [N, TOKENS, 3]
TOKENS = 5
SD_SCHEDULER = {'beta_start': 0.00085, 'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'clip_sample': False}


class _LinearEps(nn.Module):
  """ε(x_t, t, c) = w·x_t + b·t/1000 + mean over tokens of c."""

  @nn.compact
  def __call__(self, x_t, t, condition):
    w = self.param('w', nn.initializers.constant(0.3), ())
    b = self.param('b', nn.initializers.constant(0.1), ())
    return w * x_t + b * t.reshape(-1, 1, 1, 1) / 1000 + condition.mean(axis=1)[:, None, None, :]


def _eps_numpy(params, x_t, t, condition):
  return (params['w'] * x_t + params['b'] * t.reshape(-1, 1, 1, 1) / 1000
          + condition.mean(axis=1)[:, None, None, :])


def _t2i_setup(kappas, rate=0.1):
  schedule = ddpm.from_scheduler_config(SD_SCHEDULER)
  den = lsg.embedding_denoiser(functools.partial(ddpm.edm_denoise, _LinearEps(), schedule), T2I_SHAPE[-1])
  rng = np.random.RandomState(3)
  null = rng.randn(1, TOKENS, 3).astype(np.float32)
  config = _config(**kappas, alpha=1.0, generator_scale=1.0, null_label_rate=rate)
  method = lsg.make(config, Networks(den, den, den), lsg.embedding_null_condition(null), sigma_grid=schedule.sigmas)
  params = {name: {'w': np.float32(w), 'b': np.float32(b)}
            for name, (w, b) in {'teacher': (0.3, 0.1), 'critic': (0.25, -0.2)}.items()}
  embeddings = rng.randn(N, TOKENS, 3).astype(np.float32)
  return schedule, method, params, null, embeddings


@pytest.mark.parametrize('kappas', [_kappas(), _kappas(2.0, 1.5, 1.5, 3.0), _kappas(1.0, 0.5, 0.25, 1.0)])
def test_t2i_losses_match_a_numpy_transcription_of_eq_7_to_9(kappas):
  schedule, method, params, null, emb = _t2i_setup(kappas, rate=0.3)
  k1, k2, k3, k4 = (kappas[f'kappa{i}'] for i in range(1, 5))
  rng = np.random.RandomState(4)
  x_g = rng.randn(N, *T2I_SHAPE).astype(np.float32)
  ab = schedule.alphas_cumprod.astype(np.float64)

  def guided(p, x_t, t, c, kappa):
    uncond = _eps_numpy(p, x_t, t, np.broadcast_to(null, c.shape))
    return uncond + kappa * (_eps_numpy(p, x_t, t, c) - uncond)

  # eq. 7: ‖ε_ψ,κ1(x_t, t, c) − ε_t‖², x_t = a_t x_g + σ_t ε_t, prompts dropped to ∅ where u < rate.
  draws = method.critic_draws(jax.random.key(5), N, T2I_SHAPE)
  t = np.asarray(draws['t'])
  assert t.min() >= 20 and t.max() <= 979 and t.dtype.kind == 'i'
  noise = np.asarray(draws['noise'], np.float64)
  dropped = np.asarray(draws['null_uniform']) < 0.3
  c = np.where(dropped[:, None, None], null, emb) if kappas != _kappas() else emb
  a, s = np.sqrt(ab[t]).reshape(-1, 1, 1, 1), np.sqrt(1 - ab[t]).reshape(-1, 1, 1, 1)
  x_t = a * x_g + s * noise
  expected_critic = np.sum((guided(params['critic'], x_t, t, c, k1) - noise) ** 2) / N
  inputs = CriticInputs(x_g=jnp.asarray(x_g), augment_labels=None, labels=jnp.asarray(emb), real_images=None,
                        real_augment_labels=None, draws=draws, critic_buffers={}, teacher_variables={},
                        dropout_rng=jax.random.key(0), nimg=jnp.zeros(()))
  critic = {'w': jnp.asarray(params['critic']['w']), 'b': jnp.asarray(params['critic']['b'])}
  np.testing.assert_allclose(method.critic_loss(critic, inputs)[0], expected_critic, rtol=2e-5)

  # eq. 8–9 in ε form: (ω/σ_t²)(ε_ψ,κ2 − ε_φ,κ4)ᵀ(ε_t − ε_ψ,κ3), ω = (σ_t⁴/a_t²)·C/‖x_g − f_φ,κ4‖₁.
  draws = method.generator_draws(jax.random.key(6), N, T2I_SHAPE)
  t, noise = np.asarray(draws['t']), np.asarray(draws['noise'], np.float64)
  a, s = np.sqrt(ab[t]).reshape(-1, 1, 1, 1), np.sqrt(1 - ab[t]).reshape(-1, 1, 1, 1)
  x_t = a * x_g + s * noise
  eps_teacher = guided(params['teacher'], x_t, t, emb, k4)
  f_teacher = (x_t - s * eps_teacher) / a
  omega = s ** 4 / a ** 2 * x_g[0].size / np.sum(np.abs(x_g - f_teacher), axis=(1, 2, 3), keepdims=True)
  per_sample = omega / s ** 2 * np.sum((guided(params['critic'], x_t, t, emb, k2) - eps_teacher)
                                       * (noise - guided(params['critic'], x_t, t, emb, k3)),
                                       axis=(1, 2, 3), keepdims=True)
  ginputs = GeneratorInputs(labels=jnp.asarray(emb), real_images=None, draws=draws,
                            critic_variables={'params': critic},
                            teacher_variables={'params': {k: jnp.asarray(v) for k, v in params['teacher'].items()}},
                            dropout_rng=jax.random.key(0), nimg=jnp.zeros(()))
  np.testing.assert_allclose(method.generator_loss(jnp.asarray(x_g), ginputs)[0], per_sample.sum() / N, rtol=5e-5)
  # The generator starts at t_init = 625: σ_625 = √((1 − ᾱ)/ᾱ).
  assert method.init_sigma == pytest.approx(np.sqrt((1 - ab[625]) / ab[625]), rel=1e-6)


def test_t2i_prompt_dropout_only_when_kappa1_or_kappa2_differ_from_one():
  for kappas, drops in ((_kappas(1.0, 1.0, 1.0, 3.0), False), (_kappas(1.0, 0.5, 0.5, 1.0), True),
                        (_kappas(2.0, 1.0, 1.0, 1.0), True)):
    _, method, _, null, emb = _t2i_setup(kappas)
    draws = {'null_uniform': jnp.linspace(0.0, 0.99, N)}
    out = np.asarray(method.critic_labels(jnp.asarray(emb), draws))
    dropped = np.all(out == null, axis=(1, 2))
    np.testing.assert_array_equal(dropped, (np.linspace(0.0, 0.99, N) < 0.1) & drops)


def test_t2i_timestep_bounds_are_checked():
  schedule = ddpm.from_scheduler_config(SD_SCHEDULER)
  den = lsg.embedding_denoiser(functools.partial(ddpm.edm_denoise, _LinearEps(), schedule), 3)
  null = lsg.embedding_null_condition(np.zeros((1, TOKENS, 3)))
  with pytest.raises(ValueError, match='timestep_max=1000 is outside the teacher'):
    lsg.make(_config(timestep_max=1000), Networks(den, den, den), null, sigma_grid=schedule.sigmas)
  with pytest.raises(ValueError, match='timestep_min=500 > timestep_max=400'):
    lsg.make(_config(timestep_min=500, timestep_max=400), Networks(den, den, den), null, sigma_grid=schedule.sigmas)


def _official_networks(run):
  """Teacher, fake score network and generator of the official reference (make_lsg_reference.py)."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from sida_jax.models.t2i import sd_unet  # pylint: disable=import-outside-toplevel
  state = load_file(str(T2I_DATA / 'tiny-lsg' / 'unet' / 'diffusion_pytorch_model.safetensors'))

  def perturbed(seed, scale=0.02):   # the script's perturbed_state
    rng = np.random.default_rng(seed)
    return {k: np.asarray(state[k], np.float32) + np.float32(scale) * rng.standard_normal(np.shape(state[k]))
            .astype(np.float32) for k in sorted(state)}
  module = run.teacher.module
  return (sd_unet.convert_diffusers_state(perturbed(1), module),
          sd_unet.convert_diffusers_state(perturbed(2), module))


def _projections(grads, seed):
  rng = np.random.default_rng(seed)
  return {k: np.asarray([np.sum(np.asarray(grads[k], np.float64) * rng.standard_normal(grads[k].shape)),
                         np.linalg.norm(np.asarray(grads[k], np.float64))]) for k in sorted(grads)}


@pytest.mark.slow
@pytest.mark.parametrize('case', ['nocfg', 'lsg'])
def test_t2i_step_losses_match_the_official_sid_lsg_code(case):
  """x_g, both losses and every gradient against the official sid_sd_sampler / sid_sd_denoise and loss lines on
  a tiny SD pipeline (tests/data/t2i/make_lsg_reference.py): κ all 1, and (κ1, κ2 = κ3, κ4) = (2.5, 1.5, 3)."""
  pytest.importorskip('tokenizers', reason='the pipeline tokenizer needs the tokenizers package')
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from configs import base  # pylint: disable=import-outside-toplevel
  from sida_jax import sampling  # pylint: disable=import-outside-toplevel
  from sida_jax.train import t2i  # pylint: disable=import-outside-toplevel
  ref = np.load(T2I_DATA / 'lsg_reference.npz')
  k1, k2, k4 = {'nocfg': (1.0, 1.0, 1.0), 'lsg': (2.5, 1.5, 3.0)}[case]
  config = base.method_config('lsg')
  config.teacher, config.batch_size = str(T2I_DATA / 'tiny-lsg'), 8
  config.loss.update(_kappas(k1, k2, k2, k4))
  run = t2i.build_run(config)
  critic_vars, generator_vars = _official_networks(run)
  text, method, nets = run.text, run.method, run.nets
  np.testing.assert_array_equal(text.token_ids(list(ref['prompts']) + ['']), ref['input_ids'])
  flat = lambda tree: {'.'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}

  # Critic phase, in the step's order: dropped prompts → x_g of the generator → ε-MSE of the fake score.
  emb = text.embed_prompts(list(ref['prompts']))
  draws = {'t': jnp.asarray(ref['critic_t']), 'noise': jnp.asarray(ref['noise_critic']),
           'null_uniform': jnp.where(jnp.asarray(ref['dropped']), 0.0, 0.5)}

  @jax.jit
  def critic_phase(critic_params, emb, draws):
    x_g = sampling.generate(nets.generator, generator_vars, jnp.asarray(ref['z_critic']),
                            method.critic_labels(emb, draws), method.init_sigma)
    inputs = CriticInputs(x_g=x_g, augment_labels=None, labels=emb, real_images=None, real_augment_labels=None,
                          draws=draws, critic_buffers={}, teacher_variables=run.teacher.variables,
                          dropout_rng=jax.random.key(0), nimg=jnp.zeros(()))
    return x_g, jax.value_and_grad(method.critic_loss, has_aux=True)(critic_params, inputs)

  x_g, ((loss, _), grads) = critic_phase(critic_vars['params'], emb, draws)
  assert_rel = lambda got, want, tol: np.testing.assert_array_less(
      np.max(np.abs(np.asarray(got) - want)), tol * np.max(np.abs(want)) + 1e-30)
  assert_rel(x_g, ref[f'{case}_x_g_critic'], 1e-5)
  np.testing.assert_allclose(loss, ref[f'{case}_loss_critic'], rtol=1e-5)
  _check_gradients(ref, f'{case}_grad_critic', flat(grads), full=case == 'lsg')

  # Generator phase: fresh prompts, x_g with gradient, guided teacher (κ4) and fake score (κ2 = κ3).
  gen_emb = text.embed_prompts(list(ref['generator_prompts']))
  gen_draws = {'t': jnp.asarray(ref['generator_t']), 'noise': jnp.asarray(ref['noise_generator'])}

  @jax.jit
  def generator_phase(params, gen_emb, gen_draws):
    inputs = GeneratorInputs(labels=gen_emb, real_images=None, draws=gen_draws, critic_variables=critic_vars,
                             teacher_variables=run.teacher.variables, dropout_rng=jax.random.key(0),
                             nimg=jnp.zeros(()))

    def objective(p):
      x = sampling.generate(nets.generator, {'params': p}, jnp.asarray(ref['z_generator']), gen_emb,
                            method.init_sigma)
      return method.generator_loss(x, inputs)[0], x
    return jax.value_and_grad(objective, has_aux=True)(params)

  (loss, x_g), grads = generator_phase(generator_vars['params'], gen_emb, gen_draws)
  assert_rel(x_g, ref[f'{case}_x_g_generator'], 1e-5)
  np.testing.assert_allclose(loss, ref[f'{case}_loss_generator'], rtol=1e-5)
  _check_gradients(ref, f'{case}_grad_generator', flat(grads), full=case == 'lsg')


def _check_gradients(ref, prefix, grads, full):
  """Every tensor within 1e-4 of its largest official entry (full), else its norm (1e-4 relative) and its
  projection on a fixed random direction (within 1e-4 of the norm: the projection itself may cancel)."""
  if full:
    names = sorted(k[len(prefix) + 1:] for k in ref.files if k.startswith(prefix + '/'))
    assert names == sorted(grads)
    for name in names:
      want = ref[f'{prefix}/{name}']
      err = np.max(np.abs(grads[name] - want))
      assert err <= 1e-4 * np.max(np.abs(want)), (name, err, np.max(np.abs(want)))
  else:
    ours = _projections(grads, 3)
    names = sorted(k[len(prefix) + len('_projection/'):] for k in ref.files if k.startswith(prefix + '_projection/'))
    assert names == sorted(ours)
    for name in names:
      (projection, norm), (want_projection, want_norm) = ours[name], ref[f'{prefix}_projection/{name}']
      assert abs(norm - want_norm) <= 1e-4 * want_norm + 1e-12, (name, norm, want_norm)
      assert abs(projection - want_projection) <= 1e-4 * want_norm + 1e-12, (name, projection, want_projection)
