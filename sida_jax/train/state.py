"""The distillation train state: one pytree with everything that changes during training.

The teacher is not in here: it is a frozen argument of the step, never donated, updated or re-saved.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
Params = Any


@flax.struct.dataclass
class TrainedNetwork:
  params: Params
  buffers: dict          # non-trainable variables ({} or {'buffers': ...})
  opt_state: optax.OptState

  @property
  def variables(self) -> dict:
    return {"params": self.params, **self.buffers}


@flax.struct.dataclass
class DistillState:
  step: Array            # iterations done
  rng: Array             # raw uint32 key data (checkpoint-friendly)
  generator: TrainedNetwork
  generator_ema: Params
  critic: TrainedNetwork  # SiD's fake score network (its encoder is SiDA's discriminator); GDD's discriminator
  nonfinite: dict        # cumulative counts of non-finite gradient elements per network
  # Progress is counted in images, so a run resumed with another batch size continues from the same kimg:
  # `step_base` is the iteration at which the current batch size took over, `nimg_base` the images before it
  # (both 0 unless the batch size changed on a resume).
  step_base: Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  nimg_base: Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))

  def nimg(self, batch_size: int) -> Array:
    """Images generated before the current iteration (float32: exact to 16.7M, ample for thresholds)."""
    return self.nimg_base.astype(jnp.float32) + (self.step - self.step_base).astype(jnp.float32) * batch_size


def split_variables(variables: dict) -> tuple:
  params = variables["params"]
  buffers = {k: v for k, v in variables.items() if k != "params"}
  return params, buffers


def nan_to_num_gradients(nan: float = 0.0, posinf: float = 1e5, neginf: float = -1e5
                         ) -> optax.GradientTransformation:
  """The official `torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5)` on every gradient."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=nan, posinf=posinf, neginf=neginf), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class AdamState(NamedTuple):
  count: Array
  mu: Any
  nu: Any


def torch_adam(learning_rate: float, beta1: float = 0.0, beta2: float = 0.999, eps: float = 1e-8
               ) -> optax.GradientTransformation:
  """Adam exactly as `torch.optim.Adam` computes it: lr·m̂ / (√v̂ + ε).

  The bias corrections 1 − βᵗ are formed as −expm1(t·ln β): computing βᵗ in float32 and subtracting from 1
  (as generic implementations do) is off by ~1e-5 relative at β2 = 0.999, where PyTorch uses float64.
  """
  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return AdamState(jnp.zeros((), jnp.int32), zeros(), zeros())

  def correction(beta, count):
    if beta == 0.0:
      return jnp.ones((), jnp.float32)
    return -jnp.expm1(count.astype(jnp.float32) * np.log(beta).astype(np.float32))

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.nu, updates)
    c1, c2 = correction(beta1, count), correction(beta2, count)
    step_size = learning_rate / c1
    root_c2 = jnp.sqrt(c2)
    new = jax.tree.map(lambda m, v: -step_size * m / (jnp.sqrt(v) / root_c2 + eps), mu, nu)
    return new, AdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(learning_rate: float, beta1: float = 0.0, beta2: float = 0.999, eps: float = 1e-8,
                   clip_value: Optional[float] = None,
                   trainable_mask: Optional[Callable[[Params], Params]] = None
                   ) -> optax.GradientTransformation:
  """nan_to_num → optional element-wise clip → Adam (PyTorch's: ε outside the square root)."""
  parts = [nan_to_num_gradients()]
  if clip_value:
    parts.append(optax.clip(clip_value))
  parts.append(torch_adam(learning_rate, beta1, beta2, eps))
  tx = optax.chain(*parts)
  if trainable_mask is not None:
    # Frozen parameters get exactly zero updates, so they stay bit-identical (GDD-I).
    label = lambda params: jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params))
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, label)
  return tx


def init_state(rng: Array, generator_variables: dict, critic_variables: dict,
               generator_tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation
               ) -> DistillState:
  """Generator and critic start from the given weights (usually copies of the teacher); EMA = generator."""
  g_params, g_buffers = split_variables(generator_variables)
  c_params, c_buffers = split_variables(critic_variables)
  # Separate copies: the state is donated, so no two leaves may share a buffer.
  g_params, g_buffers = jax.tree.map(jnp.array, (g_params, g_buffers))
  c_params, c_buffers = jax.tree.map(jnp.array, (c_params, c_buffers))
  return DistillState(
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
      generator=TrainedNetwork(g_params, g_buffers, generator_tx.init(g_params)),
      generator_ema=jax.tree.map(jnp.copy, g_params),
      critic=TrainedNetwork(c_params, c_buffers, critic_tx.init(c_params)),
      nonfinite={"generator": jnp.zeros((), jnp.int32), "critic": jnp.zeros((), jnp.int32)})


def ema_beta(nimg: Array, batch_size: int, halflife_mimg: float, rampup_ratio: Optional[float]) -> Array:
  """EDM's EMA decay: half-life in images, ramped up as min(half-life, rampup·nimg) (β=0 at step 0)."""
  halflife = jnp.asarray(halflife_mimg * 1e6, jnp.float32)
  if rampup_ratio is not None:
    halflife = jnp.minimum(halflife, nimg * rampup_ratio)
  return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def ema_update(ema: Params, params: Params, beta: Array) -> Params:
  return jax.tree.map(lambda e, p: p + beta * (e - p), ema, params)
