"""EDM preconditioners: any EDM U-Net F turned into a denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

The wrapped U-Net is the submodule `model`, so variables carry the official `model.` prefix. `dtype` is
the U-Net's compute dtype (EDM's `use_fp16`, with bfloat16): parameters stay float32, and the sigma
arithmetic, the class-label/noise mapping and the returned D and logits are float32.
"""
import math
from typing import NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sida_jax.models.edm.unets import RETURN_FLAGS

Array = jax.Array
Scalar = Union[Array, float]


class Coefficients(NamedTuple):
  """Preconditioning coefficients, broadcastable against the images."""
  c_skip: Scalar
  c_out: Scalar
  c_in: Scalar
  c_noise: Array


def edm_coefficients(sigma: Array, sigma_data: float = 0.5) -> Coefficients:
  """EDM (Karras et al. 2022): unit-variance input and target at every sigma."""
  var = jnp.square(sigma) + sigma_data ** 2
  return Coefficients(c_skip=sigma_data ** 2 / var,
                      c_out=sigma * sigma_data / jnp.sqrt(var),
                      c_in=1 / jnp.sqrt(var),
                      c_noise=jnp.log(sigma) / 4)


def vp_sigma(t: Array, beta_d: float = 19.9, beta_min: float = 0.1) -> Array:
  """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
  return jnp.sqrt(jnp.expm1(0.5 * beta_d * jnp.square(t) + beta_min * t))


def vp_sigma_inv(sigma: Array, beta_d: float = 19.9, beta_min: float = 0.1) -> Array:
  """The time t at which the VP schedule reaches `sigma`.

  log(1 + sigma^2) rather than log1p, as the official code: it sets the network's noise labels.
  """
  return (jnp.sqrt(beta_min ** 2 + 2 * beta_d * jnp.log(1 + jnp.square(sigma))) - beta_min) / beta_d


def vp_coefficients(sigma: Array, beta_d: float = 19.9, beta_min: float = 0.1,
                    M: int = 1000) -> Coefficients:  # noqa: N803 (official name)
  """VP (Song et al. 2021) with the DDPM time scale: D = x - sigma F, c_noise = (M - 1) t(sigma)."""
  return Coefficients(c_skip=1.0, c_out=-sigma, c_in=1 / jnp.sqrt(jnp.square(sigma) + 1),
                      c_noise=(M - 1) * vp_sigma_inv(sigma, beta_d, beta_min))


def ve_coefficients(sigma: Array) -> Coefficients:
  """VE (Song et al. 2021): D = x + sigma F, c_noise = ln(sigma / 2)."""
  return Coefficients(c_skip=1.0, c_out=sigma, c_in=1.0, c_noise=jnp.log(0.5 * sigma))


def gdd_coefficients(sigma: Array, sigma_data: float = 0.5, epsilon: float = 0.002) -> Coefficients:
  """GDD's generator (Zyriix/GDD `GDDPrecond`): EDM's c_in and c_noise with the consistency-model c_skip and
  c_out (Song et al. 2023), which make D(x; ε) = x."""
  var = jnp.square(sigma) + sigma_data ** 2
  return Coefficients(c_skip=sigma_data ** 2 / (jnp.square(sigma - epsilon) + sigma_data ** 2),
                      c_out=(sigma - epsilon) * sigma_data / jnp.sqrt(var),
                      c_in=1 / jnp.sqrt(var),
                      c_noise=jnp.log(sigma) / 4)


class _Precond(nn.Module):
  """Shared forward of the EDM preconditioners; subclasses define `coefficients`."""
  model: nn.Module
  dtype: jnp.dtype = jnp.float32

  @property
  def img_resolution(self) -> int:
    return self.model.img_resolution

  @property
  def img_channels(self) -> int:
    return self.model.in_channels

  @property
  def label_dim(self) -> int:
    return self.model.label_dim

  @property
  def augment_dim(self) -> int:
    return self.model.augment_dim

  def coefficients(self, sigma: Array) -> Coefficients:
    raise NotImplementedError

  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False,
               return_flag: str = 'decoder') -> Union[Array, tuple[Array, Array]]:
    """D(x; sigma) [N, H, W, C]; 'encoder' gives logits [N, h, w, 1]; 'encoder_decoder' both."""
    if return_flag not in RETURN_FLAGS:
      raise ValueError(f'return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}')
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32).reshape(-1, 1, 1, 1)
    if self.label_dim:
      # A conditional net called without labels sees one all-zero row, broadcast over the batch.
      class_labels = (jnp.zeros((1, self.label_dim), jnp.float32) if class_labels is None else
                      jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim))
    else:
      class_labels = None
    if augment_labels is not None:
      augment_labels = jnp.asarray(augment_labels, jnp.float32)
    c = self.coefficients(sigma)
    out = self.model((c.c_in * x).astype(self.dtype), c.c_noise.reshape(-1), class_labels,
                     augment_labels, train=train, return_flag=return_flag)
    if return_flag == 'encoder':
      return out
    f_x, logits = out if return_flag == 'encoder_decoder' else (out, None)
    d_x = c.c_skip * x + c.c_out * f_x.astype(jnp.float32)
    return d_x if logits is None else (d_x, logits)


class EDMPrecond(_Precond):
  """EDM preconditioning (`training.networks.EDMPrecond`)."""
  sigma_min: float = 0.0
  sigma_max: float = math.inf
  sigma_data: float = 0.5

  def coefficients(self, sigma: Array) -> Coefficients:
    return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(_Precond):
  """Variance-preserving preconditioning (`training.networks.VPPrecond`)."""
  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000  # noqa: N815 (official name)
  epsilon_t: float = 1e-5

  @property
  def sigma_min(self) -> float:
    return float(vp_sigma(self.epsilon_t, self.beta_d, self.beta_min))

  @property
  def sigma_max(self) -> float:
    return float(vp_sigma(1.0, self.beta_d, self.beta_min))

  def coefficients(self, sigma: Array) -> Coefficients:
    return vp_coefficients(sigma, self.beta_d, self.beta_min, self.M)


class VEPrecond(_Precond):
  """Variance-exploding preconditioning (`training.networks.VEPrecond`)."""
  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def coefficients(self, sigma: Array) -> Coefficients:
    return ve_coefficients(sigma)


class GDDPrecond(_Precond):
  """GDD's one-step generator (`training.networks.GDDPrecond`): a teacher's U-Net (VE NCSN++ or ADM weights)
  under EDM's c_in/c_noise and the consistency-model c_skip/c_out; GDD calls it on 80·z at σ = 80.
  `epsilon` is fixed in the official class (not a constructor argument)."""
  sigma_min: float = 0.0
  sigma_max: float = math.inf
  sigma_data: float = 0.5
  epsilon: float = 0.002

  def coefficients(self, sigma: Array) -> Coefficients:
    return gdd_coefficients(sigma, self.sigma_data, self.epsilon)
