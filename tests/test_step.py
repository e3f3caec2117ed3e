"""The shared training step: device-count and mesh invariance (data × fsdp), parameter shards, exact gradient
accumulation, gating, EMA, non-finite handling, teacher untouched, the generator-first order and the lazy critic
regulariser."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sida_jax.losses import sid, sida
from sida_jax.losses.method import CRITIC_BUFFERS, CriticInputs, LazyRegularizer, Networks
from sida_jax.models import toy
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

SHAPE = (2, 2, 2)
BATCH = 16
LABELS = 3


def _setup(module, loss_overrides=None, batch=BATCH, dropout=0.0, grad_accum=1):
  denoiser = toy.toy_denoiser((32, 32), label_dim=LABELS, dropout=dropout)
  variables = toy.init_toy(denoiser, jax.random.key(0), SHAPE)
  nets = Networks(denoiser, denoiser, denoiser)
  config = ml_collections.ConfigDict({"loss": dict(alpha=1.0, **(loss_overrides or {}))})
  method = module.make(config, nets)
  spec = step_lib.StepSpec(
      method=method, nets=nets, batch_size=batch, image_shape=SHAPE, init_sigma=2.5,
      generator_tx=state_lib.make_optimizer(1e-3),
      critic_tx=state_lib.make_optimizer(1e-3, clip_value=method.critic_grad_clip),
      ema_halflife_mimg=1e-5, grad_accum=grad_accum)
  return spec, variables


def _batches(steps, batch=BATCH, seed=0):
  rng = np.random.RandomState(seed)
  def half():
    return {"labels": np.eye(LABELS, dtype=np.float32)[rng.randint(LABELS, size=batch)],
            "images": rng.randn(batch, *SHAPE).astype(np.float32)}
  return [{"critic": half(), "generator": half()} for _ in range(steps)]


def _run(spec, variables, num_devices, steps=3, state=None, fsdp=1, min_shard_size=0, keep_placed=False):
  mesh = step_lib.make_mesh(num_devices, fsdp)
  train_step = step_lib.make_train_step(spec, mesh, min_shard_size)
  if state is None:
    state = state_lib.init_state(jax.random.key(1), variables, variables, spec.generator_tx, spec.critic_tx)
  history = []
  for batch in _batches(steps):
    state, metrics = train_step(state, variables, step_lib.shard_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return (state if keep_placed else jax.device_get(state)), history


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("module,overrides", [(sid, {}),
                                               (sida, dict(adv_pool_size=2, critic_only_kimg=0.0,
                                                           sid_only_kimg=0.0))])
def test_one_and_eight_devices_agree(module, overrides):
  spec, variables = _setup(module, overrides)
  s1, h1 = _run(spec, variables, 1)
  s8, h8 = _run(spec, variables, 8)
  for m1, m8 in zip(h1, h8):
    for key in ("loss_critic", "loss_generator"):
      np.testing.assert_allclose(m1[key], m8[key], rtol=2e-5)
  assert _max_diff(s1.generator.params, s8.generator.params) < 1e-6
  assert _max_diff(s1.critic.params, s8.critic.params) < 1e-6
  # The generator really moved (the comparison above is not vacuous).
  assert _max_diff(s1.generator.params, variables["params"]) > 1e-4


def _max_relative_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(x))), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_same_run(h1, s1, h2, s2, variables):
  for m1, m2 in zip(h1, h2):
    for key in ("loss_critic", "loss_generator"):
      np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5)
  for name in ("generator", "critic"):
    assert _max_diff(getattr(s1, name).params, getattr(s2, name).params) < 1e-6
    # Adam moments hold raw gradients (up to ~1): compared relative to each leaf's scale.
    assert _max_relative_diff(getattr(s1, name).opt_state, getattr(s2, name).opt_state) < 2e-5
  assert _max_diff(s1.generator_ema, s2.generator_ema) < 1e-6
  assert _max_diff(s1.generator.params, variables["params"]) > 1e-4


@pytest.mark.parametrize("module,overrides", [(sid, {}),
                                               (sida, dict(adv_pool_size=2, critic_only_kimg=0.0,
                                                           sid_only_kimg=0.0))])
def test_data_by_fsdp_mesh_agrees_with_one_device_and_holds_quarter_shards(module, overrides):
  """Mesh data=2 × fsdp=4 against one device, with dropout in the trained networks: the masks are drawn for
  the global batch, so they do not depend on the mesh either. Every leaf of the state (parameters, both Adam
  moments, EMA) is split in four along one axis."""
  spec, variables = _setup(module, overrides, dropout=0.2)
  s1, h1 = _run(spec, variables, 1)
  placed, h8 = _run(spec, variables, 8, fsdp=4, keep_placed=True)
  _assert_same_run(h1, s1, h8, jax.device_get(placed), variables)
  adam = next(s for s in placed.critic.opt_state if isinstance(s, state_lib.AdamState))
  trees = {"generator": placed.generator.params, "critic": placed.critic.params, "ema": placed.generator_ema,
           "adam": (adam.mu, adam.nu)}
  leaves = jax.tree.leaves(trees)
  assert len(leaves) > 20
  for leaf in leaves:
    shards = leaf.addressable_shards
    assert len(shards) == 8
    axis = [a for a, (n, m) in enumerate(zip(leaf.shape, shards[0].data.shape)) if n != m]
    assert len(axis) == 1 and shards[0].data.shape[axis[0]] * 4 == leaf.shape[axis[0]], (leaf.shape, axis)
    assert len({tuple(s.index[axis[0]].indices(leaf.shape[axis[0]])) for s in shards}) == 4


def test_dropout_really_differs_between_keys():
  """The dropout comparison above is not vacuous: the same run without dropout gives other parameters."""
  spec, variables = _setup(sid, dropout=0.2)
  plain, _ = _setup(sid)
  s_drop, _ = _run(spec, variables, 1, steps=1)
  s_plain, _ = _run(plain, variables, 1, steps=1)
  assert _max_diff(s_drop.generator.params, s_plain.generator.params) > 1e-5


@pytest.mark.parametrize("module,overrides", [(sid, {}),
                                               (sida, dict(adv_pool_size=2, critic_only_kimg=0.0,
                                                           sid_only_kimg=0.0))])
def test_gradient_accumulation_equals_one_batch(module, overrides):
  """k rounds of B/k samples give the gradient of one batch of B (the official per-round division by the
  per-device total batch): 4 rounds on one device and 2 rounds on a 2 × 4 mesh equal one round on one device,
  for SiD and for SiDA with a fixed BCE pool (pools are the same sample groups whatever k)."""
  spec, variables = _setup(module, overrides)
  s1, h1 = _run(spec, variables, 1)
  s4, h4 = _run(dataclasses.replace(spec, grad_accum=4), variables, 1)
  _assert_same_run(h1, s1, h4, s4, variables)
  s2, h2 = _run(dataclasses.replace(spec, grad_accum=2), variables, 8, fsdp=4)
  _assert_same_run(h1, s1, h2, s2, variables)


def test_sida_default_pool_is_the_per_device_micro_batch():
  """adv_pool_size = 0: the BCE pools are the official batch_gpu = batch / (devices × rounds); with 2 rounds on
  4 devices that is 2 samples, the same run as a fixed pool of 2 on one device."""
  overrides = dict(critic_only_kimg=0.0, sid_only_kimg=0.0)
  default, variables = _setup(sida, overrides, grad_accum=2)
  fixed, _ = _setup(sida, dict(overrides, adv_pool_size=2))
  s_default, h_default = _run(default, variables, 4, steps=2)
  s_fixed, h_fixed = _run(fixed, variables, 1, steps=2)
  _assert_same_run(h_fixed, s_fixed, h_default, s_default, variables)
  whole, _ = _setup(sida, overrides)   # one device, one round: a single pool of 16 is another run
  s_whole, _ = _run(whole, variables, 1, steps=2)
  assert _max_diff(s_whole.critic.params, s_fixed.critic.params) > 1e-6


def test_sida_stage_gate_and_mixture_switch_at_the_right_kimg():
  # batch 16: stage 1 while nimg <= 32 (steps 0..2), SiD-only while nimg <= 64 (steps 3..4), then mixed.
  spec, variables = _setup(sida, dict(critic_only_kimg=0.032, sid_only_kimg=0.064))
  state, history = _run(spec, variables, 1, steps=6)
  updated = [m["generator_updated"] for m in history]
  assert updated == [0, 0, 0, 1, 1, 1]
  for m, nimg in zip(history, range(0, 6 * BATCH, BATCH)):
    expected = (0.5 * m["loss_generator_sid"] + 0.5 * m["loss_generator_gan"] if nimg > 64
                else m["loss_generator_sid"])
    np.testing.assert_allclose(m["loss_generator"], expected, rtol=1e-6)
  # During stage 1 the generator parameters stay exactly at their initial values.
  s3, _ = _run(spec, variables, 1, steps=3)
  assert _max_diff(s3.generator.params, variables["params"]) == 0.0


def test_ema_first_step_copies_generator_then_follows_closed_form():
  spec, variables = _setup(sid)
  s1, h = _run(spec, variables, 1, steps=1)
  assert h[0]["ema_beta"] == 0.0
  assert _max_diff(s1.generator_ema, s1.generator.params) == 0.0
  s2, h = _run(spec, variables, 1, steps=1, state=s1)
  halflife = min(1e-5 * 1e6, BATCH * 0.05)  # pre-step nimg = one batch
  beta = 0.5 ** (BATCH / halflife)
  np.testing.assert_allclose(h[0]["ema_beta"], beta, rtol=1e-6)
  expected = jax.tree.map(lambda e, p: p + beta * (e - p), s1.generator_ema, s2.generator.params)
  assert _max_diff(s2.generator_ema, expected) < 1e-6


def test_teacher_is_not_modified_or_donated():
  spec, variables = _setup(sid)
  before = jax.tree.map(np.array, variables)
  _run(spec, variables, 1, steps=2)
  assert _max_diff(before, variables) == 0.0   # still readable, hence not donated


def test_step_is_compiled_once_before_its_first_run_then_host_memory_is_released(monkeypatch, compile_events):
  """The first call compiles ahead and returns the compiler's freed memory before running; the jit reuses
  that executable (no second compile, no cache lookup), and later calls compile nothing."""
  events = compile_events
  monkeypatch.setattr(step_lib.host_memory, "release", lambda: events.append("release") or True)
  spec, variables = _setup(sid, loss_overrides={"tmax": 7.0}, batch=12)   # a program no other test compiles
  mesh = step_lib.make_mesh(1)
  train_step = step_lib.make_train_step(spec, mesh)
  state, variables, _ = train_step.place(
      state_lib.init_state(jax.random.key(1), variables, variables, spec.generator_tx, spec.critic_tx),
      variables, None)
  batches = [step_lib.shard_batch(b, mesh) for b in _batches(3, batch=12)]
  del events[:]
  for batch in batches:
    state, _ = train_step(state, variables, batch)
  assert events.count("release") == 1
  release = events.index("release")
  compiles = events[:release].count("/jax/core/compile/backend_compile_duration")
  assert compiles == 1                                # the step's one compile (or cache load), then the release
  assert not events[release + 1:]                     # and no compile or cache lookup after it


def test_nan_to_num_then_clip_then_adam():
  grads = {"a": jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5, -3.0])}
  params = {"a": jnp.zeros(5)}
  tx = state_lib.make_optimizer(1e-2, clip_value=1.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step with β1 = 0: −lr·g/(|g| + ε) on the cleaned, clipped gradient [0, 1, −1, 0.5, −1].
  cleaned = np.array([0.0, 1.0, -1.0, 0.5, -1.0])
  np.testing.assert_allclose(updates["a"], -1e-2 * cleaned / (np.abs(cleaned) + 1e-8), rtol=1e-6)


def test_frozen_mask_keeps_parameters_bit_identical():
  params = {"frozen": jnp.ones(3), "free": jnp.ones(3)}
  tx = state_lib.make_optimizer(1e-2, trainable_mask=lambda p: {"frozen": False, "free": True})
  updates, _ = tx.update({"frozen": jnp.ones(3), "free": jnp.ones(3)}, tx.init(params), params)
  assert np.all(np.asarray(updates["frozen"]) == 0.0)
  assert np.all(np.asarray(updates["free"]) != 0.0)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  spec, _ = _setup(sid, batch=12)
  with pytest.raises(ValueError, match="not divisible"):
    step_lib.make_train_step(spec, step_lib.make_mesh(8))
  spec, _ = _setup(sid, batch=8, grad_accum=2)
  with pytest.raises(ValueError, match="8 devices of the mesh × 2 accumulation rounds"):
    step_lib.make_train_step(spec, step_lib.make_mesh(8))


def test_torch_adam_matches_a_float64_reference_over_steps():
  rng = np.random.RandomState(0)
  grads = [rng.randn(50).astype(np.float32) for _ in range(5)]
  for beta1 in (0.0, 0.9):
    tx = state_lib.torch_adam(1e-3, beta1, 0.999, 1e-8)
    params = jnp.zeros(50)
    opt = tx.init(params)
    m = v = np.zeros(50)
    ref = np.zeros(50)
    for t, g in enumerate(grads, 1):
      upd, opt = tx.update(jnp.asarray(g), opt)
      params = params + upd
      m = beta1 * m + (1 - beta1) * g
      v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
      ref = ref - 1e-3 / (1 - beta1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** t) + 1e-8)
    np.testing.assert_allclose(np.asarray(params), ref, rtol=2e-6, atol=1e-9)


def test_edm2_forced_weight_normalisation_applies_to_trained_networks_only():
  """With lr = 0 the step leaves exactly the projection: generator and critic weights become
  force_normalize(teacher) (the official in-place overwrite), the teacher stays as it was."""
  from sida_jax.models import convert, denoiser_for, registry
  from sida_jax.models.edm2 import networks as edm2
  kwargs = dict(img_resolution=8, img_channels=4, label_dim=0, model_channels=16, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], dropout=0.0)
  module = registry.build_network("Precond", kwargs)
  teacher = convert.init_variables(module, jax.random.key(0))
  # Perturb so that the weights are far from unit norm (as a trained teacher's are).
  teacher = {**teacher, "params": jax.tree.map(lambda w: w * 3.0, teacher["params"])}
  denoiser = denoiser_for(module, "Precond", kwargs)
  nets = Networks(denoiser, denoiser, denoiser)
  method = sid.make(ml_collections.ConfigDict({"loss": dict(alpha=1.0)}), nets)
  tx = state_lib.make_optimizer(0.0)
  spec = step_lib.StepSpec(method=method, nets=nets, batch_size=8, image_shape=(8, 8, 4), init_sigma=2.5,
                           generator_tx=tx, critic_tx=tx, ema_halflife_mimg=0.5,
                           generator_train_transform=edm2.force_normalize,
                           critic_train_transform=edm2.force_normalize)
  before = jax.tree.map(np.array, teacher)
  state = state_lib.init_state(jax.random.key(1), teacher, teacher, tx, tx)
  mesh = step_lib.make_mesh(1)
  state, _ = step_lib.make_train_step(spec, mesh)(state, teacher, step_lib.shard_batch(
      {"critic": {}, "generator": {}}, mesh))
  projected = edm2.force_normalize(before["params"])
  # Same projection inside and outside jit: equal up to float rounding of the fused kernels.
  assert _max_diff(state.generator.params, projected) < 1e-5
  assert _max_diff(state.critic.params, projected) < 1e-5
  assert _max_diff(teacher, before) == 0.0
  assert _max_diff(projected, before["params"]) > 0.1      # the projection did change the weights
  # EMA (β = 0 at step 0) copies the projected generator; it is never projected itself afterwards.
  assert _max_diff(state.generator_ema, state.generator.params) == 0.0


def _adam_count(opt_state):
  return int(next(s for s in opt_state if isinstance(s, state_lib.AdamState)).count)


def test_generator_first_and_lazy_regularizer_run_in_the_official_gdd_order():
  """generator_first: the generator steps against the previous critic, then the critic steps on samples of the
  new generator; a lazy regulariser (interval 2) adds one more critic Adam step on 2 × its loss at iterations
  2 and 4, never at 0. Reference: the phases composed by hand in that order, outside the jitted step."""
  spec, variables = _setup(sid)

  def regularizer_loss(params, inputs):   # depends on params, the un-augmented real batch and its labels
    scale = jnp.mean(inputs.real_images ** 2) + jnp.mean(inputs.labels)
    loss = scale * sum(jnp.mean(p ** 2) for p in jax.tree.leaves(params))
    return loss, {"loss_reg": loss}

  regularizer = LazyRegularizer(loss=regularizer_loss, interval=2)
  method = dataclasses.replace(spec.method, generator_first=True, critic_regularizer=regularizer)
  spec = dataclasses.replace(spec, method=method)
  mesh = step_lib.make_mesh(1)
  train_step = step_lib.make_train_step(spec, mesh)
  state = state_lib.init_state(jax.random.key(1), variables, variables, spec.generator_tx, spec.critic_tx)
  flags, counts = [], []
  for t, batch in enumerate(_batches(5)):
    before = jax.device_get(state)
    state, metrics = train_step(state, variables, step_lib.shard_batch(batch, mesh))
    flags.append(float(metrics["critic_regularized"]))
    counts.append(_adam_count(state.critic.opt_state))
    if t not in (1, 2):
      continue
    draws = step_lib.sample_draws(spec, step_lib.iteration_key(before, 0))
    k_critic, k_gen = jax.random.split(step_lib.iteration_key(before, 1))
    generator = step_lib.generator_phase(spec, before, before.critic, variables, batch["generator"],
                                         draws["generator"], k_gen)[0]
    critic = step_lib.critic_phase(spec, before.replace(generator=generator), variables, batch["critic"],
                                   draws["critic"], k_critic)[0]
    if t == 2:
      inputs = CriticInputs(x_g=None, augment_labels=None, labels=batch["critic"]["labels"],
                            real_images=batch["critic"]["images"], real_augment_labels=None, draws={},
                            critic_buffers={}, teacher_variables=variables, dropout_rng=k_critic, nimg=0.0)
      grads = jax.grad(lambda p: 2 * regularizer_loss(p, inputs)[0])(critic.params)
      updates, opt_state = spec.critic_tx.update(grads, critic.opt_state, critic.params)
      critic = critic.replace(params=optax.apply_updates(critic.params, updates), opt_state=opt_state)
    assert _max_diff(state.generator.params, generator.params) < 1e-6
    assert _max_diff(state.critic.params, critic.params) < 1e-6
    # Not vacuous: the SiD order (critic first) would give another generator.
    critic_first = step_lib.critic_phase(spec, before, variables, batch["critic"], draws["critic"], k_critic)[0]
    other = step_lib.generator_phase(spec, before, critic_first, variables, batch["generator"],
                                     draws["generator"], k_gen)[0]
    assert _max_diff(other.params, generator.params) > 1e-5
  assert flags == [0.0, 0.0, 1.0, 0.0, 1.0]
  assert counts == [1, 2, 4, 5, 7]
  assert float(metrics["loss_reg"]) > 0


def test_critic_buffers_returned_by_the_losses_are_written_back_in_call_order():
  """A critic with non-trainable state (as GDD's heads): each loss returns the buffers after its calls under
  CRITIC_BUFFERS, and the step writes them back in the order the phases run — generator first, then critic,
  then the lazy regulariser (interval 2) — averaged over devices, and drops them from the metrics. `log`
  appends one digit per call (1 critic, 2 generator, 3 regulariser); `mean` is a running mean of each device's
  real images (averaging over devices gives the one-device value)."""
  spec, variables = _setup(sid)

  def with_call(buffers, digit, real=None):
    new = {"log": buffers["buffers"]["log"] * 10 + digit, "mean": buffers["buffers"]["mean"]}
    if real is not None:
      new["mean"] = 0.5 * new["mean"] + 0.5 * jnp.mean(real)
    return {"buffers": new}

  def critic_loss(params, inputs):
    loss = params["w"] ** 2 * jnp.mean(inputs.x_g ** 2)
    return loss, {"loss_critic": loss, CRITIC_BUFFERS: with_call(inputs.critic_buffers, 1, inputs.real_images)}

  def generator_loss(x_g, inputs):
    loss = inputs.critic_variables["params"]["w"] * jnp.mean(x_g ** 2)
    return loss, {"loss_generator": loss, CRITIC_BUFFERS: with_call(inputs.critic_variables, 2)}

  def regularizer_loss(params, inputs):
    loss = jnp.mean(params["w"] ** 2)
    return loss, {"loss_reg": loss, CRITIC_BUFFERS: with_call(inputs.critic_buffers, 3)}

  method = dataclasses.replace(spec.method, critic_loss=critic_loss, generator_loss=generator_loss,
                               uses_real_images=True, generator_first=True,
                               critic_regularizer=LazyRegularizer(regularizer_loss, 2))
  spec = dataclasses.replace(spec, method=method)
  critic = {"params": {"w": jnp.ones(())}, "buffers": {"log": jnp.zeros(()), "mean": jnp.zeros(())}}
  states = {}
  for devices in (1, 2):
    state = state_lib.init_state(jax.random.key(1), variables, critic, spec.generator_tx, spec.critic_tx)
    states[devices], history = _run(spec, variables, devices, steps=3, state=state)
    assert all(CRITIC_BUFFERS not in metrics for metrics in history)
  expected_mean = 0.0
  for batch in _batches(3):
    expected_mean = 0.5 * expected_mean + 0.5 * batch["critic"]["images"].astype(np.float64).mean()
  for state in states.values():
    assert float(state.critic.buffers["buffers"]["log"]) == 2121213.0
    np.testing.assert_allclose(state.critic.buffers["buffers"]["mean"], expected_mean, rtol=1e-5)
  assert _max_diff(states[1].critic, states[2].critic) < 1e-6
