"""A small MLP denoiser with EDM preconditioning, for low-dimensional toys and fast tests.

It follows the network convention of sida_jax (call signature, return_flag, variables) so every method
and the shared step run on it unchanged. Data are "images" of any small NHWC shape (a 2-D point is
(1, 1, 2)). Its encoder logits are the channel mean of the last hidden layer, reshaped to [N, 1, 1, 1].
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sida_jax.models.denoiser import Denoiser


class ToyPrecond(nn.Module):
  """`img_resolution`/`img_channels` only describe the data (for initialisation and configs)."""
  features: Sequence[int] = (64, 64)
  label_dim: int = 0
  augment_dim: int = 0
  sigma_data: float = 0.5
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  img_resolution: int = 1
  img_channels: int = 2

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, augment_labels=None, train: bool = False,
               return_flag: str = "decoder"):
    n = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (n,)).reshape(n, 1, 1, 1)
    c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
    c_out = sigma * self.sigma_data / jnp.sqrt(sigma ** 2 + self.sigma_data ** 2)
    c_in = 1 / jnp.sqrt(self.sigma_data ** 2 + sigma ** 2)
    c_noise = jnp.log(sigma.reshape(n, 1)) / 4
    freqs = jnp.arange(8, dtype=jnp.float32)
    emb = jnp.concatenate([jnp.sin(c_noise * 2 ** freqs), jnp.cos(c_noise * 2 ** freqs)], axis=1)
    if self.label_dim:
      labels = jnp.zeros((1, self.label_dim)) if class_labels is None else class_labels
      emb = emb + nn.Dense(emb.shape[1], name="map_label")(jnp.broadcast_to(labels, (n, self.label_dim)))
    if self.augment_dim and augment_labels is not None:
      emb = emb + nn.Dense(emb.shape[1], use_bias=False, name="map_augment")(augment_labels)
    h = (c_in * x).reshape(n, -1).astype(self.dtype)
    for i, width in enumerate(self.features):
      h = nn.Dense(width, dtype=self.dtype, name=f"enc{i}")(jnp.concatenate([h, emb.astype(self.dtype)], 1))
      h = nn.silu(h)
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    logits = jnp.mean(h.astype(jnp.float32), axis=1).reshape(n, 1, 1, 1)
    if return_flag == "encoder":
      return logits
    f = nn.Dense(x[0].size, dtype=self.dtype, name="out")(h).astype(jnp.float32).reshape(x.shape)
    denoised = c_skip * x + c_out * f
    if return_flag == "encoder_decoder":
      return denoised, logits
    return denoised


def toy_denoiser(features: Sequence[int] = (64, 64), label_dim: int = 0, augment_dim: int = 0,
                 dropout: float = 0.0) -> Denoiser:
  module = ToyPrecond(features=tuple(features), label_dim=label_dim, augment_dim=augment_dim, dropout=dropout)
  return Denoiser(module, label_dim=label_dim, augment_dim=augment_dim)


def init_toy(denoiser: Denoiser, rng: jax.Array, image_shape: tuple) -> dict:
  x = jnp.zeros((1, *image_shape))
  labels = jnp.zeros((1, denoiser.label_dim)) if denoiser.label_dim else None
  aug = jnp.zeros((1, denoiser.augment_dim)) if denoiser.augment_dim else None
  return denoiser.module.init(rng, x, jnp.ones((1,)), labels, aug)


def from_init_kwargs(class_name: str, init_kwargs: Mapping[str, Any], dtype: Any = jnp.float32) -> ToyPrecond:
  """A `ToyPrecond` from the kwargs a config or `network.json` records (`class_name` is 'ToyPrecond')."""
  del class_name
  kwargs = dict(init_kwargs)
  kwargs['features'] = tuple(kwargs.get('features', (64, 64)))
  return ToyPrecond(**kwargs, dtype=dtype)
