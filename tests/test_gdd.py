"""GDD / GDD-I: non-saturating losses and R1 in closed form, the official freezing rule, and frozen
parameters that stay bit-identical through the real training step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sida_jax.losses import gdd
from sida_jax.losses.method import CriticInputs, GeneratorInputs, Networks
from sida_jax.models import toy
from sida_jax.models.edm import precond
from sida_jax.models.edm import unets as edm
from sida_jax.models.denoiser import Denoiser
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib

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


@pytest.mark.parametrize("label_dim", [0, 3])
def test_losses_and_r1_match_closed_forms(label_dim):
  gamma = 0.5
  nets, teacher, method, heads = _setup(label_dim, r1_gamma=gamma, feature_sigmas=(0.1, 1.0))
  labels = jnp.eye(3)[np.arange(N) % 3] if label_dim else None
  inputs = _critic_inputs(teacher, labels)
  logits_fn, _ = gdd.make_discriminator(gdd.GDDHyper(feature_sigmas=(0.1, 1.0)), nets)
  fake = logits_fn(heads["params"], teacher, inputs.x_g, labels)
  real = logits_fn(heads["params"], teacher, inputs.real_images, labels)
  assert fake.shape == (N, 2)
  # R1 from forward-mode derivatives of Σ logits along each real coordinate (the loss uses reverse mode;
  # the heads' leaky ReLUs make finite differences unreliable).
  logit_sum = lambda x: jnp.sum(logits_fn(heads["params"], teacher, x, labels), axis=1)
  penalty = np.zeros(N)
  for j in range(int(np.prod(SHAPE))):
    offset = jnp.broadcast_to(jnp.eye(int(np.prod(SHAPE)))[j].reshape(SHAPE), inputs.real_images.shape)
    penalty += np.asarray(jax.jvp(logit_sum, (inputs.real_images,), (offset,))[1], np.float64) ** 2
  loss, metrics = method.critic_loss(heads["params"], inputs)
  gan = np.mean(np.sum(_softplus(fake) + _softplus(-np.asarray(real)), axis=1))
  np.testing.assert_allclose(metrics["loss_critic"], gan, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_r1"], gamma / 2 * penalty.mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, gan + gamma / 2 * penalty.mean(), rtol=1e-4)
  assert metrics["loss_r1"] > 1e-3 * metrics["loss_critic"]
  g_inputs = GeneratorInputs(labels=labels, real_images=None, draws={}, critic_variables=heads,
                             teacher_variables=teacher, dropout_rng=jax.random.key(5), nimg=jnp.zeros(()))
  g_loss, grad = jax.value_and_grad(lambda x: method.generator_loss(x, g_inputs)[0])(inputs.x_g)
  np.testing.assert_allclose(g_loss, np.mean(np.sum(_softplus(-np.asarray(fake)), axis=1)), rtol=1e-5)
  assert float(jnp.max(jnp.abs(grad))) > 0   # the generator is trained through the frozen features


def test_zero_heads_give_log_two_per_head_and_no_r1():
  nets, teacher, method, heads = _setup(feature_sigmas=(0.1, 1.0, 4.0))
  zero = jax.tree.map(jnp.zeros_like, heads)
  loss, metrics = method.critic_loss(zero["params"], _critic_inputs(teacher))
  np.testing.assert_allclose(loss, 3 * 2 * np.log(2.0), rtol=1e-6)
  assert float(metrics["loss_r1"]) == 0.0
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
