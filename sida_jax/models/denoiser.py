"""A uniform calling convention over every preconditioned network (EDM, VP, VE, EDM2).

The training step and the losses never look inside a network: they hold a `Denoiser`, call it with a
variables dict, and read a `DenoiserOutput` whose optional fields (SiDA logits, EDM2 log-variance) are
filled only when asked for.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Variables = dict
MODES = ("decoder", "encoder", "encoder_decoder")


@dataclasses.dataclass(frozen=True)
class DenoiserOutput:
  denoised: Optional[Array] = None   # D(x; σ), NHWC float32
  logits: Optional[Array] = None     # [N, h, w, 1] encoder logits (SiDA's discriminator)
  logvar: Optional[Array] = None     # [N, 1, 1, 1] EDM2 uncertainty head


jax.tree_util.register_dataclass(
    DenoiserOutput, data_fields=["denoised", "logits", "logvar"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A Precond module plus the facts the training code needs about it.

  Attributes:
    module: the linen Precond module (EDMPrecond, VPPrecond, VEPrecond or EDM2 Precond).
    label_dim: number of classes (0: unconditional).
    augment_dim: width of the augment-label input (0: none).
    has_logvar: whether the module has the EDM2 log-variance head.
    accepts_augment_labels: whether the module's call takes `augment_labels` (EDM family).
  """
  module: nn.Module
  label_dim: int = 0
  augment_dim: int = 0
  has_logvar: bool = False
  accepts_augment_labels: bool = True

  def __call__(self, variables: Variables, x: Array, sigma: Array, labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, *, train: bool = False,
               rng: Optional[Array] = None, mode: str = "decoder",
               want_logvar: bool = False) -> DenoiserOutput:
    """Runs the network. `mode` is 'decoder', 'encoder' or 'encoder_decoder' (SiDA)."""
    if mode not in MODES:   # checked first: a network may not reject an unknown flag itself
      raise ValueError(f"unknown network mode {mode!r}: expected 'decoder', 'encoder' or 'encoder_decoder'")
    kwargs: dict[str, Any] = dict(train=train, return_flag=mode)
    if self.accepts_augment_labels:
      kwargs["augment_labels"] = augment_labels
    if want_logvar:
      if not self.has_logvar:
        raise ValueError("want_logvar=True but this network has no log-variance head")
      kwargs["return_logvar"] = True
    if self.label_dim == 0:
      labels = None
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    out = self.module.apply(variables, x, sigma, labels, rngs=rngs, **kwargs)
    parts = list(out) if isinstance(out, tuple) else [out]
    logvar = parts.pop() if want_logvar else None
    if mode == "decoder":
      return DenoiserOutput(denoised=parts[0], logvar=logvar)
    if mode == "encoder":
      return DenoiserOutput(logits=parts[0], logvar=logvar)
    return DenoiserOutput(denoised=parts[0], logits=parts[1], logvar=logvar)

  def zero_augment_labels(self, batch: int) -> Optional[Array]:
    return jnp.zeros((batch, self.augment_dim), jnp.float32) if self.augment_dim else None
