"""GDD's discriminator: Projected GAN on frozen pretrained feature networks (Zyriix/GDD `pg_modules/`).

Per feature network ("backbone"), as the official `ProjectedFeatureOnly` + `ProjectedDiscriminatorOnly`:

  images in [-1, 1] -> [0, 1] -> (x - mean) / std of the backbone
    -> bilinear resize to 224×224 (align_corners=False, no antialiasing) when the images are smaller than 224
       (and always for a ViT)
    -> backbone taps (4 maps; a ViT's token maps are reassembled by random 1×1 convs and (transposed) convs)
    -> CCM: random 1×1 convs to [cout, 2cout, 4cout, 8cout] channels
    -> CSM: from the coarsest map up, add the finer CCM map, 2× bilinear upsampling (align_corners=True),
       random 1×1 conv (halving channels except at the finest level) -> channels [cout, cout, 2cout, 4cout]
    -> 4 heads ("mini discriminators"), one per map: spectral-norm 4×4/2 convs + batch norm + LeakyReLU(0.2)
       from the map's nominal resolution down to 8, then a spectral-norm 4×4 conv to one logit map
       (conditional heads: to 64 channels, projected on a class embedding).

Everything before the heads is frozen: the pretrained backbone and the randomly initialised reassemble, CCM
and CSM convolutions (the official feature network is built once, set to eval mode and `requires_grad_(False)`).
The heads are trained, including the conditional heads' class-embedding table; they run in training mode in
every official forward (batch statistics in batch norm, one spectral-norm power iteration per call).

Heads are sized from nominal resolutions, not from the actual maps: the official code takes
im_res = 256 for images under 224 (the resolution the maps would have at 256 input), so a head sees a
larger map than planned and emits a spatial grid of logits: 4×4 per head for EfficientNet and DeiT maps,
11×11 for VGG maps (VGG taps one level finer), i.e. 64 or 484 logits per image and backbone.

Variables (frozen parts and trainable heads kept apart, so an optimiser can take `variables['heads']['params']`):

  {'features': {'params':  {backbone: {'backbone': <torchvision/timm names>, 'readout': ..., 'scratch': ...}},
                'buffers': {backbone: {'backbone': <batch-norm running statistics>}}},
   'heads':    {'params':  {backbone: {'mini_discs': ...}},     # trainable
                'buffers': {backbone: {'mini_discs': ...}}}}    # spectral-norm u/v, batch-norm running stats

Under each backbone the flattened names are the official state_dict names after
`feature_networks.{backbone}.` / `discriminators.{backbone}.` (with `pretrained.model.` -> `backbone.` and
the ViT's `pretrained.layer{k}.` -> `readout.layer{k}.`; CNN backbones keep torchvision/timm names under
`backbone.`). The official GDD loss (training/loss.py) is transcribed at the end of this file.

Fresh random weights (mixing layers, heads) follow the official initialisers' distributions (PyTorch
defaults; spectral-norm start vectors normalize(N(0, 1)); N(0, 1) embedding and FC weights); the values differ
from any torch run since the random streams differ.
"""
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sida_jax.models import convert
from sida_jax.models.backbones import deit, efficientnet, torch_layers, vgg

Array = jax.Array

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# ViT reassemble widths of Projected GAN's `_make_vit`, by model size.
VIT_READOUT_FEATURES = {'tiny': (24, 48, 96, 192), 'small': (48, 96, 192, 384), 'base': (96, 192, 384, 768),
                        'large': (256, 512, 1024, 1024)}
# Head widths by feature-map resolution (Projected GAN's `nfc_midas`).
HEAD_CHANNELS = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}
VIT_INPUT_SIZE = 224
EMBEDDING_SHAPE = (1000, 320)  # GDD's pretrained class embeddings, in_embeddings/tf_efficientnet_lite0.pkl


# Fresh variables are made by jitted inits shared by every discriminator of the same architecture (Flax modules
# compare and hash by their fields), so building a run again in a process (a resume, a second run) compiles
# nothing new.
@functools.partial(jax.jit, static_argnums=(0, 2), compiler_options=convert.INIT_COMPILER_OPTIONS)
def _init_features(features: nn.Module, rng: jax.Array, resolution: int) -> dict:
  return features.init(rng, jnp.zeros((1, resolution, resolution, 3), jnp.float32))


@functools.lru_cache(maxsize=16)
def _feature_map_shapes(features: nn.Module, resolution: int) -> Any:
  """ShapeDtypeStructs of the feature maps of one image (tracing the feature networks is slow)."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(lambda x: features.apply(features.init(jax.random.key(0), x), x), images)


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=convert.INIT_COMPILER_OPTIONS)
def _init_heads(heads: nn.Module, rng: jax.Array, maps: Any, labels: Optional[jax.Array]) -> dict:
  return heads.init(rng, maps, labels, False)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """A feature network: its name (the key of its variables), headless Flax module and input statistics.

  `readout_features` is non-empty for a ViT: the widths its four token maps are reassembled to.
  """
  name: str
  module: nn.Module
  mean: tuple
  std: tuple
  readout_features: tuple = ()

  @property
  def is_vit(self) -> bool:
    return bool(self.readout_features)


def backbone_spec(name: str) -> BackboneSpec:
  """The feature networks of GDD's two discriminators (`--backbone 0`: DeiT + EfficientNet; `1`: VGG + EfficientNet)."""
  if name == 'vgg16_bn':
    return BackboneSpec(name, vgg.VGG(include_head=False), *IMAGENET_STATS)
  if name == 'tf_efficientnet_lite0':
    return BackboneSpec(name, efficientnet.EfficientNet(include_head=False), *INCEPTION_STATS)
  if name == 'deit_base_distilled_patch16_224':
    return BackboneSpec(name, deit.DistilledVisionTransformer(include_head=False), *IMAGENET_STATS,
                        readout_features=VIT_READOUT_FEATURES['base'])
  raise ValueError(f'unknown feature network {name!r}: expected vgg16_bn, tf_efficientnet_lite0 or '
                   'deit_base_distilled_patch16_224 (or pass a BackboneSpec)')


# ---------------------------------------------------------------------------------------------------------
# Frozen feature networks: backbone, ViT reassembly, cross-channel (CCM) and cross-scale (CSM) mixing.

class _Reassemble(nn.Module):
  """One of Projected GAN's `pretrained.layer{k}`: tokens -> map, 1×1 conv ('3'), resampling ('4')."""
  in_channels: int
  features: int
  level: int

  @nn.compact
  def __call__(self, tokens: Array, grid: tuple) -> Array:
    x = tokens[:, deit.NUM_PREFIX_TOKENS:].reshape(tokens.shape[0], *grid, tokens.shape[-1])  # readout 'ignore'
    x = torch_layers.Conv2d(self.in_channels, self.features, 1, name='3')(x)
    f = self.features
    if self.level == 0:
      x = torch_layers.ConvTranspose2d(f, f, 4, 4, name='4')(x)
    elif self.level == 1:
      x = torch_layers.ConvTranspose2d(f, f, 2, 2, name='4')(x)
    elif self.level == 3:
      x = torch_layers.Conv2d(f, f, 3, 2, padding=1, name='4')(x)
    return x


class _FusionBlock(nn.Module):
  """Projected GAN's `FeatureFusionBlock`: (x [+ skip]) -> 2× bilinear (align_corners=True) -> 1×1 `out_conv`."""
  features: int
  expand: bool

  @nn.compact
  def __call__(self, x: Array, skip: Optional[Array] = None) -> Array:
    if skip is not None:
      if skip.shape != x.shape:
        raise ValueError(f'CSM: cannot add maps of shapes {skip.shape} and {x.shape} (input size not a multiple '
                         'of the backbone stride?)')
      x = x + skip
    x = torch_layers.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)
    out = self.features // 2 if self.expand else self.features
    return torch_layers.Conv2d(self.features, out, 1, name='out_conv')(x)


def ccm_channels(cout: int, expand: bool) -> tuple:
  return (cout, 2 * cout, 4 * cout, 8 * cout) if expand else (cout,) * 4


def csm_channels(cout: int, expand: bool) -> tuple:
  return (cout, cout, 2 * cout, 4 * cout) if expand else (cout,) * 4


class _Scratch(nn.Module):
  """Projected GAN's random `scratch`: CCM (`layer{k}_ccm`) and, for proj_type 2, CSM (`layer{k}_csm`)."""
  in_channels: tuple
  cout: int
  expand: bool
  proj_type: int

  @nn.compact
  def __call__(self, maps: Sequence[Array]) -> tuple:
    mixed_channels = ccm_channels(self.cout, self.expand)
    mixed = [torch_layers.Conv2d(cin, c, 1, name=f'layer{k}_ccm')(x)
             for k, (x, cin, c) in enumerate(zip(maps, self.in_channels, mixed_channels))]
    if self.proj_type == 1:
      return tuple(mixed)
    out3 = _FusionBlock(mixed_channels[3], self.expand, name='layer3_csm')(mixed[3])
    out2 = _FusionBlock(mixed_channels[2], self.expand, name='layer2_csm')(out3, mixed[2])
    out1 = _FusionBlock(mixed_channels[1], self.expand, name='layer1_csm')(out2, mixed[1])
    out0 = _FusionBlock(mixed_channels[0], False, name='layer0_csm')(out1, mixed[0])
    return out0, out1, out2, out3


class FeatureNetwork(nn.Module):
  """Official `F_RandomProj` plus the per-backbone input handling of `ProjectedFeatureOnly.forward`."""
  backbone: nn.Module
  mean: tuple
  std: tuple
  readout_features: tuple
  resize: bool
  cout: int = 64
  expand: bool = True
  proj_type: int = 2

  @nn.compact
  def __call__(self, images: Array) -> tuple:
    x = (images + 1) / 2
    x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    if self.resize:
      x = torch_layers.resize_bilinear(x, (VIT_INPUT_SIZE, VIT_INPUT_SIZE), align_corners=False)
    taps = self.backbone(x).features
    if len(taps) != 4:
      raise ValueError(f'FeatureNetwork: the backbone returns {len(taps)} taps, Projected GAN uses 4')
    if self.readout_features:
      patch = self.backbone.patch_size
      grid = (x.shape[1] // patch, x.shape[2] // patch)
      readout = _Readout(taps[0].shape[-1], tuple(self.readout_features), name='readout')
      taps = readout(taps, grid)
    if self.proj_type == 0:
      return tuple(taps)
    return _Scratch(tuple(t.shape[-1] for t in taps), self.cout, self.expand, self.proj_type, name='scratch')(taps)


class _Readout(nn.Module):
  in_channels: int
  features: tuple

  @nn.compact
  def __call__(self, taps: Sequence[Array], grid: tuple) -> tuple:
    return tuple(_Reassemble(self.in_channels, f, k, name=f'layer{k + 1}')(t, grid)
                 for k, (t, f) in enumerate(zip(taps, self.features)))


class ProjectedFeatures(nn.Module):
  """Official `ProjectedFeatureOnly` (DiffAugment off, as in every GDD run): one FeatureNetwork per backbone."""
  specs: tuple
  resize: bool
  cout: int = 64
  expand: bool = True
  proj_type: int = 2

  @nn.compact
  def __call__(self, images: Array) -> tuple:
    return tuple(
        FeatureNetwork(s.module.clone(), s.mean, s.std, s.readout_features, self.resize or s.is_vit, self.cout,
                       self.expand, self.proj_type, name=s.name)(images)
        for s in self.specs)


# ---------------------------------------------------------------------------------------------------------
# Trainable heads.

def head_plan(in_channels: int, start_size: int, end_size: int, ndf: Optional[int] = None) -> tuple:
  """Official `SingleDisc` layout: ([(cin, cout) of each DownBlock], channels into the final conv)."""
  channels = dict(HEAD_CHANNELS) if ndf is None else {k: ndf for k in HEAD_CHANNELS}
  if start_size not in channels:  # the nearest listed size (the smaller one on a tie, as np.argmin)
    sizes = np.array(list(channels))
    start_size = int(sizes[np.argmin(abs(sizes - start_size))])
  if end_size not in channels:
    raise ValueError(f'head_plan: no head width for end size {end_size} (image resolution too small?)')
  channels[start_size] = in_channels
  blocks = []
  while start_size > end_size:
    blocks.append((channels[start_size], channels[start_size // 2]))
    start_size //= 2
  return tuple(blocks), channels[end_size]


class _DownBlockMain(nn.Module):
  in_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, x: Array, train: bool, groups: int) -> Array:
    x = torch_layers.SpectralNormConv2d(self.in_channels, self.out_channels, 4, 2, 1, name='0')(x, update=train)
    x = torch_layers.BatchNorm2d(self.out_channels, name='1')(x, train=train, groups=groups)
    return torch_layers.leaky_relu(x, 0.2)


class DownBlock(nn.Module):
  """Official `DownBlock`: `main` = spectral-norm 4×4 stride-2 conv (bias), BatchNorm2d, LeakyReLU(0.2)."""
  in_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, x: Array, train: bool, groups: int) -> Array:
    return _DownBlockMain(self.in_channels, self.out_channels, name='main')(x, train, groups)


class _Main(nn.Module):
  """A head's `main` Sequential: the DownBlocks and, unconditional, the final bias-free conv to 1 channel."""
  blocks: tuple
  final: Optional[tuple]   # (in_channels, kernel) of the final conv, or None

  @nn.compact
  def __call__(self, x: Array, train: bool, groups: int) -> Array:
    for i, (cin, cout) in enumerate(self.blocks):
      x = DownBlock(cin, cout, name=str(i))(x, train, groups)
    if self.final is not None:
      cin, kernel = self.final
      x = torch_layers.SpectralNormConv2d(cin, 1, kernel, bias=False, name=str(len(self.blocks)))(x, update=train)
    return x


class _Embedding(nn.Module):
  num_embeddings: int
  features: int

  @nn.compact
  def __call__(self, index: Array) -> Array:
    table = self.param('weight', nn.initializers.normal(1.0), (self.num_embeddings, self.features))
    return jnp.take(table, index, axis=0)


class _StyleGANDense(nn.Module):
  """StyleGAN2's `FullyConnectedLayer` with activation 'lrelu': lrelu(x Wᵀ/√in + b, 0.2)·√2, W ~ N(0, 1)."""
  in_features: int
  out_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param('weight', nn.initializers.normal(1.0), (self.out_features, self.in_features))
    bias = self.param('bias', nn.initializers.zeros, (self.out_features,))
    x = x @ (weight.T / math.sqrt(self.in_features)) + bias
    return torch_layers.leaky_relu(x, 0.2) * math.sqrt(2)


class SingleDisc(nn.Module):
  """Official `SingleDisc` (label_dim 0) or `SingleDiscCond`; returns [N, h, w, 1] logits."""
  in_channels: int
  start_size: int
  end_size: int
  label_dim: int = 0
  ndf: Optional[int] = None
  cmap_dim: int = 64
  embedding_shape: tuple = EMBEDDING_SHAPE

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], train: bool, groups: int) -> Array:
    blocks, end_channels = head_plan(self.in_channels, self.start_size, self.end_size, self.ndf)
    kernel = 4 if self.end_size >= 8 else max(1, self.end_size // 2)
    if not self.label_dim:
      return _Main(blocks, (end_channels, kernel), name='main')(x, train, groups)
    h = _Main(blocks, None, name='main')(x, train, groups)
    out = torch_layers.SpectralNormConv2d(end_channels, self.cmap_dim, kernel, bias=False, name='cls')(h, update=train)
    embedded = _Embedding(*self.embedding_shape, name='embed')(jnp.argmax(labels, axis=1))
    cmap = _StyleGANDense(self.embedding_shape[1], self.cmap_dim, name='embed_proj')(embedded)
    return (out * cmap[:, None, None, :]).sum(-1, keepdims=True) / math.sqrt(self.cmap_dim)


class _MiniDiscs(nn.Module):
  channels: tuple
  resolutions: tuple
  end_size: int
  label_dim: int
  ndf: Optional[int]
  cmap_dim: int
  embedding_shape: tuple

  @nn.compact
  def __call__(self, maps: Sequence[Array], labels, train: bool, groups: int) -> Array:
    logits = []
    for i, (x, cin, res) in enumerate(zip(maps, self.channels, self.resolutions)):
      head = SingleDisc(cin, res, self.end_size, self.label_dim, self.ndf, self.cmap_dim, self.embedding_shape,
                        name=str(i))
      logits.append(head(x, labels, train, groups).reshape(x.shape[0], -1))
    return jnp.concatenate(logits, axis=1)


class MultiScaleD(nn.Module):
  """Official `MultiScaleD`: heads on the first `num_discs` maps; returns their logits concatenated, [N, L]."""
  channels: tuple
  resolutions: tuple
  num_discs: int = 4
  label_dim: int = 0
  ndf: Optional[int] = None
  cmap_dim: int = 64
  embedding_shape: tuple = EMBEDDING_SHAPE

  @nn.compact
  def __call__(self, maps: Sequence[Array], labels: Optional[Array], train: bool, groups: int = 1) -> Array:
    if self.num_discs not in (1, 2, 3, 4):
      raise ValueError(f'MultiScaleD: num_discs must be 1 to 4 (one head per map), got {self.num_discs}')
    resolutions = tuple(self.resolutions[:self.num_discs])
    end_size = 8 if resolutions[-1] >= 8 else resolutions[-1]
    return _MiniDiscs(tuple(self.channels[:self.num_discs]), resolutions, end_size, self.label_dim, self.ndf,
                      self.cmap_dim, self.embedding_shape, name='mini_discs')(maps, labels, train, groups)


class ProjectedHeads(nn.Module):
  """Official `ProjectedDiscriminatorOnly`: one MultiScaleD per backbone; returns one [N, L_b] per backbone."""
  names: tuple
  channels: tuple       # per backbone, per map
  resolutions: tuple    # per backbone, per map (nominal)
  num_discs: int = 4
  label_dim: int = 0
  ndf: Optional[int] = None
  cmap_dim: int = 64
  embedding_shape: tuple = EMBEDDING_SHAPE

  @nn.compact
  def __call__(self, features: Sequence[Sequence[Array]], labels: Optional[Array], train: bool,
               groups: int = 1) -> tuple:
    return tuple(MultiScaleD(c, r, self.num_discs, self.label_dim, self.ndf, self.cmap_dim, self.embedding_shape,
                             name=name)(maps, labels, train, groups)
                 for name, c, r, maps in zip(self.names, self.channels, self.resolutions, features))


# ---------------------------------------------------------------------------------------------------------
# The discriminator.

@dataclasses.dataclass(frozen=True)
class ProjectedDiscriminator:
  """GDD's discriminator for images of size `resolution`; see the module docstring.

  backbones: official names (see `backbone_spec`) or BackboneSpec records (e.g. reduced test networks).
  label_dim: 0 for unconditional heads; else the width of the one-hot labels (at most 1000 classes).
  interp224: official switch; images under 224 are resized to 224 when set (ViTs always are).
  batch_stat_groups: training-mode batch norm takes statistics over this many equal slices of the batch
    (the official per-GPU batch norm: one slice per GPU).
  cout, expand, proj_type, num_discs, ndf, cmap_dim: official knobs (GDD: 64, True, 2, 4, None, 64).
  """
  backbones: tuple = ('deit_base_distilled_patch16_224', 'tf_efficientnet_lite0')
  resolution: int = 32
  label_dim: int = 0
  interp224: bool = True
  batch_stat_groups: int = 1
  cout: int = 64
  expand: bool = True
  proj_type: int = 2
  num_discs: int = 4
  ndf: Optional[int] = None
  cmap_dim: int = 64
  embedding_shape: tuple = EMBEDDING_SHAPE

  def __post_init__(self):
    if self.proj_type not in (0, 1, 2):
      raise ValueError(f'ProjectedDiscriminator: proj_type must be 0, 1 or 2, got {self.proj_type}')
    if self.label_dim > self.embedding_shape[0]:
      raise ValueError(f'ProjectedDiscriminator: {self.label_dim} classes exceed the '
                       f'{self.embedding_shape[0]}-row class embedding')
    names = [s.name for s in self.specs]
    if len(set(names)) != len(names):
      raise ValueError(f'ProjectedDiscriminator: repeated backbone names {names}')

  @property
  def specs(self) -> tuple:
    return tuple(b if isinstance(b, BackboneSpec) else backbone_spec(b) for b in self.backbones)

  @property
  def resize(self) -> bool:
    return self.interp224 and self.resolution < VIT_INPUT_SIZE

  @property
  def nominal_resolutions(self) -> tuple:
    """Official `RESOLUTIONS` (the same for every backbone): what the head layouts are planned for."""
    im_res = self.resolution if self.resolution >= VIT_INPUT_SIZE or not self.interp224 else 256
    res = [im_res // 4, im_res // 8, im_res // 16, im_res // 32]
    return tuple(2 * r for r in res) if self.proj_type == 2 else tuple(res)

  @property
  def features(self) -> ProjectedFeatures:
    return ProjectedFeatures(self.specs, self.resize, self.cout, self.expand, self.proj_type)

  def feature_channels(self) -> tuple:
    """Official `CHANNELS` per backbone: the channels of the maps the heads see."""
    if self.proj_type == 2:
      return (csm_channels(self.cout, self.expand),) * len(self.specs)
    if self.proj_type == 1:
      return (ccm_channels(self.cout, self.expand),) * len(self.specs)
    maps = _feature_map_shapes(self.features, self.resolution)
    return tuple(tuple(m.shape[-1] for m in per_backbone) for per_backbone in maps)

  @property
  def heads(self) -> ProjectedHeads:
    res = self.nominal_resolutions
    return ProjectedHeads(tuple(s.name for s in self.specs), self.feature_channels(), (res,) * len(self.specs),
                          self.num_discs, self.label_dim, self.ndf, self.cmap_dim, self.embedding_shape)

  def _example_images(self, n: int = 1) -> Array:
    return jnp.zeros((n, self.resolution, self.resolution, 3), jnp.float32)

  def _example_labels(self, n: int = 1) -> Optional[Array]:
    return jnp.zeros((n, self.label_dim), jnp.float32) if self.label_dim else None

  def init(self, rng: Array, class_embedding: Optional[np.ndarray] = None) -> dict:
    """Fresh variables: random backbones (load pretrained ones with `load_backbones`), official random
    mixing layers and heads; conditional heads start from `class_embedding` ([1000, 320], GDD's pretrained
    table) when given, else from N(0, 1) (the official `rand_embedding`)."""
    feature_rng, head_rng = jax.random.split(rng)
    return {'features': self.init_features(feature_rng), 'heads': self.init_heads(head_rng, class_embedding)}

  def init_features(self, rng: Array) -> dict:
    """The frozen feature networks' fresh variables (`init`'s 'features' for the same key)."""
    return dict(_init_features(self.features, rng, self.resolution))

  def init_heads(self, rng: Array, class_embedding: Optional[np.ndarray] = None) -> dict:
    """The heads' fresh variables (`init`'s 'heads' for the same key); only the maps' shapes are computed."""
    maps = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  _feature_map_shapes(self.features, self.resolution))
    heads = dict(_init_heads(self.heads, rng, maps, self._example_labels()))
    if class_embedding is not None:
      heads = set_class_embedding(heads, class_embedding)
    return heads

  def load_backbones(self, variables: dict, state_dicts: Mapping[str, Mapping[str, Any]]) -> dict:
    """`variables` with each named backbone's weights replaced by its converted torchvision/timm state_dict.

    Every backbone must be given; conversion is strict (see each backbone's `variables_from_state_dict`).
    """
    missing = [s.name for s in self.specs if s.name not in state_dicts]
    unknown = sorted(set(state_dicts) - {s.name for s in self.specs})
    if missing or unknown:
      raise ValueError(f'load_backbones: missing weights for {missing}, unknown backbones {unknown}')
    features = {collection: dict(tree) for collection, tree in variables['features'].items()}
    for spec in self.specs:
      loaded = load_backbone_state_dict(spec.module, state_dicts[spec.name])
      for collection, tree in loaded.items():
        per_backbone = features.setdefault(collection, {})
        per_backbone[spec.name] = {**per_backbone.get(spec.name, {}), 'backbone': tree}
    return {**variables, 'features': features}

  def feature_maps(self, feature_variables: dict, images: Array) -> tuple:
    """The frozen feature networks' maps, per backbone (4 NHWC maps each)."""
    self._check_images(images)
    return self.features.apply(feature_variables, images)

  def apply(self, variables: dict, images: Array, labels: Optional[Array] = None, *, train: bool) -> tuple:
    """Logits of NHWC `images` in [-1, 1]: (tuple of [N, L_b] per backbone, updated head buffers).

    Each [N, L_b] is the official `MultiScaleD` output: the heads' logit maps flattened and concatenated.
    train=True is the official mode (batch-statistics batch norm; one spectral-norm power iteration, whose
    vectors come back in the updated buffers); train=False uses the stored statistics and vectors.
    """
    self._check_images(images)
    if self.label_dim and (labels is None or labels.shape != (images.shape[0], self.label_dim)):
      raise ValueError(f'ProjectedDiscriminator: conditional heads need one-hot labels of shape '
                       f'{(images.shape[0], self.label_dim)}, got {None if labels is None else labels.shape}')
    maps = self.features.apply(variables['features'], images)
    heads = variables['heads']
    if not train:
      return self.heads.apply(heads, maps, labels, False, self.batch_stat_groups), heads.get('buffers', {})
    logits, updates = self.heads.apply(heads, maps, labels, True, self.batch_stat_groups, mutable=['buffers'])
    return logits, updates['buffers']

  def _check_images(self, images: Array) -> None:
    if images.ndim != 4 or images.shape[1:] != (self.resolution, self.resolution, 3):
      raise ValueError(f'ProjectedDiscriminator: expected NHWC images [N, {self.resolution}, {self.resolution}, 3], '
                       f'got {images.shape}')


_CONVERTERS = ((vgg.VGG, vgg.variables_from_state_dict),
               (efficientnet.EfficientNet, efficientnet.variables_from_state_dict),
               (deit.DistilledVisionTransformer, deit.variables_from_state_dict))


def load_backbone_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> dict:
  """Strict conversion of a torchvision/timm state_dict with the converter of `module`'s family."""
  for cls, from_state_dict in _CONVERTERS:
    if isinstance(module, cls):
      return from_state_dict(module, state_dict)
  raise ValueError(f'no state_dict converter for {type(module).__name__}')


def set_class_embedding(head_variables: dict, table: np.ndarray) -> dict:
  """Head variables with every conditional head's `embed.weight` set to `table` (GDD loads one table into each)."""
  table = jnp.asarray(np.asarray(table, np.float32))

  def replace(path, leaf):
    names = [getattr(k, 'key', None) for k in path]
    if names[-2:] == ['embed', 'weight']:
      if leaf.shape != table.shape:
        raise ValueError(f'set_class_embedding: table of shape {table.shape}, heads expect {leaf.shape}')
      return table
    return leaf

  params = jax.tree_util.tree_map_with_path(replace, head_variables['params'])
  return {**head_variables, 'params': params}


# ---------------------------------------------------------------------------------------------------------
# The official GDD losses (Zyriix/GDD training/loss.py, --loss-type ns --r1-type r1).
#
# `ProjectedDiscriminatorOnly.forward` extends a Python list with each backbone's [N, L_b] tensor, so the
# list holds one row per sample and backbone, and each loss is a sum over those rows of the row's mean:
# Σ_b Σ_i mean_j f(l_bij). This is the loss of one GPU; DistributedDataParallel then averages gradients over
# GPUs, so for a global batch split over `num_replicas` GPUs the equivalent loss is that sum / num_replicas.

def _row_mean_sum(logits: Sequence[Array], fn: Callable[[Array], Array]) -> Array:
  return sum(jnp.sum(jnp.mean(fn(l), axis=1)) for l in logits)


def generator_loss(fake_logits: Sequence[Array], num_replicas: int = 1) -> Array:
  """G-main: Σ_rows mean softplus(−l(x_g)) (non-saturating)."""
  return _row_mean_sum(fake_logits, lambda l: jax.nn.softplus(-l)) / num_replicas


def discriminator_loss(fake_logits: Sequence[Array], real_logits: Sequence[Array], num_replicas: int = 1) -> Array:
  """D-main: Σ_rows mean softplus(l(x_g)) + Σ_rows mean softplus(−l(x_real))."""
  fake = _row_mean_sum(fake_logits, jax.nn.softplus)
  real = _row_mean_sum(real_logits, lambda l: jax.nn.softplus(-l))
  return (fake + real) / num_replicas


def r1_penalty(logits_fn: Callable[[Array], Any], real_images: Array, has_aux: bool = False) -> tuple:
  """(per-sample ‖∇_x Σ(all logits of the batch)‖², logits_fn(real_images)), as the official D-R1 stage.

  `logits_fn(images)` returns the sequence of per-backbone logits, or with `has_aux` a pair (logits, aux),
  e.g. the updated head buffers. The gradient is that of the batch's total, so training-mode batch norm
  couples the samples exactly as in torch.
  """
  def total(x):
    out = logits_fn(x)
    logits = out[0] if has_aux else out
    return sum(jnp.sum(l) for l in logits), out

  grads, out = jax.grad(total, has_aux=True)(real_images)
  return jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))), out


def r1_loss(penalty: Array, gamma: float) -> Array:
  """D-R1: mean(γ/2 · penalty). The official lazy schedule runs it every 16 iterations (not at 0) with gain 16."""
  return jnp.mean(penalty * (gamma / 2))
