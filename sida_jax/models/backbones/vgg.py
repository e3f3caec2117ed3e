"""torchvision's VGG with batch norm (`vgg16_bn`) in Flax, NHWC, evaluation mode.

Parameter names are torchvision's state_dict names: `features.{i}.weight/bias` for the 3×3 convolutions and
the batch norms (`features.{i}.running_mean/running_var` in 'buffers'), `classifier.{0,3,6}.weight/bias`
for the head. Batch norm always uses its running statistics: the network is a frozen feature extractor.

`taps` are the split points of `features` whose outputs are returned (Projected GAN cuts vgg16_bn at 13,
23, 33 and 43: the last conv block of each resolution before its max-pool, at 1/2, 1/4, 1/8, 1/16 of the
input). Weights: torchvision's `vgg16_bn-6c64b313.pth` (IMAGENET1K_V1), read without torch by the project's
torch-file reader and converted with `variables_from_state_dict`.
"""
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sida_jax.models.backbones import torch_layers

Array = jax.Array

# torchvision's configuration 'D' (VGG-16): conv widths, 'M' = 2×2 max-pool.
VGG16_CONFIG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')
PROJECTED_GAN_TAPS = (13, 23, 33, 43)


class BackboneOutput(NamedTuple):
  features: tuple   # NHWC maps at the taps
  logits: Optional[Array]


def layer_count(config: Sequence[Union[int, str]]) -> int:
  """Length of torchvision's `features` for a config: conv, bn, relu per width, one entry per 'M'."""
  return sum(1 if c == 'M' else 3 for c in config)


class VGGFeatures(nn.Module):
  """torchvision's `features` Sequential run up to index `stop`: (outputs at `taps`, last output)."""
  config: Sequence[Union[int, str]]
  taps: Sequence[int]
  stop: int

  @nn.compact
  def __call__(self, x: Array) -> tuple:
    outputs, index, channels = [], 0, x.shape[-1]
    for width in self.config:
      if index >= self.stop:
        break
      if width == 'M':
        x = torch_layers.max_pool_2x2(x)
        index += 1
      else:
        x = torch_layers.Conv2d(channels, width, 3, padding=1, name=str(index))(x)
        x = nn.relu(torch_layers.BatchNorm2d(width, name=str(index + 1))(x))
        channels, index = width, index + 3
      if index in self.taps:
        outputs.append(x)
    return tuple(outputs), x


class VGGClassifier(nn.Module):
  """torchvision's `classifier`: Linear-ReLU-Dropout twice, then Linear (dropout is off in evaluation)."""
  in_features: int
  hidden: int
  num_classes: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.relu(torch_layers.Linear(self.in_features, self.hidden, name='0')(x))
    x = nn.relu(torch_layers.Linear(self.hidden, self.hidden, name='3')(x))
    return torch_layers.Linear(self.hidden, self.num_classes, name='6')(x)


class VGG(nn.Module):
  """VGG with batch norm; returns the tapped feature maps and, with the head, the class logits."""
  config: Sequence[Union[int, str]] = VGG16_CONFIG
  taps: Sequence[int] = PROJECTED_GAN_TAPS
  include_head: bool = True
  num_classes: int = 1000
  hidden: int = 4096

  @nn.compact
  def __call__(self, x: Array) -> BackboneOutput:
    depth = layer_count(self.config)
    bad = [t for t in self.taps if not 0 < t <= depth]
    if bad:
      raise ValueError(f'VGG: taps {bad} outside the {depth} layers of `features`')
    stop = depth if self.include_head else max(self.taps)
    features, x = VGGFeatures(tuple(self.config), tuple(self.taps), stop, name='features')(x)
    if not self.include_head:
      return BackboneOutput(features, None)
    x = torch_layers.adaptive_avg_pool(x, (7, 7))
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch flattens NCHW
    width = [c for c in self.config if c != 'M'][-1]
    logits = VGGClassifier(width * 49, self.hidden, self.num_classes, name='classifier')(x)
    return BackboneOutput(features, logits)


def example_input(module: VGG) -> Array:
  del module
  return jnp.zeros((1, 32, 32, 3), jnp.float32)


def variables_from_state_dict(module: VGG, state_dict: Mapping[str, Any]) -> dict:
  """Strict copy of a torchvision VGG state_dict (name -> numpy array) into `module`'s variables.

  A module without its head also takes the complete torchvision file; see `torch_layers.load_backbone`.
  """
  return torch_layers.load_backbone(module, state_dict, example_input(module), 'vgg state_dict')
