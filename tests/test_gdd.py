"""GDD / GDD-I: the losses and the lazy R1 against the official reduction in numpy (for the teacher-feature
discriminator and for any other), the official Adam adjustment and freezing rule, frozen parameters that stay
bit-identical through the real training step, and a step that does not depend on the device count or on
gradient accumulation."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import backbone_reference as ref
from conftest import fixtures_dir
from sida_jax.losses import gdd
from sida_jax.losses import method as method_lib
from sida_jax.losses.method import CRITIC_BUFFERS, CriticInputs, GeneratorInputs, Networks
from sida_jax.models import projected_gan as pg
from sida_jax.models import toy
from sida_jax.models.backbones import torch_layers
from sida_jax.models.edm import precond
from sida_jax.models.edm import unets as edm
from sida_jax.models.denoiser import Denoiser
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib
from torch_pickles import Storage, Tensor, zip_torch_save

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (1, 1, 2)
N = 8


def _config(**loss):
  return ml_collections.ConfigDict({"loss": loss})


def _setup(label_dim=0, **loss):
  den = toy.toy_denoiser((16, 16), label_dim=label_dim)
  teacher = toy.init_toy(den, jax.random.key(0), SHAPE)
  nets = Networks(den, den, den)
  method = gdd.make(_config(**loss), nets)
  heads = method.init_critic_variables(jax.random.key(1), teacher, SHAPE)
  return nets, teacher, method, heads


def _critic_inputs(teacher, labels=None):
  return CriticInputs(x_g=jax.random.normal(jax.random.key(2), (N, *SHAPE)), augment_labels=None, labels=labels,
                      real_images=jax.random.normal(jax.random.key(3), (N, *SHAPE)), real_augment_labels=None,
                      draws={}, critic_buffers={}, teacher_variables=teacher, dropout_rng=jax.random.key(4),
                      nimg=jnp.zeros(()))


def _softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def _official_losses(fake, real, r1_grads, gamma, gain):
  """Zyriix/GDD `GDDLoss.accumulate_gradients` in numpy, on one GPU's samples: the discriminator returns a
  Python list with one 1-D tensor per (feature network, sample) — each head's [N, -1] logits concatenated —
  and every loss is Σ over that list of the tensor's mean; R1 = mean over samples of γ/2·‖∇_x Σ logits‖²,
  × gain."""
  as_list = lambda logits: [np.asarray(l, np.float64).reshape(l.shape[0], -1)[i]
                            for l in logits for i in range(l.shape[0])]
  d_gen = sum(_softplus(t).mean() for t in as_list(fake))
  d_gt = sum(_softplus(-t).mean() for t in as_list(real))
  g = sum(_softplus(-t).mean() for t in as_list(fake))
  penalty = np.sum(np.asarray(r1_grads, np.float64).reshape(len(r1_grads), -1) ** 2, axis=1)
  return d_gen + d_gt, g, np.mean(penalty * gamma / 2) * gain


def _input_gradients(logits_fn, x):
  """∇_x Σ(all logits) per sample by forward-mode derivatives along each coordinate (the losses use reverse
  mode; the heads' leaky ReLUs make finite differences unreliable)."""
  size = int(np.prod(x.shape[1:]))
  total = lambda y: sum(jnp.sum(l.reshape(l.shape[0], -1), axis=1) for l in logits_fn(y))
  columns = [jax.jvp(total, (x,), (jnp.broadcast_to(jnp.eye(size)[j].reshape(x.shape[1:]), x.shape),))[1]
             for j in range(size)]
  return np.stack([np.asarray(c) for c in columns], axis=1).reshape(x.shape)


def _check_against_official(method, discriminator, params, teacher, inputs, gamma, sum_size):
  logits_fn = lambda x: discriminator.logits({"params": params}, teacher, x, inputs.labels)[0]
  fake, real = logits_fn(inputs.x_g), logits_fn(inputs.real_images)
  grads = _input_gradients(logits_fn, inputs.real_images)
  interval = method.critic_regularizer.interval
  d_ref, g_ref, r1_ref = _official_losses(fake, real, grads, gamma, gain=interval)
  # Official sums run over one GPU's samples; ours are per-device means × gan_sum_size.
  per_sample = sum_size / N
  d_loss, d_metrics = method.critic_loss(params, inputs)
  np.testing.assert_allclose(d_loss, d_ref * per_sample, rtol=1e-5)
  assert "loss_r1" not in d_metrics                 # R1 is its own (lazy) step
  r1, _ = method.critic_regularizer.loss(params, inputs)
  np.testing.assert_allclose(r1 * interval, r1_ref, rtol=1e-5)
  assert r1 * interval > 1e-3 * d_loss / per_sample   # the comparison is not vacuous
  g_inputs = GeneratorInputs(labels=inputs.labels, real_images=None, draws={}, critic_variables={"params": params},
                             teacher_variables=teacher, dropout_rng=jax.random.key(5), nimg=jnp.zeros(()))
  g_loss, grad = jax.value_and_grad(lambda x: method.generator_loss(x, g_inputs)[0])(inputs.x_g)
  np.testing.assert_allclose(g_loss, g_ref * per_sample, rtol=1e-5)
  assert float(jnp.max(jnp.abs(grad))) > 0   # the generator is trained through the frozen features


@pytest.mark.parametrize("label_dim", [0, 3])
def test_teacher_feature_discriminator_matches_the_official_reduction(label_dim):
  gamma = 0.5
  nets, teacher, method, heads = _setup(label_dim, r1_gamma=gamma, feature_sigmas=(0.1, 1.0))
  labels = jnp.eye(3)[np.arange(N) % 3] if label_dim else None
  inputs = _critic_inputs(teacher, labels)
  hp = gdd.GDDHyper(feature_sigmas=(0.1, 1.0), r1_gamma=gamma)
  discriminator = gdd.teacher_feature_discriminator(hp, nets)
  logits, buffers = discriminator.logits(heads, teacher, inputs.x_g, labels)
  assert [l.shape for l in logits] == [(N, 1), (N, 1)] and buffers == {}
  assert method.generator_first and method.critic_regularizer.interval == 16
  _check_against_official(method, discriminator, heads["params"], teacher, inputs, gamma, sum_size=N)


class TwoNetworkHeads(nn.Module):
  """Stand-in projected discriminator: two 'feature networks' with several heads and patch logits each."""

  @nn.compact
  def __call__(self, x):
    n = x.shape[0]
    flat = x.reshape(n, -1)
    first = nn.Dense(2 * 3 * 3, name="net0")(jnp.tanh(flat)).reshape(n, 2, 3, 3)   # 2 heads of 3×3 logits
    second = nn.Dense(25 + 4, name="net1")(flat ** 2)                               # heads of 25 and 4
    return [first, second]


def test_any_discriminator_is_reduced_the_official_way():
  gamma = 0.3
  heads = TwoNetworkHeads()
  params = heads.init(jax.random.key(7), jnp.zeros((1, *SHAPE)))["params"]
  discriminator = gdd.Discriminator(logits=lambda v, teacher, x, labels, device_batch=0: (heads.apply(v, x), {}),
                                    init=lambda rng, teacher, shape: heads.init(rng, jnp.zeros((1, *shape))))
  den = toy.toy_denoiser((8,))
  sum_size = 4
  method = gdd.make(_config(r1_gamma=gamma, r1_interval=4, gan_sum_size=sum_size), Networks(den, den, den),
                    discriminator=discriminator)
  assert method.critic_regularizer.interval == 4 and method.init_critic_variables is discriminator.init
  _check_against_official(method, discriminator, params, {}, _critic_inputs({}), gamma, sum_size)


def test_lazy_r1_adjusts_the_discriminator_adam_as_the_official_loop():
  den = toy.toy_denoiser((8,))
  method = gdd.make(_config(), Networks(den, den, den))
  lr, beta2 = method_lib.lazy_adam_settings(method, 4e-5, 0.99)
  np.testing.assert_allclose([lr, beta2], [4e-5 * 16 / 17, 0.99 ** (16 / 17)], rtol=1e-12)
  assert gdd.make(_config(r1_gamma=0.0), Networks(den, den, den)).critic_regularizer is None


def test_zero_heads_give_log_two_per_feature_network_and_side():
  nets, teacher, method, heads = _setup(feature_sigmas=(0.1, 1.0, 4.0), gan_sum_size=5)
  zero = jax.tree.map(jnp.zeros_like, heads)
  inputs = _critic_inputs(teacher)
  loss, _ = method.critic_loss(zero["params"], inputs)
  np.testing.assert_allclose(loss, 5 * 3 * 2 * np.log(2.0), rtol=1e-6)   # Σ over 5 samples, 3 networks
  np.testing.assert_allclose(method.critic_regularizer.loss(zero["params"], inputs)[0], 0.0, atol=0)
  assert method.init_sigma == 80.0 and method.uses_real_images


def _expected_frozen(name):
  # The spec's list (ALGORITHMS §12.18): the two 3×3 convolutions and the attention output projection of
  # every U-Net block; everything else (norms, affine, skip, qkv, stem, aux, mapping, output) trains.
  return name.split(".")[-2] in ("conv0", "conv1", "proj")


@pytest.mark.parametrize("unet", [
    lambda: edm.SongUNet(img_resolution=8, in_channels=2, out_channels=2, model_channels=8, channel_mult=(1, 2),
                         num_blocks=1, attn_resolutions=(4,), dropout=0.0, embedding_type="fourier",
                         encoder_type="residual", decoder_type="standard", resample_filter=(1, 3, 3, 1)),
    lambda: edm.DhariwalUNet(img_resolution=8, in_channels=2, out_channels=2, model_channels=64,
                             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)],
    ids=["ncsnpp", "adm"])
def test_gdd_i_mask_freezes_exactly_the_block_convolutions(unet):
  module = precond.EDMPrecond(unet())
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)), jnp.ones((1,))))
  mask = gdd.trainable_mask(variables["params"])
  flat = {".".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(mask)}
  frozen = {k for k, trainable in flat.items() if not trainable}
  assert frozen == {k for k in flat if _expected_frozen(k)}
  assert any(".proj." in k for k in frozen) and any(k.endswith("qkv.weight") for k in flat)


class BlockNamedPrecond(nn.Module):
  """A tiny denoiser whose parameter names exercise the GDD-I rule (block/in convs and projections)."""

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, augment_labels=None, train=False, return_flag="decoder"):
    n = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,)).reshape(n, 1)
    h = jnp.concatenate([x.reshape(n, -1) / jnp.sqrt(0.25 + sigma ** 2), jnp.log(sigma) / 4], axis=1)
    h = nn.silu(nn.Dense(16, name="enc_block0_conv0")(h))
    h = nn.silu(nn.Dense(16, name="enc_block0_norm0")(h))
    h = nn.silu(nn.Dense(16, name="enc_in0_proj")(h))
    logits = jnp.mean(h, axis=1).reshape(n, 1, 1, 1)
    if return_flag == "encoder":
      return logits
    c_skip = 0.25 / (0.25 + sigma ** 2)
    c_out = sigma * 0.5 / jnp.sqrt(0.25 + sigma ** 2)
    out = (c_skip * x.reshape(n, -1) + c_out * nn.Dense(x[0].size, name="out_conv")(h)).reshape(x.shape)
    return (out, logits) if return_flag == "encoder_decoder" else out


def test_gdd_i_frozen_parameters_stay_bit_identical_through_the_step():
  den = Denoiser(BlockNamedPrecond())
  teacher = den.module.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), jnp.ones((1,)))
  nets = Networks(den, den, den)
  method = gdd.make(_config(freeze=True), nets)
  assert gdd.make(_config(), nets).generator_trainable_mask is None
  spec = step_lib.StepSpec(
      method=method, nets=nets, batch_size=N, image_shape=SHAPE, init_sigma=method.init_sigma,
      generator_tx=state_lib.make_optimizer(1e-2, 0.0, 0.99, trainable_mask=method.generator_trainable_mask),
      critic_tx=state_lib.make_optimizer(1e-2, 0.0, 0.99), ema_halflife_mimg=0.5)
  train_step = step_lib.make_train_step(spec, step_lib.make_mesh(1))
  heads = method.init_critic_variables(jax.random.key(1), teacher, SHAPE)
  state = state_lib.init_state(jax.random.key(2), teacher, heads, spec.generator_tx, spec.critic_tx)
  rng = np.random.RandomState(0)
  for _ in range(3):
    batch = {phase: {"images": rng.randn(N, *SHAPE).astype(np.float32)} for phase in ("critic", "generator")}
    state, metrics = train_step(state, teacher, batch)
  params = jax.device_get(state.generator.params)
  for name in ("enc_block0_conv0", "enc_in0_proj"):
    for leaf in ("kernel", "bias"):
      assert np.array_equal(params[name][leaf], np.asarray(teacher["params"][name][leaf])), name
  for name in ("enc_block0_norm0", "out_conv"):
    assert not np.array_equal(params[name]["kernel"], np.asarray(teacher["params"][name]["kernel"])), name
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))), state.critic.params, heads["params"])
  assert max(jax.tree.leaves(moved)) > 1e-3
  assert np.isfinite(metrics["loss_generator"]) and np.isfinite(metrics["loss_critic"])


def test_bad_feature_sigmas_are_rejected():
  den = toy.toy_denoiser((8,))
  with pytest.raises(ValueError, match="feature_sigmas"):
    gdd.make(_config(feature_sigmas=(1.0, -2.0)), Networks(den, den, den))


@pytest.mark.slow
def test_gdd_step_does_not_depend_on_the_device_count_or_accumulation():
  """With gan_sum_size fixed, R1 (lazy, every 2nd iteration here) keeps its weight against the GAN terms
  whatever the per-device batch: one device (8 samples), eight (1 sample each), four with two accumulation
  rounds (R1 accumulated too) and a mesh data=2 × fsdp=4 (parameters and Adam moments split in four) give the
  same run."""
  den = toy.toy_denoiser((16, 16))
  teacher = toy.init_toy(den, jax.random.key(0), SHAPE)
  nets = Networks(den, den, den)
  method = gdd.make(_config(r1_gamma=0.5, r1_interval=2, gan_sum_size=N, feature_sigmas=(0.1, 1.0)), nets)
  lr, beta2 = method_lib.lazy_adam_settings(method, 1e-3, 0.99)
  spec = step_lib.StepSpec(
      method=method, nets=nets, batch_size=N, image_shape=SHAPE, init_sigma=method.init_sigma,
      generator_tx=state_lib.make_optimizer(1e-3, 0.0, 0.99), critic_tx=state_lib.make_optimizer(lr, 0.0, beta2),
      ema_halflife_mimg=0.5)
  heads = method.init_critic_variables(jax.random.key(1), teacher, SHAPE)
  rng = np.random.RandomState(0)
  batches = [{phase: {"images": rng.randn(N, *SHAPE).astype(np.float32)} for phase in ("critic", "generator")}
             for _ in range(3)]
  runs = []
  for devices, fsdp, rounds in ((1, 1, 1), (8, 1, 1), (4, 1, 2), (8, 4, 1)):
    mesh = step_lib.make_mesh(devices, fsdp)
    train_step = step_lib.make_train_step(dataclasses.replace(spec, grad_accum=rounds), mesh, min_shard_size=0)
    state = state_lib.init_state(jax.random.key(2), teacher, heads, spec.generator_tx, spec.critic_tx)
    flags = []
    for batch in batches:
      state, metrics = train_step(state, teacher, step_lib.shard_batch(batch, mesh))
      flags.append(float(metrics["critic_regularized"]))
    if fsdp > 1:   # the state really is split
      assert any(x.addressable_shards[0].data.size * 4 == x.size for x in jax.tree.leaves(state.critic.params))
    runs.append(jax.device_get(state))
    assert flags == [0.0, 0.0, 1.0] and float(metrics["loss_r1"]) > 0
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for other in runs[1:]:
    assert diff(runs[0].critic.params, other.critic.params) < 1e-6
    assert diff(runs[0].generator.params, other.generator.params) < 1e-6
  assert diff(runs[0].critic.params, heads["params"]) > 1e-4
  assert diff(runs[0].generator.params, teacher["params"]) > 1e-4


def test_build_run_gives_the_discriminator_the_adjusted_adam():
  """The run assembly applies lazy_adam_settings: over 30 updates (one large gradient, then small ones, which
  exposes β2) the critic's Adam equals PyTorch's with lr·16/17 and β2^(16/17); the generator keeps the
  configured values."""
  sys.path.insert(0, str(REPO))
  from configs import smoke   # pylint: disable=import-outside-toplevel
  from sida_jax.train import run as run_lib   # pylint: disable=import-outside-toplevel
  config = smoke.get_config("ddpmpp")   # GDD's generator rewraps an EDM U-Net (GDDPrecond)
  config.method = "gdd"
  config.network.kwargs.img_channels = 1
  config.data.source, config.data.resolution = "digits", 16
  config.optim.critic_lr, config.optim.generator_lr, config.optim.beta2 = 4e-5, 2e-5, 0.99
  run = run_lib.build_run(config)
  grads = [np.array([100.0, -3.0, 1.0])] + [np.array([0.01, 0.02, -0.05])] * 29

  def last_update(tx):
    params = jnp.zeros(3)
    opt = tx.init(params)
    for g in grads:
      update, opt = tx.update(jnp.asarray(g, jnp.float32), opt, params)
    return np.asarray(update, np.float64)

  def torch_adam_last_update(lr, beta2, eps=1e-8):   # β1 = 0
    v = 0.0
    for t, g in enumerate(grads, 1):
      v = beta2 * v + (1 - beta2) * g ** 2
      update = -lr * g / (np.sqrt(v / (1 - beta2 ** t)) + eps)
    return update

  lazy = torch_adam_last_update(4e-5 * 16 / 17, 0.99 ** (16 / 17))
  np.testing.assert_allclose(last_update(run.spec.critic_tx), lazy, rtol=1e-4)
  np.testing.assert_allclose(last_update(run.spec.generator_tx), torch_adam_last_update(2e-5, 0.99), rtol=1e-4)
  assert np.all(np.abs(lazy / torch_adam_last_update(4e-5 * 16 / 17, 0.99) - 1) > 3e-3)   # β2 is visible


# ---------------------------------------------------------------------------------------------------------
# The paper's discriminator: Projected GAN heads on (reduced, random) feature networks.

RES = 32
PG_SHAPE = (RES, RES, 3)


def _backbone_weights(specs, seed=3):
  """Recipe weights (tests/backbone_reference.py) for each reduced feature network, as torchvision/timm names."""
  x = jnp.zeros((1, *PG_SHAPE))
  return {s.name: ref.recipe_state_dict(ref.template_shapes(torch_layers.variables_template(s.module, x)), seed)
          for s in specs}


def _pg_settings(batch_stat_size=0, names=("vgg16_bn", "tf_efficientnet_lite0")):
  specs = ref.reduced_specs()
  return gdd.ProjectedSettings(feature_networks=tuple(specs[n] for n in names), interp224=False, cout=8, ndf=16,
                               batch_stat_size=batch_stat_size, seed=5)


def _reference_pg(settings, label_dim, groups):
  """The model the losses must call: models/projected_gan.py (checked against the official modules in
  tests/test_projected_gan.py) with the official per-GPU batch-norm groups."""
  return pg.ProjectedDiscriminator(backbones=settings.feature_networks, resolution=RES, label_dim=label_dim,
                                   interp224=False, cout=8, ndf=16, batch_stat_groups=groups)


NO_OPT = {"xla_backend_optimization_level": 0}   # tiny graphs: compile time dominates


def _jit(fn):
  return jax.jit(fn, compiler_options=NO_OPT)


@pytest.mark.slow
def test_projected_discriminator_stages_match_the_official_reduction_and_buffer_order():
  """GDD's losses on the Projected-GAN discriminator: the official reduction of the logits of the official
  calls, in training mode with batch-norm groups of 2 (per-GPU batch), each stage's heads' buffers after its
  calls — G: one call on x_g; D: x_g, then the real batch; R1: one call on the real batch (from the same
  starting buffers here) — and R1 = mean γ/2·‖∇_x Σ logits‖² × interval."""
  n, gamma, sum_size, label_dim = 4, 0.5, 4, 10
  settings = _pg_settings(batch_stat_size=2)
  table = np.random.RandomState(0).standard_normal(pg.EMBEDDING_SHAPE).astype(np.float32)
  discriminator = gdd.projected_discriminator(settings, PG_SHAPE, label_dim, _backbone_weights(
      settings.feature_networks), table)
  den = toy.toy_denoiser((8,))
  method = gdd.make(_config(r1_gamma=gamma, r1_interval=4, gan_sum_size=sum_size), Networks(den, den, den),
                    discriminator=discriminator)
  frozen = discriminator.frozen({})
  heads = method.init_critic_variables(jax.random.key(1), {}, PG_SHAPE)
  embeds = [v for k, v in torch_layers.state_dict_from_variables(heads).items() if k.endswith("embed.weight")]
  assert len(embeds) == 8 and all(np.array_equal(e, table) for e in embeds)   # 4 heads × 2 networks
  rng = np.random.RandomState(1)
  x_g, real = (jnp.asarray(rng.uniform(-1, 1, (n, *PG_SHAPE)), jnp.float32) for _ in range(2))
  labels = jnp.eye(label_dim)[np.array([3, 7, 3, 1])]
  inputs = CriticInputs(x_g=x_g, augment_labels=None, labels=labels, real_images=real, real_augment_labels=None,
                        draws={}, critic_buffers={"buffers": heads["buffers"]}, teacher_variables=frozen,
                        dropout_rng=jax.random.key(4), nimg=jnp.zeros(()))
  g_inputs = GeneratorInputs(labels=labels, real_images=None, draws={}, critic_variables=heads,
                             teacher_variables=frozen, dropout_rng=jax.random.key(5), nimg=jnp.zeros(()))

  reference = _reference_pg(settings, label_dim, groups=2)
  raw_apply = lambda h, x: reference.apply({"features": frozen["features"], "heads": h}, x, labels, train=True)
  apply = _jit(raw_apply)
  fake_logits, after_fake = apply(heads, x_g)
  real_logits, after_real = apply({**heads, "buffers": after_fake}, real)
  r1_logits, after_r1 = apply(heads, real)
  total = lambda x: sum(jnp.sum(l) for l in raw_apply(heads, x)[0])
  r1_grads = _jit(jax.grad(total))(real)
  d_ref, g_ref, r1_ref = _official_losses(fake_logits, real_logits, r1_grads, gamma, gain=4)

  same = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  d_loss, d_metrics = _jit(method.critic_loss)(heads["params"], inputs)
  np.testing.assert_allclose(d_loss, d_ref * sum_size / n, rtol=1e-5)
  assert same(d_metrics[CRITIC_BUFFERS], {"buffers": after_real}) < 1e-6
  g_loss, g_metrics = _jit(method.generator_loss)(x_g, g_inputs)
  np.testing.assert_allclose(g_loss, g_ref * sum_size / n, rtol=1e-5)
  assert same(g_metrics[CRITIC_BUFFERS], {"buffers": after_fake}) < 1e-6
  r1, r_metrics = _jit(method.critic_regularizer.loss)(heads["params"], inputs)
  np.testing.assert_allclose(r1 * 4, r1_ref, rtol=1e-4)
  assert same(r_metrics[CRITIC_BUFFERS], {"buffers": after_r1}) < 1e-6
  # Not vacuous: the buffers move with each call, and groups of 2 are not the whole-batch statistics.
  assert same(after_fake, heads["buffers"]) > 1e-4 and same(after_real, after_fake) > 1e-4
  whole_batch = _reference_pg(settings, label_dim, groups=1)
  other, _ = _jit(lambda h, x: whole_batch.apply({"features": frozen["features"], "heads": h}, x, labels,
                                                  train=True))(heads, x_g)
  assert same(other, fake_logits) > 1e-3
  assert r1_ref > 1e-3 * d_ref


def _split_in(leaf, parts):
  """Whether a placed array is split in `parts` along one axis (each device holds 1/parts of it)."""
  return leaf.addressable_shards[0].data.size * parts == leaf.size


@pytest.mark.slow
def test_projected_gdd_step_on_a_data_by_fsdp_mesh_is_the_one_device_run():
  """The real step with the Projected-GAN heads on a mesh data=2 × fsdp=4 (heads' parameters, batch-norm
  buffers and Adam moments split in four along 'fsdp') and with the per-device defaults — batch-norm groups
  and GAN sums of `inputs.device_batch` = 16 / 8 = 2 samples, each device's own — equals one device running
  the 16 samples with both sizes fixed to 2 (8 groups), R1 included (interval 1: from the second iteration on),
  and the heads' buffers written back by the step move the same way. Adam's ε is raised to 1e-3 here: the
  biases of the convolutions in front of batch norm have an exactly-zero gradient up to rounding, which
  ε = 1e-8 would turn into ±lr steps that depend on the summation order."""
  batch = 16
  names = ("tf_efficientnet_lite0",)
  weights = _backbone_weights(_pg_settings(names=names).feature_networks)
  den = toy.toy_denoiser((16,))
  nets = Networks(den, den, den)
  teacher = toy.init_toy(den, jax.random.key(0), PG_SHAPE)

  def spec_for(group):   # group 0: the per-device micro-batch
    discriminator = gdd.projected_discriminator(_pg_settings(batch_stat_size=group, names=names), PG_SHAPE, 0,
                                                weights)
    method = gdd.make(_config(r1_gamma=0.5, r1_interval=1, gan_sum_size=group), nets, discriminator=discriminator)
    return step_lib.StepSpec(
        method=method, nets=nets, batch_size=batch, image_shape=PG_SHAPE, init_sigma=method.init_sigma,
        generator_tx=state_lib.make_optimizer(1e-3, 0.0, 0.99, 1e-3),
        critic_tx=state_lib.make_optimizer(1e-3, 0.0, 0.99, 1e-3), ema_halflife_mimg=0.5)

  one_device = spec_for(2)
  frozen = one_device.method.frozen_variables(teacher)
  assert set(frozen) == {"features"}          # the step gets the feature networks, not the teacher
  heads = one_device.method.init_critic_variables(jax.random.key(1), teacher, PG_SHAPE)
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(2):
    shared = {"images": rng.uniform(-1, 1, (batch, *PG_SHAPE)).astype(np.float32)}
    batches.append({"critic": shared, "generator": shared})
  runs = []
  for spec, devices, fsdp in ((one_device, 1, 1), (spec_for(0), 8, 4)):
    mesh = step_lib.make_mesh(devices, fsdp)
    train_step = step_lib.make_train_step(spec, mesh, min_shard_size=0)
    state = state_lib.init_state(jax.random.key(2), teacher, heads, spec.generator_tx, spec.critic_tx)
    for b in batches:
      state, metrics = train_step(state, frozen, step_lib.shard_batch(b, mesh))
    assert float(metrics["critic_regularized"]) == 1.0 and float(metrics["loss_r1"]) > 0
    if fsdp > 1:
      assert any(_split_in(x, 4) for x in jax.tree.leaves(state.critic.params))
      assert any(_split_in(x, 4) for x in jax.tree.leaves(state.critic.buffers))
    runs.append(jax.device_get(state))
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert diff(runs[0].critic.params, runs[1].critic.params) < 1e-5
  assert diff(runs[0].critic.buffers, runs[1].critic.buffers) < 1e-5
  assert diff(runs[0].generator.params, runs[1].generator.params) < 1e-5
  assert diff(runs[0].critic.buffers, {"buffers": heads["buffers"]}) > 1e-3   # the buffers did move
  assert diff(runs[0].critic.params, heads["params"]) > 1e-4


def _tensors(state_dict):
  """Arrays as the tensors of a torch.save file, one storage each (written without torch)."""
  out = {}
  for key, value in state_dict.items():
    storage = Storage(np.ascontiguousarray(value).ravel(), key=key)
    out[key] = Tensor.view_of(storage, storage.array.reshape(value.shape))
  return out


def _projected_run_config(weights_dir, label_dim=0):
  """A tiny EDM (DDPM++) teacher at 32×32×3 and GDD with the Projected-GAN discriminator on one reduced
  feature network (EfficientNet), batch 8 over the test's 8 devices, R1 every 2nd iteration."""
  from configs import smoke   # pylint: disable=import-outside-toplevel
  config = smoke.get_config("ddpmpp")
  config.method = "gdd"
  config.network.kwargs = smoke.tiny_ddpmpp(resolution=RES, channels=3, label_dim=label_dim, model_channels=8)
  config.init_sigma = 80.0
  config.dropout = 0.0
  config.optim.beta2 = 0.99
  config.loss.r1_interval, config.loss.r1_gamma, config.loss.gan_sum_size = 2, 0.1, 4
  config.gdd.discriminator, config.gdd.backbones = "projected", str(weights_dir)
  config.gdd.feature_networks = ("tf_efficientnet_lite0",)
  config.gdd.interp224, config.gdd.cout, config.gdd.ndf, config.gdd.batch_stat_size = False, 8, 16, 1
  config.data.source, config.data.resolution, config.data.channels = "mnist5k", RES, 3
  config.data.use_labels = bool(label_dim)
  config.total_kimg = 4 * config.batch_size / 1000
  config.checkpoint_every_kimg = config.log_every_kimg = 2 * config.batch_size / 1000
  config.grid_every_kimg = 0.0
  return config


@pytest.mark.slow
def test_projected_gdd_run_trains_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
  """The run assembly and loop with the paper's discriminator on a reduced EfficientNet whose weights come
  from a .pth under the release file name: 4 iterations straight equal 2 + resume + 2 bit for bit (heads,
  their buffers, optimisers, generator, EMA); the heads' buffers move; the generator is GDDPrecond
  (network.json); both phases read one data batch per iteration."""
  sys.path.insert(0, str(REPO))
  from sida_jax import checkpoint   # pylint: disable=import-outside-toplevel
  from sida_jax.train import loop   # pylint: disable=import-outside-toplevel
  from sida_jax.train import run as run_lib   # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(pg, "backbone_spec", lambda name: ref.reduced_specs()[name])
  weights = tmp_path / "weights"
  weights.mkdir()
  effnet = ref.reduced_specs()["tf_efficientnet_lite0"]
  state_dict = _backbone_weights([effnet])["tf_efficientnet_lite0"]
  zip_torch_save(_tensors(state_dict), weights / "tf_efficientnet_lite0-0aa007d2.pth")
  config = _projected_run_config(weights)

  run = run_lib.build_run(config)
  assert run.generator_class == "GDDPrecond" and run.nets.generator.module.epsilon == 0.002
  assert set(run.frozen_variables) == {"features"}
  loaded = torch_layers.state_dict_from_variables(
      {"params": run.frozen_variables["features"]["params"]["tf_efficientnet_lite0"]["backbone"]})
  np.testing.assert_array_equal(loaded["conv_stem.weight"], state_dict["conv_stem.weight"])
  batches = next(loop.Batches(run).iterate(0))
  assert batches["critic"] is batches["generator"]
  initial = jax.device_get(run_lib.initial_state(run))

  straight = jax.device_get(loop.train_and_evaluate(config, str(tmp_path / "a")))
  loop.train_and_evaluate(config, str(tmp_path / "b"), stop_after_steps=2)
  resumed = jax.device_get(loop.train_and_evaluate(config, str(tmp_path / "b")))
  assert int(straight.step) == int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  moved = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(straight.critic.buffers, initial.critic.buffers) > 1e-3    # spectral-norm u/v, running stats
  assert moved(straight.critic.params, initial.critic.params) > 1e-5
  assert moved(straight.generator.params, initial.generator.params) > 1e-5
  info = checkpoint.read_json(str(tmp_path / "a" / checkpoint.NETWORK_JSON))
  assert info["class_name"] == "GDDPrecond" and info["init_sigma"] == 80.0
  _, meta = checkpoint.restore_raw(str(tmp_path / "b" / "checkpoints"))
  assert meta["data_position"] == 4 * config.batch_size   # images read: one batch per iteration


def test_missing_feature_network_weights_fail_at_start_up(tmp_path):
  """No silent fallback: an empty folder names every file (conditional: the class embedding too) in one line;
  no folder at all says how to give one."""
  sys.path.insert(0, str(REPO))
  from sida_jax.train import run as run_lib   # pylint: disable=import-outside-toplevel
  config = _projected_run_config(tmp_path, label_dim=10)
  config.gdd.feature_networks = ("vgg16_bn", "tf_efficientnet_lite0")
  with pytest.raises(FileNotFoundError) as error:
    run_lib.build_run(config)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"missing in {tmp_path}: vgg16_bn-6c64b313.pth (")
  assert "tf_efficientnet_lite0-0aa007d2.pth" in message and "in_embeddings/tf_efficientnet_lite0.pkl" in message
  config.gdd.backbones = ""
  with pytest.raises(ValueError, match=r"config.gdd.discriminator='projected' needs config.gdd.backbones=DIR "
                                       r"holding vgg16_bn-6c64b313.pth .* \(or use config.gdd.discriminator=teacher\)"):
    run_lib.build_run(config)


def _unconditional_fixture_teacher() -> pathlib.Path:
  """A (tiny) official EDM snapshot without labels from the fixture set, found by listing it (a VE one when the
  set has one, as GDD's recipes distil VE teachers)."""
  found = []
  for kwargs_file in sorted(fixtures_dir("edm").glob("*_kwargs.json")):
    pkl = kwargs_file.with_name(kwargs_file.name[:-len("_kwargs.json")] + ".pkl")
    recorded = json.loads(kwargs_file.read_text())
    if pkl.is_file() and not recorded["init_kwargs"].get("label_dim", 0):
      found.append((not recorded["class_name"].endswith("VEPrecond"), pkl))
  if not found:
    pytest.skip("the fixture set has no unconditional EDM snapshot")
  return min(found)[1]


@pytest.mark.slow
def test_recipe_without_the_weights_stops_at_start_up_from_the_command_line(tmp_path):
  """`main.py --config configs/cifar10_uncond.py:gdd` (the paper's discriminator by default) with an empty
  weights folder: exits before training with the one-line message naming both files."""
  teacher = _unconditional_fixture_teacher()
  empty = tmp_path / "weights"
  empty.mkdir()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  recipe = str(REPO / "configs" / "cifar10_uncond.py") + ":gdd"
  out = subprocess.run([sys.executable, str(REPO / "main.py"), "--config", recipe,
                        "--workdir", str(tmp_path / "w"), f"--config.teacher={teacher}",
                        f"--config.gdd.backbones={empty}", "--config.eval_every_kimg=0"],   # no FID detector here
                       cwd=REPO, env=env, capture_output=True, text=True)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr   # one line, no traceback
  last = lines[0]
  assert last.startswith(f"main.py: error: missing in {empty}: vgg16_bn-6c64b313.pth ("), last
  assert "tf_efficientnet_lite0-0aa007d2.pth (" in last and "in_embeddings" not in last
  assert not (tmp_path / "w" / "checkpoints").exists()
