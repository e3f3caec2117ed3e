"""A 2-D mixture of Gaussians as a toy distillation problem with a closed-form teacher.

Points are "images" of shape (1, 1, 2) so every network, loss and the shared step run on them unchanged.
The mixture's exact denoiser E[x₀ | x₀ + σn] is known in closed form, which lets a small MLP teacher be
regressed onto it until it is (near-)exact, and distilled generators are judged by the energy distance to
the data and by how many samples land near each mode.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sida_jax.losses import common
from sida_jax.models.denoiser import Denoiser

Array = jax.Array
SHAPE = (1, 1, 2)


@dataclasses.dataclass(frozen=True)
class MixtureOfGaussians:
  """Equal-weight isotropic Gaussians N(μ_k, s²I) in the plane."""
  means: tuple      # ((x, y), ...)
  std: float

  @property
  def centers(self) -> Array:
    return jnp.asarray(self.means, jnp.float32)

  def sample(self, rng: Array, n: int) -> Array:
    """n points as NHWC images [n, 1, 1, 2]."""
    k_mode, k_noise = jax.random.split(rng)
    modes = jax.random.randint(k_mode, (n,), 0, len(self.means))
    points = self.centers[modes] + self.std * jax.random.normal(k_noise, (n, 2))
    return points.reshape(n, *SHAPE)

  def posterior(self, x: Array, sigma: Array) -> Array:
    """[n, K] responsibilities p(k | x₀ + σn = x)."""
    var = self.std ** 2 + jnp.reshape(sigma, (-1, 1)) ** 2
    sq = jnp.sum((x.reshape(-1, 1, 2) - self.centers[None]) ** 2, axis=-1)
    return jax.nn.softmax(-0.5 * sq / var, axis=-1)

  def denoise(self, x: Array, sigma: Array) -> Array:
    """The exact denoiser E[x₀ | x] = Σ_k p(k|x)·(μ_k + s²/(s²+σ²)·(x − μ_k)), any NHWC batch of points."""
    n = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,))
    shrink = (self.std ** 2 / (self.std ** 2 + sigma ** 2)).reshape(n, 1, 1)
    flat = x.reshape(n, 1, 2)
    per_mode = self.centers[None] + shrink * (flat - self.centers[None])
    mean = jnp.sum(self.posterior(x, sigma)[..., None] * per_mode, axis=1)
    return mean.reshape(x.shape)


def ring(num_modes: int = 8, radius: float = 1.0, std: float = 0.08) -> MixtureOfGaussians:
  """`num_modes` Gaussians evenly spaced on a circle."""
  if num_modes < 1 or std <= 0:
    raise ValueError(f"ring: need num_modes >= 1 and std > 0, got {num_modes} and {std}")
  angles = 2 * np.pi * np.arange(num_modes) / num_modes
  means = tuple((float(radius * np.cos(a)), float(radius * np.sin(a))) for a in angles)
  return MixtureOfGaussians(means, std)


def _log_uniform_sigma(rng: Array, n: int, sigma_min: float, sigma_max: float) -> Array:
  return jnp.exp(jax.random.uniform(rng, (n,), minval=np.log(sigma_min), maxval=np.log(sigma_max)))


def regression_error(mog: MixtureOfGaussians, denoiser: Denoiser, variables: dict, rng: Array, n: int,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> Array:
  """RMS of √λ(σ)·(D − D*) per coordinate at log-uniform σ: the error in the raw network's output units.

  (λ(σ)·c_out(σ)² = 1 under EDM preconditioning, so this is the error of F, whose target has unit scale.)
  """
  k_x, k_s, k_n = jax.random.split(rng, 3)
  x0 = mog.sample(k_x, n)
  sigma = _log_uniform_sigma(k_s, n, sigma_min, sigma_max)
  x = x0 + common.per_sample(sigma) * jax.random.normal(k_n, x0.shape)
  diff = denoiser(variables, x, sigma).denoised - mog.denoise(x, sigma)
  weight = common.per_sample(common.edm_weight(sigma, sigma_data))
  return jnp.sqrt(jnp.mean(weight * diff ** 2))


def train_teacher(mog: MixtureOfGaussians, denoiser: Denoiser, variables: dict, rng: Array,
                  steps: int = 2000, batch: int = 512, learning_rate: float = 3e-3,
                  sigma_min: float = 0.002, sigma_max: float = 80.0) -> dict:
  """Regresses the denoiser onto the exact one, λ(σ)‖D − D*‖² at log-uniform σ over [σ_min, σ_max].

  Regressing onto E[x₀|x] instead of x₀ (EDM's denoising loss) removes the target noise, so a small MLP
  gets close to exact in a few thousand steps. Adam with a cosine decay; one jitted scan.
  """
  params = variables["params"]
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  buffers = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(p, key):
    return regression_error(mog, denoiser, {"params": p, **buffers}, key, batch, sigma_min, sigma_max) ** 2

  def body(carry, key):
    p, opt = carry
    grads = jax.grad(loss_fn)(p, key)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), None

  @jax.jit
  def run(p, key):
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), jax.random.split(key, steps))
    return p

  return {"params": run(params, rng), **buffers}


def energy_distance(x: Array, y: Array) -> Array:
  """Energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ between two point sets (V-statistics, any leading shape)."""
  x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  y = jnp.asarray(y, jnp.float32).reshape(y.shape[0], -1)

  def mean_dist(a, b):
    sq = jnp.sum(a ** 2, 1)[:, None] + jnp.sum(b ** 2, 1)[None] - 2 * a @ b.T
    return jnp.mean(jnp.sqrt(jnp.maximum(sq, 0.0)))

  return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def mode_coverage(mog: MixtureOfGaussians, samples: Array, num_std: float = 3.0) -> Array:
  """[K] fraction of samples within `num_std` standard deviations of each mode (the ideal is ≈ 1/K)."""
  flat = jnp.asarray(samples).reshape(-1, 2)
  dist = jnp.linalg.norm(flat[:, None] - mog.centers[None], axis=-1)
  return jnp.mean(dist < num_std * mog.std, axis=0)

