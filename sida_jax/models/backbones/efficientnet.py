"""timm's `tf_efficientnet_lite0` in Flax, NHWC, evaluation mode.

The TensorFlow-ported EfficientNet-Lite0 that Projected GAN (and GDD after it) uses: ReLU6, no
squeeze-excitation, batch-norm eps 1e-3, and TensorFlow 'SAME' padding (timm's `Conv2dSame` on strided
convolutions; at stride 1 it equals the symmetric padding timm uses there). Parameter names are timm's:
`conv_stem`, `bn1`, `blocks.{stage}.{block}.{conv_dw,bn1,conv_pw,bn2}` (depthwise-separable first stage),
`blocks.{stage}.{block}.{conv_pw,bn1,conv_dw,bn2,conv_pwl,bn3}` (inverted residuals), `conv_head`, `bn2`,
`classifier`; batch-norm running statistics in 'buffers'.

`taps` are the stages whose outputs are returned (Projected GAN taps stages 1, 2, 4 and 6: 24, 40, 112 and
320 channels at 1/4, 1/8, 1/16 and 1/32 of the input). Weights: timm's `tf_efficientnet_lite0.in1k`
(`model.safetensors` of the hub repository `timm/tf_efficientnet_lite0.in1k`, or the older release file
`tf_efficientnet_lite0-0aa007d2.pth`), converted with `variables_from_state_dict`.
"""
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sida_jax.models.backbones import torch_layers
from sida_jax.models.backbones.vgg import BackboneOutput

Array = jax.Array


class Stage(NamedTuple):
  """One stage of timm's architecture string, e.g. 'ir_r2_k3_s2_e6_c24'."""
  block: str        # 'ds' (depthwise separable) or 'ir' (inverted residual)
  repeats: int
  kernel: int
  stride: int       # of the first block
  expansion: int
  channels: int


LITE0_STAGES = (
    Stage('ds', 1, 3, 1, 1, 16),
    Stage('ir', 2, 3, 2, 6, 24),
    Stage('ir', 2, 5, 2, 6, 40),
    Stage('ir', 3, 3, 2, 6, 80),
    Stage('ir', 3, 5, 1, 6, 112),
    Stage('ir', 4, 5, 2, 6, 192),
    Stage('ir', 1, 3, 1, 6, 320),
)
PROJECTED_GAN_TAPS = (1, 2, 4, 6)
_BN_EPS = 1e-3  # timm's BN_EPS_TF_DEFAULT


def make_divisible(value: float, divisor: int = 8) -> int:
  """timm's channel rounding: nearest multiple of `divisor`, never below 90% of `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def _bn(channels: int, name: str):
  return torch_layers.BatchNorm2d(channels, eps=_BN_EPS, name=name)


class DepthwiseSeparable(nn.Module):
  in_channels: int
  out_channels: int
  kernel: int
  stride: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.in_channels
    h = torch_layers.Conv2d(c, c, self.kernel, self.stride, 'SAME', groups=c, bias=False, name='conv_dw')(x)
    h = torch_layers.relu6(_bn(c, 'bn1')(h))
    h = torch_layers.Conv2d(c, self.out_channels, 1, bias=False, name='conv_pw')(h)
    h = _bn(self.out_channels, 'bn2')(h)
    return x + h if self.stride == 1 and self.in_channels == self.out_channels else h


class InvertedResidual(nn.Module):
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expansion: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    mid = make_divisible(self.in_channels * self.expansion)
    h = torch_layers.Conv2d(self.in_channels, mid, 1, bias=False, name='conv_pw')(x)
    h = torch_layers.relu6(_bn(mid, 'bn1')(h))
    h = torch_layers.Conv2d(mid, mid, self.kernel, self.stride, 'SAME', groups=mid, bias=False, name='conv_dw')(h)
    h = torch_layers.relu6(_bn(mid, 'bn2')(h))
    h = torch_layers.Conv2d(mid, self.out_channels, 1, bias=False, name='conv_pwl')(h)
    h = _bn(self.out_channels, 'bn3')(h)
    return x + h if self.stride == 1 and self.in_channels == self.out_channels else h


class Blocks(nn.Module):
  """timm's `blocks`: one Sequential per stage; runs the first `stop` stages, returns the outputs at `taps`."""
  in_channels: int
  stages: Sequence[Stage]
  taps: Sequence[int]
  stop: int

  @nn.compact
  def __call__(self, x: Array) -> tuple:
    outputs, channels = [], self.in_channels
    for s, stage in enumerate(self.stages[:self.stop]):
      x = _Stage(channels, stage, name=str(s))(x)
      channels = stage.channels
      if s in self.taps:
        outputs.append(x)
    return tuple(outputs), x


class _Stage(nn.Module):
  in_channels: int
  stage: Stage

  @nn.compact
  def __call__(self, x: Array) -> Array:
    st, channels = self.stage, self.in_channels
    for b in range(st.repeats):
      stride = st.stride if b == 0 else 1
      if st.block == 'ds':
        x = DepthwiseSeparable(channels, st.channels, st.kernel, stride, name=str(b))(x)
      else:
        x = InvertedResidual(channels, st.channels, st.kernel, stride, st.expansion, name=str(b))(x)
      channels = st.channels
    return x


class EfficientNet(nn.Module):
  """EfficientNet-Lite (TF variant); returns the tapped stage outputs and, with the head, the logits."""
  stages: Sequence[Stage] = LITE0_STAGES
  stem_channels: int = 32
  taps: Sequence[int] = PROJECTED_GAN_TAPS
  include_head: bool = True
  head_channels: int = 1280
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: Array) -> BackboneOutput:
    stages = tuple(Stage(*s) for s in self.stages)
    for s in stages:
      if s.block not in ('ds', 'ir'):
        raise ValueError(f"EfficientNet: unknown block type {s.block!r} (expected 'ds' or 'ir')")
    bad = [t for t in self.taps if not 0 <= t < len(stages)]
    if bad:
      raise ValueError(f'EfficientNet: taps {bad} outside the {len(stages)} stages')
    x = torch_layers.Conv2d(x.shape[-1], self.stem_channels, 3, 2, 'SAME', bias=False, name='conv_stem')(x)
    x = torch_layers.relu6(_bn(self.stem_channels, 'bn1')(x))
    stop = len(stages) if self.include_head else max(self.taps) + 1
    features, x = Blocks(self.stem_channels, stages, tuple(self.taps), stop, name='blocks')(x)
    if not self.include_head:
      return BackboneOutput(features, None)
    x = torch_layers.Conv2d(stages[-1].channels, self.head_channels, 1, bias=False, name='conv_head')(x)
    x = torch_layers.relu6(_bn(self.head_channels, 'bn2')(x))
    logits = torch_layers.Linear(self.head_channels, self.num_classes, name='classifier')(x.mean((1, 2)))
    return BackboneOutput(features, logits)


def example_input(module: EfficientNet) -> Array:
  del module
  return jnp.zeros((1, 32, 32, 3), jnp.float32)


def variables_from_state_dict(module: EfficientNet, state_dict: Mapping[str, Any]) -> dict:
  """Strict copy of a timm EfficientNet state_dict (name -> numpy array) into `module`'s variables.

  A module without its head also takes the complete timm file; see `torch_layers.load_backbone`.
  """
  return torch_layers.load_backbone(module, state_dict, example_input(module), 'efficientnet state_dict')
