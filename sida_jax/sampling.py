"""Generation: the one-step generator, EDM's Heun sampler for teachers, and EDM-style per-image seeds."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sida_jax import torch_random
from sida_jax.models.denoiser import Denoiser

Array = jax.Array


def generate(generator: Denoiser, variables: dict, z: Array, labels: Optional[Array], init_sigma: float,
             *, train: bool = False, rng: Optional[Array] = None) -> Array:
  """x_g = G(σ_init·z; σ_init, c) with zero augment labels: the one-step generator of SiD and friends."""
  n = z.shape[0]
  sigma = jnp.full((n,), init_sigma, jnp.float32)
  out = generator(variables, init_sigma * z, sigma, labels, generator.zero_augment_labels(n),
                  train=train, rng=rng)
  return out.denoised


class with_weights:  # pylint: disable=invalid-name  (used as a function)
  """`sampler(variables, z, labels)` as a jitted `(z, labels) -> images` that takes the weights as an argument,
  placed on the device once: closing over them instead would bake them into the program as constants, which
  XLA then copies and folds (more compile time and host memory, and no sharing between networks)."""

  def __init__(self, sampler: Callable[[dict, Array, Optional[Array]], Array], variables: dict):
    self.jitted = jax.jit(sampler)
    self.variables = jax.device_put(variables)

  def __call__(self, z: Array, labels: Optional[Array]) -> Array:
    return self.jitted(self.variables, z, labels)


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> np.ndarray:
  """EDM's time discretisation t_0 = σ_max > … > t_{N−1} = σ_min, followed by t_N = 0 (float64)."""
  i = np.arange(num_steps, dtype=np.float64)
  t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  return np.concatenate([t, [0.0]])


def heun_sample(denoiser: Denoiser, variables: dict, latents: Array, labels: Optional[Array] = None,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"), s_noise: float = 1.0,
                rng: Optional[Array] = None, unroll: bool = True) -> Array:
  """EDM's deterministic (or stochastic, with churn) 2nd-order Heun sampler; NFE = 2·num_steps − 1.

  `latents` are unit normals; the first state is latents·t_0. The last step is plain Euler to σ = 0.
  Stochastic churn needs `rng`. `unroll=True` (default) unrolls the steps: slow to compile (the network
  appears 2·num_steps − 1 times) but on XLA:CPU ~3× faster to run than a rolled loop, whose body runs
  ~10× slower per network call than the same call outside a loop (measured, smoke net). `unroll=False`
  compiles in seconds (quick looks, tests).
  """
  gamma_max = min(s_churn / num_steps, np.sqrt(2) - 1)
  if gamma_max > 0 and rng is None:
    raise ValueError("heun_sample with s_churn > 0 needs an rng")
  steps = jnp.asarray(edm_sigma_steps(num_steps, sigma_min, sigma_max, rho), jnp.float32)
  n = latents.shape[0]
  zeros = denoiser.zero_augment_labels(n)

  def denoise(x, t):
    return denoiser(variables, x, jnp.full((n,), t, jnp.float32), labels, zeros).denoised

  def heun_step(i, carry, second_order: bool):
    x_cur, key = carry
    t_cur, t_next = steps[i], steps[i + 1]
    if gamma_max > 0:
      gamma = jnp.where((s_min <= t_cur) & (t_cur <= s_max), gamma_max, 0.0)
      t_hat = t_cur + gamma * t_cur
      key, sub = jax.random.split(key)
      x_hat = x_cur + jnp.sqrt(t_hat ** 2 - t_cur ** 2) * s_noise * jax.random.normal(sub, x_cur.shape)
    else:
      t_hat, x_hat = t_cur, x_cur
    d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d_cur
    if second_order:
      d_prime = (x_next - denoise(x_next, t_next)) / t_next
      x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, key

  key = rng if rng is not None else jax.random.key(0)
  carry = (latents.astype(jnp.float32) * steps[0], key)
  # Heun steps in a loop (the network compiles once), then the final Euler step to σ = 0.
  carry = jax.lax.fori_loop(0, num_steps - 1, lambda i, c: heun_step(i, c, True), carry,
                            unroll=max(num_steps - 1, 1) if unroll else 1)
  x, _ = heun_step(num_steps - 1, carry, False)
  return x

def to_uint8(images: Array) -> np.ndarray:
  """The official image quantisation floor(clip(127.5·x + 128, 0, 255)) (note the +128, then truncation).

  Computed in float32 like the official torch code: float64 arithmetic truncates differently just below
  integers (e.g. x = 0.3843137 gives 177 in float32, 176 in float64).
  """
  scaled = np.asarray(images, np.float32) * np.float32(127.5) + np.float32(128)
  return np.clip(scaled, 0, 255).astype(np.uint8)


def parse_seeds(spec: str | Sequence[int]) -> list:
  """EDM's seed syntax: '0-49999', '1,5,7', '0-9,100-109' → list of ints."""
  if not isinstance(spec, str):
    return [int(s) for s in spec]
  seeds = []
  for part in spec.split(","):
    part = part.strip()
    if not part:
      continue
    lo, sep, hi = part.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
      raise ValueError(f"bad seed {part!r} in {spec!r}: expected N or N-M with non-negative integers")
    if sep and int(hi) < int(lo):
      raise ValueError(f"bad seed range {part!r}: end before start")
    seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
  if not seeds:
    raise ValueError(f"no seeds in {spec!r}")
  return seeds


RNGS = ("torch_cpu", "torch_cuda", "numpy")


def seed_noise(seeds: Sequence[int], image_shape: tuple, label_dim: int = 0, rng: str = "torch_cpu") -> tuple:
  """Per-image noise [n, H, W, C] and one-hot labels [n, label_dim] (or None), each image from its own seed.

  Like the official scripts' StackedRandomGenerator: one generator per seed (seed mod 2**32), the noise drawn as
  randn([C, H, W]) (returned transposed to our NHWC), then, for conditional nets, randint(label_dim) from the
  same generator. `rng` picks the generator: "torch_cpu" draws exactly what torch.Generator('cpu') draws;
  "torch_cuda" follows torch.Generator('cuda') (unverified against a GPU, normals only close: see
  sida_jax.torch_random); "numpy" draws from np.random.RandomState(seed) instead (float64 normals cast to float32).
  """
  if rng not in RNGS:
    raise ValueError(f"sample.rng {rng!r}: expected one of {RNGS}")
  h, w, c = image_shape
  if rng == "numpy":
    noise, classes = [], []
    for seed in seeds:
      state = np.random.RandomState(int(seed) % (1 << 32))
      noise.append(state.randn(*image_shape).astype(np.float32))
      if label_dim:
        classes.append(state.randint(label_dim))
    z = np.stack(noise)
  else:
    z, classes = torch_random.randn_randint(seeds, (c, h, w), label_dim, device=rng[len("torch_"):])
    z = np.ascontiguousarray(z.transpose(0, 2, 3, 1))
  y = np.eye(label_dim, dtype=np.float32)[np.asarray(classes)] if label_dim else None
  return z, y
