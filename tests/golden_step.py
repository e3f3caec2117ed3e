"""Replays one official SiD/SiDA training step (`sid/*_step_io.npz` of the fixtures) through our step functions.

Everything comes from the fixture files: the teacher pickle named in the meta JSON, the hyperparameters, the
batch size, the six random draws, the batches and the stored post-update fake-score weights.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from sida_jax.losses import sid, sida
from sida_jax.losses.method import Networks
from sida_jax.formats import snapshot
from sida_jax.models.denoiser import Denoiser
from sida_jax.train import state as state_lib
from sida_jax.train import step as step_lib


def nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep=".")


class Replay:
  def __init__(self, io_path):
    self.io = np.load(io_path)
    self.meta = json.loads(io_path.with_name(io_path.name.replace("_step_io.npz", "_step_meta.json")).read_text())
    self.prefix = io_path.name.replace("_step_io.npz", "")
    self.folder = io_path.parent
    hp = self.meta["hyperparameters"]
    defaults = self.meta["loss_fn_constructor_defaults"]
    self.use_gan = bool(hp.get("use_gan", False))
    teacher_path = self.folder.parent / "edm" / self.meta["teacher_pickle"]
    net = snapshot.load_snapshot(teacher_path)
    kw = self.meta["network_kwargs"]
    self.denoiser = Denoiser(net.module, label_dim=kw.get("label_dim", 0), augment_dim=kw.get("augment_dim", 0))
    self.teacher = net.variables
    loss = dict(alpha=hp["alpha"], tmax=hp["tmax"], critic_scale=hp["loss_scaling"],
                generator_scale=hp["loss_scaling_G"], p_mean=defaults["P_mean"], p_std=defaults["P_std"],
                sigma_data=defaults["sigma_data"])
    if self.use_gan:
      loss.update(discriminator_scale=hp["loss_scaling_D"], adversarial_scale=hp["loss_scaling_G_gan"])
    config = ml_collections.ConfigDict({"loss": loss})
    nets = Networks(self.denoiser, self.denoiser, self.denoiser)
    self.method = (sida if self.use_gan else sid).make(config, nets)
    n = self.meta["batch_size"]
    image_shape = nhwc(self.io["fake_phase/z_unit"]).shape[1:]
    fake_b1, fake_b2 = hp["fake_betas"]
    g_b1, g_b2 = hp["g_betas"]
    self.spec = step_lib.StepSpec(
        method=self.method, nets=nets, batch_size=n, image_shape=image_shape, init_sigma=hp["init_sigma"],
        generator_tx=state_lib.make_optimizer(hp["glr"], g_b1, g_b2, hp["eps"]),
        critic_tx=state_lib.make_optimizer(hp["lr"], fake_b1, fake_b2, hp["eps"],
                                           clip_value=self.method.critic_grad_clip),
        ema_halflife_mimg=0.5)
    self.state = state_lib.init_state(jax.random.key(0), self.teacher, self.teacher,
                                      self.spec.generator_tx, self.spec.critic_tx)

  def batch(self, phase):
    io = self.io
    out = {}
    if f"{phase}/class_labels" in io.files and self.denoiser.label_dim:
      out["labels"] = jnp.asarray(io[f"{phase}/class_labels"])
    if f"{phase}/real_images" in io.files:
      out["images"] = jnp.asarray(nhwc(io[f"{phase}/real_images"]))
    return out

  def critic_draws(self):
    io = self.io
    return {"z": jnp.asarray(nhwc(io["fake_phase/z_unit"])),
            "sigma_normal": jnp.asarray(io["fake_phase/rnd_normal"].reshape(-1)),
            "noise": jnp.asarray(nhwc(io["fake_phase/n_unit"]))}

  def generator_draws(self):
    io = self.io
    return {"z": jnp.asarray(nhwc(io["G_phase/z_unit"])),
            "t_uniform": jnp.asarray(io["G_phase/rnd_t_unit"].reshape(-1)),
            "noise": jnp.asarray(nhwc(io["G_phase/n_unit"]))}

  def run_critic_phase(self):
    # Eager on purpose: for a network this small, compiling the phase costs more than running it.
    return step_lib.critic_phase(self.spec, self.state, self.teacher, self.batch("fake_phase"),
                                 self.critic_draws(), jax.random.key(1))

  def stored_critic(self):
    """Teacher + the stored float32 delta: the official post-Adam fake score weights, bit for bit."""
    delta = np.load(self.folder / f"{self.prefix}_fake_score_param_delta_after_step.npz")
    teacher = traverse_util.flatten_dict(jax.device_get(self.teacher["params"]))
    params = {k: (v + delta[".".join(k)]).astype(np.float32) for k, v in teacher.items()}
    params = traverse_util.unflatten_dict(params)
    return self.state.critic.replace(params=jax.tree.map(jnp.asarray, params))

  def run_generator_phase(self, step=0, term=None):
    """The generator phase at iteration `step`; `term` (a metric name) differentiates that term alone."""
    spec = self.spec
    if term is not None:
      loss_fn = spec.method.generator_loss

      def term_only(x_g, inputs):
        _, metrics = loss_fn(x_g, inputs)
        return metrics[term], metrics
      spec = dataclasses.replace(spec, method=dataclasses.replace(spec.method, generator_loss=term_only))
    state = self.state.replace(step=jnp.asarray(step, jnp.int32))
    return step_lib.generator_phase(spec, state, self.stored_critic(), self.teacher,
                                    self.batch("G_phase"), self.generator_draws(), jax.random.key(2))

  def grads(self, name):
    return dict(np.load(self.folder / f"{self.prefix}_grads_{name}.npz"))


def assert_tensors_close(ours: dict, ref: dict, rel: float, what: str):
  assert set(ours) == set(ref), f"{what}: parameter names differ: {sorted(set(ours) ^ set(ref))[:5]}"
  worst = 0.0
  for k, r in ref.items():
    scale = float(np.max(np.abs(r)))
    err = float(np.max(np.abs(np.asarray(ours[k]) - r)))
    if scale == 0.0:
      assert err == 0.0, f"{what}: {k} should have no gradient, max |ours| = {err}"
      continue
    worst = max(worst, err / scale)
    assert err <= rel * scale, f"{what}: {k} max err {err:.3g} > {rel} × {scale:.3g}"
  return worst
