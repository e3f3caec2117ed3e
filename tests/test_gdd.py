"""GDD / GDD-I: the losses and the lazy R1 against the official reduction in numpy (for the teacher-feature
discriminator and for any other), the official Adam adjustment and freezing rule, frozen parameters that stay
bit-identical through the real training step, and a step that does not depend on the device count or on
gradient accumulation."""
import dataclasses
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sida_jax.losses import gdd
from sida_jax.losses import method as method_lib
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Networks
from sida_jax.models import toy
from sida_jax.models.edm import precond
from sida_jax.models.edm import unets as edm
from sida_jax.models.denoiser import Denoiser
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

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
  fake = discriminator.logits(params, teacher, inputs.x_g, inputs.labels)
  real = discriminator.logits(params, teacher, inputs.real_images, inputs.labels)
  grads = _input_gradients(lambda x: discriminator.logits(params, teacher, x, inputs.labels), inputs.real_images)
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
  logits = discriminator.logits(heads["params"], teacher, inputs.x_g, labels)
  assert [l.shape for l in logits] == [(N, 1), (N, 1)]
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
  discriminator = gdd.Discriminator(logits=lambda p, teacher, x, labels: heads.apply({"params": p}, x),
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


def test_gdd_step_does_not_depend_on_the_device_count_or_accumulation():
  """With gan_sum_size fixed, R1 (lazy, every 2nd iteration here) keeps its weight against the GAN terms
  whatever the per-device batch: one device (8 samples), eight (1 sample each) and four with two accumulation
  rounds (R1 accumulated too) give the same run."""
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
  for devices, rounds in ((1, 1), (8, 1), (4, 2)):
    mesh = step_lib.make_mesh(devices)
    train_step = step_lib.make_train_step(dataclasses.replace(spec, grad_accum=rounds), mesh)
    state = state_lib.init_state(jax.random.key(2), teacher, heads, spec.generator_tx, spec.critic_tx)
    flags = []
    for batch in batches:
      state, metrics = train_step(state, teacher, step_lib.shard_batch(batch, mesh))
      flags.append(float(metrics["critic_regularized"]))
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
  config = smoke.get_config("toy")
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
