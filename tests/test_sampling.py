"""sampling: Heun vs the closed-form probability-flow ODE, EDM's σ steps, quantisation, seeds, generate."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax import sampling, torch_random
from sida_jax.metrics import fid
from sida_jax.models.denoiser import Denoiser
from sida_jax.models.toy import init_toy, toy_denoiser

DATA_STD = 0.5


class GaussianPrecond(nn.Module):
  """The exact denoiser of data ~ N(0, s²) per pixel: D(x; σ) = s²/(s²+σ²)·x, with s a parameter."""

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, augment_labels=None, train=False, return_flag="decoder"):
    s = self.param("data_std", lambda _: jnp.asarray(DATA_STD, jnp.float32))
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), x.shape[:1]).reshape(-1, 1, 1, 1)
    return s ** 2 / (s ** 2 + sigma ** 2) * x


def _gaussian():
  module = GaussianPrecond()
  return Denoiser(module), module.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), jnp.ones((1,)))


def test_heun_solves_the_probability_flow_ode_with_second_order_convergence():
  denoiser, variables = _gaussian()
  latents = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  t_max = 80.0
  # dx/dσ = (x − D)/σ = σx/(s²+σ²)  ⇒  x(σ) ∝ √(s²+σ²).
  exact = np.asarray(latents, np.float64) * t_max * DATA_STD / np.sqrt(DATA_STD ** 2 + t_max ** 2)
  errors = []
  for steps in (24, 48, 96):
    out = sampling.heun_sample(denoiser, variables, latents, num_steps=steps, sigma_max=t_max)
    errors.append(np.max(np.abs(np.asarray(out, np.float64) - exact)) / np.max(np.abs(exact)))
  assert errors[-1] < 2e-3
  orders = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
  assert np.all(orders > 1.8) and np.all(orders < 2.4), (errors, orders)


def test_heun_churn_needs_an_rng():
  denoiser, variables = _gaussian()
  with pytest.raises(ValueError, match="rng"):
    sampling.heun_sample(denoiser, variables, jnp.zeros((1, 2, 2, 1)), num_steps=4, s_churn=10.0)


def test_edm_sigma_steps_match_edm_formula():
  steps = sampling.edm_sigma_steps(18)
  assert steps.shape == (19,) and steps.dtype == np.float64
  np.testing.assert_allclose(steps[[0, 17, 18]], [80.0, 0.002, 0.0], rtol=1e-12, atol=0)
  # EDM eq. 5: σ_i^(1/ρ) is linear in i.
  roots = steps[:-1] ** (1 / 7)
  np.testing.assert_allclose(np.diff(roots), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17, rtol=1e-10)
  np.testing.assert_allclose(sampling.edm_sigma_steps(2, 0.02, 100.0, 3.0), [100.0, 0.02, 0.0], rtol=1e-12)


def test_to_uint8_is_the_official_float32_quantisation():
  edge = np.asarray([-2.0, -1.0, -1.0039216, 0.0, 0.3843137, 0.5568627, 0.75294113, 0.99607843, 1.0, 3.0,
                     -0.0039215684], np.float32)
  np.testing.assert_array_equal(sampling.to_uint8(edge), [0, 0, 0, 128, 177, 199, 224, 255, 255, 255, 127])
  x = np.random.default_rng(0).uniform(-1.02, 1.02, (4, 64, 64, 3)).astype(np.float32)
  out = sampling.to_uint8(x)
  assert out.dtype == np.uint8 and out.shape == x.shape
  # Second implementation: the JAX float32 quantiser of the FID module.
  np.testing.assert_array_equal(out, np.asarray(fid.quantize_images(jnp.asarray(x))))


@pytest.mark.parametrize("spec,expected", [
    ("0-3,7", [0, 1, 2, 3, 7]), ("5", [5]), (" 1, 5 ,7 ,", [1, 5, 7]), ("0-1,10-11", [0, 1, 10, 11]),
    ([3, 1], [3, 1]), ("2-2", [2]),
])
def test_parse_seeds(spec, expected):
  assert sampling.parse_seeds(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("5-3", "end before start"), ("", "no seeds"), ("a", "bad seed 'a'"), ("-3", "bad seed '-3'"),
    ("1-x", "bad seed '1-x'"),
])
def test_parse_seeds_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    sampling.parse_seeds(spec)


@pytest.mark.parametrize("rng", sampling.RNGS)
def test_seed_noise_depends_only_on_the_images_own_seed(rng):
  shape = (4, 4, 3)
  z_all, y_all = sampling.seed_noise([3, 5, 9], shape, label_dim=10, rng=rng)
  z_one, y_one = sampling.seed_noise([5], shape, label_dim=10, rng=rng)
  np.testing.assert_array_equal(z_all[1], z_one[0])
  np.testing.assert_array_equal(y_all[1], y_one[0])
  assert z_all.dtype == np.float32 and y_all.shape == (3, 10) and y_all.dtype == np.float32
  z, y = sampling.seed_noise([9], shape, rng=rng)
  assert y is None
  np.testing.assert_array_equal(z[0], z_all[2])
  assert not np.array_equal(z_all[0], z_all[1])


def test_seed_noise_numpy_is_one_random_state_per_seed():
  shape = (4, 4, 3)
  z, y = sampling.seed_noise([3, 5, 9, 2**32 + 9], shape, label_dim=10, rng="numpy")
  rng = np.random.RandomState(9)   # one generator per seed: noise first, then the class
  np.testing.assert_array_equal(z[2], rng.randn(*shape).astype(np.float32))
  np.testing.assert_array_equal(y[2], np.eye(10, dtype=np.float32)[rng.randint(10)])
  np.testing.assert_array_equal(z[3], z[2])   # seeds are taken mod 2**32 like the official scripts


@pytest.mark.parametrize("rng", ["torch_cpu", "torch_cuda"])
def test_seed_noise_torch_is_the_chw_draw_transposed_and_one_hot(rng):
  z, y = sampling.seed_noise([7, 8], (5, 6, 3), label_dim=1000, rng=rng)
  chw, classes = torch_random.randn_randint([7, 8], (3, 5, 6), 1000, device=rng[len("torch_"):])
  np.testing.assert_array_equal(z, chw.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(y, np.eye(1000, dtype=np.float32)[classes])


def test_seed_noise_defaults_to_the_torch_cpu_generator():
  z, y = sampling.seed_noise([7, 8], (5, 6, 3), label_dim=1000)
  chw, classes = torch_random.cpu_randn_randint([7, 8], (3, 5, 6), 1000)
  np.testing.assert_array_equal(z, chw.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(y.argmax(1), classes)


def test_seed_noise_rejects_an_unknown_rng():
  with pytest.raises(ValueError, match="sample.rng 'philox'"):
    sampling.seed_noise([0], (2, 2, 1), rng="philox")


def test_generate_is_one_denoiser_call_at_init_sigma():
  denoiser, variables = _gaussian()
  z = jax.random.normal(jax.random.key(2), (2, 2, 2, 1))
  out = sampling.generate(denoiser, variables, z, None, 2.5)
  np.testing.assert_allclose(out, DATA_STD ** 2 / (DATA_STD ** 2 + 2.5 ** 2) * 2.5 * np.asarray(z), rtol=1e-6)
  # A conditional network with augment labels: D(σ·z; σ, c, aug = 0).
  toy = toy_denoiser((16,), label_dim=3, augment_dim=2)
  toy_vars = init_toy(toy, jax.random.key(3), (2, 2, 1))
  labels = jnp.eye(3)[jnp.asarray([0, 2])]
  out = sampling.generate(toy, toy_vars, z, labels, 1.7)
  ref = toy.module.apply(toy_vars, 1.7 * z, jnp.full((2,), 1.7), labels, jnp.zeros((2, 2)))
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  other = sampling.generate(toy, toy_vars, z, labels[::-1], 1.7)
  assert not np.allclose(out, other)


def test_with_weights_passes_the_weights_as_arguments_not_as_constants():
  toy = toy_denoiser((1024,), label_dim=3, augment_dim=2)
  variables = init_toy(toy, jax.random.key(3), (2, 2, 1))
  z = jax.random.normal(jax.random.key(2), (2, 2, 2, 1))
  labels = jnp.eye(3)[jnp.asarray([0, 2])]
  fn = sampling.with_weights(lambda v, z, y: sampling.generate(toy, v, z, y, 1.7), variables)
  np.testing.assert_allclose(fn(z, labels), sampling.generate(toy, variables, z, labels, 1.7), rtol=1e-5, atol=1e-6)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(variables))
  program = fn.jitted.lower(fn.variables, z, labels).as_text()
  baked = jax.jit(lambda z, y: sampling.generate(toy, variables, z, y, 1.7)).lower(z, labels).as_text()
  assert len(baked) > weight_bytes            # the weights written into the program (hex), as closing over does
  assert len(program) < weight_bytes / 4      # here only their shapes
  weights_info = fn.jitted.lower(fn.variables, z, labels).args_info[0][0]
  assert jax.tree.structure(weights_info) == jax.tree.structure(variables)
