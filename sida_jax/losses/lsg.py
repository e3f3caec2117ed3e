"""SiD-LSG: SiD with long and short classifier-free guidance ([002] eq. 6–9, the official SiD-LSG loop).

Guidance of a denoiser at scale κ: f_κ(x; σ, c) = f(x; σ, ∅) + κ·(f(x; σ, c) − f(x; σ, ∅)) (at κ = 1 only the
conditional pass runs, as in the official code). Four insertion points:
    κ1  the fake score network's own denoising loss λ(σ)‖f_ψ,κ1(y + σn) − y‖² (ψ-step);
    κ2  f_ψ inside the score difference, κ3  f_ψ inside the data term, κ4  the teacher, of the generator loss
        ℓ = (f_φ,κ4 − f_ψ,κ2)·((f_φ,κ4 − x_g) − α(f_φ,κ4 − f_ψ,κ3)) / w,  w = sg(mean|x_g − f_φ,κ4|)
        (α = 1 gives [002] eq. 8, (f_φ,κ4 − f_ψ,κ2)ᵀ(f_ψ,κ3 − x_g)/w; the official code has κ2 = κ3).
When κ1, κ2 or κ3 differs from 1, each critic-phase label is replaced by the null label with probability
0.1, so that ψ learns the unconditional branch it is evaluated on; the generator phase never drops labels.
All κ = 1 is SiD exactly.

Text-to-image teachers (Stable Diffusion) are DDPM-form ε-prediction networks at integer times; wrapped as EDM
denoisers (`models/t2i/ddpm.py`) they run in this same loss, given their σ grid (`make(..., sigma_grid=σ_t)`),
as the official SiD-LSG code trains them ([002] eq. 7–9, ALGORITHMS.md §5.4, §12.17):
  * both phases draw integer t ~ U{timestep_min, …, timestep_max} = U{20, …, 979} and use σ = σ_t
    (x_t = a_t x_g + s_t n is a_t·(x_g + σ_t n): the same point in EDM form);
  * the fake score is trained on the plain ε-MSE ‖ε_ψ,κ1 − n‖² = ‖f_ψ,κ1 − y‖²/σ_t² (EDM's λ(σ) becomes 1/σ²);
  * the generator loss is SiD's term on x0-predictions with α = 1 and w = mean|x_g − f_φ,κ4| = ‖·‖₁/C, which is
    eq. 8 with ω of eq. 9 (a_t²/σ_t⁴·ω = C/‖x_g − f_φ,κ4‖₁);
  * the generator is the x0-prediction at t_init = 625 from √(1 − ᾱ_625)·z, i.e. D(σ_625 z; σ_625)
    (`Method.init_sigma`).

The null label is a function of the batch's labels: zero one-hot by default (EDM's convention for class-
conditional networks), or the empty prompt's embedding for a text-conditional denoiser wrapped with
`embedding_denoiser` (pass `null_condition=embedding_null_condition(empty_embedding)` to `make`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sida_jax.losses import common, sid
from sida_jax.losses.method import CriticInputs, DrawFn, GeneratorInputs, Method, Networks
from sida_jax.models.denoiser import Denoiser

Array = jax.Array
NullCondition = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class LSGHyper(sid.SiDHyper):
  alpha: float = 1.0                # [002]
  generator_scale: float = 1.0      # λ_sid of the official SiD-LSG code
  kappa1: float = 2.0               # LSG: all four equal; 2 is the official script's default
  kappa2: float = 2.0
  kappa3: float = 2.0
  kappa4: float = 2.0
  null_label_rate: float = 0.1
  # DDPM-form (text-to-image) teachers: integer times, inclusive bounds ([002]: 20, 979), and t_init.
  timestep_min: int = 20
  timestep_max: int = 979
  init_timestep: int = 625

  @property
  def drops_labels(self) -> bool:
    return self.kappa1 != 1 or self.kappa2 != 1 or self.kappa3 != 1

  @property
  def guided(self) -> bool:
    return any(k != 1 for k in (self.kappa1, self.kappa2, self.kappa3, self.kappa4))


def zero_condition(labels: Array) -> Array:
  """The null class label of EDM-style conditional networks: an all-zero one-hot row."""
  return jnp.zeros_like(labels)


def embedding_null_condition(null_embedding: Array) -> NullCondition:
  """The null condition of a text-conditional denoiser: the empty prompt's embedding, for every sample."""
  null = jnp.asarray(null_embedding, jnp.float32)
  return lambda labels: jnp.broadcast_to(null, labels.shape).astype(labels.dtype)


@dataclasses.dataclass(frozen=True)
class _EmbeddingModule:
  """Presents a plain function (variables, x, σ, embedding) -> D as the `apply` a Denoiser calls."""
  apply_fn: Callable

  def apply(self, variables, x, sigma, embedding, *, rngs=None, train=False, return_flag="decoder"):
    del rngs, train
    if return_flag != "decoder":
      raise ValueError(f"embedding denoiser: return_flag {return_flag!r} unsupported (only 'decoder')")
    return self.apply_fn(variables, x, sigma, embedding)


def embedding_denoiser(apply_fn: Callable, embedding_dim: int) -> Denoiser:
  """Wraps a text-conditional denoiser `apply_fn(variables, x, σ, embedding) -> D` (EDM form, no dropout).

  The batch's `labels` then carry the prompt embeddings ([N, ..., embedding_dim]); `embedding_dim` only
  marks the network as conditional.
  """
  if embedding_dim <= 0:
    raise ValueError(f"embedding_denoiser: embedding_dim must be positive, got {embedding_dim}")
  return Denoiser(_EmbeddingModule(apply_fn), label_dim=embedding_dim, accepts_augment_labels=False)


def guided_outputs(net: Denoiser, variables: dict, x: Array, sigma: Array, labels: Optional[Array],
                   null_condition: NullCondition, scales: tuple, augment_labels: Optional[Array] = None,
                   *, train: bool = False, rng: Optional[Array] = None) -> tuple:
  """f_κ for every κ in `scales`, from one conditional pass and (if some κ ≠ 1) one unconditional pass.

  Both passes run as one batch [∅; c] like the official code, so dropout masks differ between them.
  """
  if all(k == 1 for k in scales):
    out = net(variables, x, sigma, labels, augment_labels, train=train, rng=rng).denoised
    return tuple(out for _ in scales)
  if labels is None:
    raise ValueError("lsg: guidance scales other than 1 need class labels or embeddings")
  n = x.shape[0]
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,))
  twice = lambda a: None if a is None else jnp.concatenate([a, a])
  both = net(variables, twice(x), twice(sigma), jnp.concatenate([null_condition(labels), labels]),
             twice(augment_labels), train=train, rng=rng).denoised
  uncond, cond = both[:n], both[n:]
  return tuple(cond if k == 1 else uncond + k * (cond - uncond) for k in scales)


@dataclasses.dataclass(frozen=True)
class NoiseLevels:
  """Where the two phases evaluate the networks: their random draws, σ as a function of those draws, and the
  fake-score loss weight λ(σ)."""
  critic_draws: DrawFn
  generator_draws: DrawFn
  critic_sigma: Callable[[dict], Array]
  generator_sigma: Callable[[dict], Array]
  critic_weight: Callable[[Array], Array]
  init_sigma: Optional[float] = None   # the generator's input level, when the levels prescribe one


def critic_draws(rng: Array, batch: int, image_shape: tuple) -> dict:
  k_sid, k_null = jax.random.split(rng)
  return dict(sid.critic_draws(k_sid, batch, image_shape), null_uniform=jax.random.uniform(k_null, (batch,)))


def edm_levels(hp: LSGHyper) -> NoiseLevels:
  """EDM teachers: SiD's log-normal σ for the fake score, the t_max schedule for the generator, EDM's λ(σ)."""
  return NoiseLevels(critic_draws=critic_draws, generator_draws=sid.generator_draws,
                     critic_sigma=lambda draws: sid.critic_sigma(hp, draws),
                     generator_sigma=lambda draws: sid.generator_sigma(hp, draws),
                     critic_weight=lambda sigma: common.edm_weight(sigma, hp.sigma_data))


def discrete_levels(hp: LSGHyper, sigma_grid) -> NoiseLevels:
  """DDPM-form teachers: integer t ~ U{timestep_min, …, timestep_max} in both phases, σ = σ_t of the grid,
  the ε-MSE weight 1/σ², and the generator at σ_{init_timestep}."""
  grid = np.asarray(sigma_grid, np.float32)
  for name in ("timestep_min", "timestep_max", "init_timestep"):
    if not 0 <= getattr(hp, name) < grid.size:
      raise ValueError(f"lsg: {name}={getattr(hp, name)} is outside the teacher's {grid.size} timesteps")
  if hp.timestep_min > hp.timestep_max:
    raise ValueError(f"lsg: timestep_min={hp.timestep_min} > timestep_max={hp.timestep_max}")

  def times(rng, batch):
    return jax.random.randint(rng, (batch,), hp.timestep_min, hp.timestep_max + 1)

  def critic(rng, batch, image_shape):
    k_t, k_noise, k_null = jax.random.split(rng, 3)
    return dict(t=times(k_t, batch), noise=jax.random.normal(k_noise, (batch, *image_shape)),
                null_uniform=jax.random.uniform(k_null, (batch,)))

  def generator(rng, batch, image_shape):
    k_t, k_noise = jax.random.split(rng)
    return dict(t=times(k_t, batch), noise=jax.random.normal(k_noise, (batch, *image_shape)))

  sigma_of = lambda draws: jnp.asarray(grid)[draws["t"]]
  return NoiseLevels(critic_draws=critic, generator_draws=generator, critic_sigma=sigma_of,
                     generator_sigma=sigma_of, critic_weight=lambda sigma: 1.0 / sigma ** 2,
                     init_sigma=float(grid[hp.init_timestep]))


def critic_labels(hp: LSGHyper, null_condition: NullCondition, labels: Optional[Array], draws: dict):
  """The critic phase's labels: each replaced by the null label with probability `null_label_rate`.

  Idempotent for given draws, so applying it again (the step before generating, the loss after) is safe.
  """
  if labels is None or not hp.drops_labels:
    return labels
  drop = draws["null_uniform"] < hp.null_label_rate
  return jnp.where(drop.reshape((-1,) + (1,) * (labels.ndim - 1)), null_condition(labels), labels)


def make_critic_loss(hp: LSGHyper, nets: Networks, null_condition: NullCondition, levels: NoiseLevels):
  def critic_loss(params, inputs: CriticInputs):
    sigma = levels.critic_sigma(inputs.draws)
    y = inputs.x_g
    labels = critic_labels(hp, null_condition, inputs.labels, inputs.draws)
    (denoised,) = guided_outputs(nets.critic, {"params": params, **inputs.critic_buffers},
                                 y + common.per_sample(sigma) * inputs.draws["noise"], sigma, labels,
                                 null_condition, (hp.kappa1,), inputs.augment_labels, train=True,
                                 rng=inputs.dropout_rng)
    terms = common.per_sample(levels.critic_weight(sigma)) * (denoised - y) ** 2
    keep = common.finite_samples(y, denoised)
    loss = common.masked_sum(terms, keep) * hp.critic_scale / y.shape[0]
    return loss, {"loss_critic": loss}
  return critic_loss


def guided_sid_terms(hp: LSGHyper, x_g: Array, teacher: Array, critic_diff: Array, critic_data: Array) -> tuple:
  """Per-element (f_φ − f_ψ,κ2)·((f_φ − x_g) − α(f_φ − f_ψ,κ3))/w and w (f_φ already guided with κ4).

  With κ2 = κ3 this is `sid.sid_terms`, which the generator loss then calls instead.
  """
  w = common.sid_weight_factor(x_g, teacher)
  return (teacher - critic_diff) * ((teacher - x_g) - hp.alpha * (teacher - critic_data)) / w, w


def make_generator_loss(hp: LSGHyper, nets: Networks, null_condition: NullCondition, levels: NoiseLevels):
  def generator_loss(x_g: Array, inputs: GeneratorInputs):
    sigma = levels.generator_sigma(inputs.draws)
    x_t = x_g + common.per_sample(sigma) * inputs.draws["noise"]
    n = x_g.shape[0]
    (teacher,) = guided_outputs(nets.teacher, inputs.teacher_variables, x_t, sigma, inputs.labels,
                                null_condition, (hp.kappa4,), nets.teacher.zero_augment_labels(n))
    critic = guided_outputs(nets.critic, inputs.critic_variables, x_t, sigma, inputs.labels, null_condition,
                            (hp.kappa2,) if hp.kappa2 == hp.kappa3 else (hp.kappa2, hp.kappa3),
                            nets.critic.zero_augment_labels(n))
    if len(critic) == 1:   # κ2 = κ3 (always, in the official code): SiD's own terms
      terms, w = sid.sid_terms(hp, x_g, teacher, critic[0])
    else:
      terms, w = guided_sid_terms(hp, x_g, teacher, *critic)
    keep = common.finite_samples(x_g, teacher, *critic)
    loss = common.masked_sum(terms, keep) * hp.generator_scale / n
    return loss, {"loss_generator": loss, "sid_weight_factor": jnp.mean(w)}
  return generator_loss


def make(config: ml_collections.ConfigDict, nets: Networks,
         null_condition: NullCondition = zero_condition, sigma_grid=None) -> Method:
  """SiD-LSG on EDM-form networks; with `sigma_grid` (σ_t of a DDPM teacher's integer times) in the
  official text-to-image form (module docstring)."""
  hp = LSGHyper.from_config(config.loss)
  if hp.use_logvar:
    raise ValueError("lsg: use_logvar is not supported (guidance of a log-variance head is undefined)")
  if hp.guided and not (nets.teacher.label_dim and nets.critic.label_dim):
    raise ValueError("lsg: guidance scales other than 1 need conditional teacher and critic networks")
  if not 0 <= hp.null_label_rate <= 1:
    raise ValueError(f"lsg: null_label_rate must be in [0, 1], got {hp.null_label_rate}")
  levels = edm_levels(hp) if sigma_grid is None else discrete_levels(hp, sigma_grid)
  return Method(critic_loss=make_critic_loss(hp, nets, null_condition, levels),
                generator_loss=make_generator_loss(hp, nets, null_condition, levels),
                critic_draws=levels.critic_draws, generator_draws=levels.generator_draws,
                critic_labels=lambda labels, draws: critic_labels(hp, null_condition, labels, draws),
                init_sigma=levels.init_sigma)
