"""Shared by the backbone and Projected-GAN tests, and the script that writes tests/data/backbones.

* `recipe_state_dict`: deterministic weights for any (name, shape) list from numpy's frozen legacy
  RandomState stream, so reference outputs can be stored without their weights.
* Reduced-width configurations of the three feature networks, for our modules and for torchvision/timm.
* The official GDD discriminator (Zyriix/GDD `pg_modules/`), built from a checkout named by
  $GDD_OFFICIAL_SRC with torchvision/timm constructors swapped for random (optionally reduced) networks, and
  the map from its state_dict names to ours.

Regenerate the stored references (needs torch, torchvision, timm and the official checkout):

  GDD_OFFICIAL_SRC=/path/to/GDD python tests/backbone_reference.py
"""
import contextlib
import functools
import importlib.util
import os
import pathlib
import re
import sys
import types
import zlib

import numpy as np

DATA = pathlib.Path(__file__).resolve().parent / 'data' / 'backbones'

# Reduced-width networks with the full networks' layouts (same taps, same Projected-GAN slicing).
TINY_VGG_CONFIG = (8, 8, 'M', 8, 8, 'M', 16, 16, 16, 'M', 16, 16, 16, 'M', 32, 32, 32, 'M')
TINY_EFFICIENTNET = dict(
    stages=(('ds', 1, 3, 1, 1, 8), ('ir', 1, 3, 2, 2, 8), ('ir', 2, 5, 2, 2, 16), ('ir', 1, 3, 2, 2, 16),
            ('ir', 1, 5, 1, 2, 24), ('ir', 2, 5, 2, 2, 24), ('ir', 1, 3, 1, 2, 32)),
    stem_channels=8, head_channels=32, num_classes=10)
TINY_DEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TINY_DEIT_TAPS = (0, 1, 2, 3)
# The official code picks ViT reassemble widths by name; its smallest supported DeiT is the real deit-tiny.
DEIT_TINY_NAME = 'deit_tiny_distilled_patch16_224'
DEIT_TINY = dict(embed_dim=192, depth=12, num_heads=3)
RECIPE_SEED = 7


def recipe_state_dict(shapes: dict, seed: int) -> dict:
  """name -> float32 array for every (name, shape): a fixed function of (seed, name, shape).

  Scales keep activations O(1) through deep stacks: matrices U(±√(3/fan_in)); norm scales 1 ± 0.2; biases
  and running means ±0.1/±0.2; running variances in [0.5, 1.5]; spectral-norm vectors unit length; ViT
  tokens and position embeddings ±0.5.
  """
  out = {}
  for name, shape in shapes.items():
    shape = tuple(shape)
    rng = np.random.RandomState((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 32))
    leaf = name.rsplit('.', 1)[-1]
    if leaf in ('weight_u', 'weight_v'):
      v = rng.standard_normal(shape)
      value = v / np.linalg.norm(v)
    elif leaf == 'running_var':
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == 'running_mean':
      value = rng.uniform(-0.2, 0.2, shape)
    elif leaf in ('cls_token', 'dist_token', 'pos_embed'):
      value = rng.uniform(-0.5, 0.5, shape)
    elif len(shape) >= 2:
      fan_in = int(np.prod(shape[1:]))
      value = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / fan_in)
    elif leaf == 'bias':
      value = rng.uniform(-0.1, 0.1, shape)
    else:  # 1-D scales (batch/layer norm weights)
      value = 1 + rng.uniform(-0.2, 0.2, shape)
    out[name] = value.astype(np.float32)
  return out


def template_shapes(variables_template: dict) -> dict:
  from sida_jax.models.backbones import torch_layers
  from flax import traverse_util
  flat = {c: traverse_util.flatten_dict(t) for c, t in variables_template.items()}
  return {name: tuple(flat[c][p].shape) for name, (c, p) in torch_layers.state_dict_names(variables_template).items()}


def nhwc(x):
  return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 2, 3, 1)))


def nchw(x):
  return np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------------------
# Our modules.

def tiny_vgg(include_head=False):
  from sida_jax.models.backbones import vgg
  return vgg.VGG(config=TINY_VGG_CONFIG, include_head=include_head)


def tiny_efficientnet(include_head=True):
  from sida_jax.models.backbones import efficientnet
  return efficientnet.EfficientNet(include_head=include_head, **TINY_EFFICIENTNET)


def tiny_deit(include_head=True):
  from sida_jax.models.backbones import deit
  return deit.DistilledVisionTransformer(taps=TINY_DEIT_TAPS, include_head=include_head, **TINY_DEIT)


def reduced_specs():
  """BackboneSpecs of the reduced networks under the official names (DeiT: the official deit-tiny)."""
  from sida_jax.models import projected_gan as pg
  from sida_jax.models.backbones import deit
  return {
      'vgg16_bn': pg.BackboneSpec('vgg16_bn', tiny_vgg(), *pg.IMAGENET_STATS),
      'tf_efficientnet_lite0': pg.BackboneSpec('tf_efficientnet_lite0', tiny_efficientnet(False), *pg.INCEPTION_STATS),
      DEIT_TINY_NAME: pg.BackboneSpec(DEIT_TINY_NAME, deit.DistilledVisionTransformer(include_head=False, **DEIT_TINY),
                                      *pg.IMAGENET_STATS, readout_features=pg.VIT_READOUT_FEATURES['tiny']),
  }


# ---------------------------------------------------------------------------------------------------------
# torchvision / timm counterparts.

def torch_tiny_vgg():
  import torch
  import torchvision
  module = torch.nn.Module()
  module.features = torchvision.models.vgg.make_layers(list(TINY_VGG_CONFIG), batch_norm=True)
  return module.eval()


def _timm_arch(stages):
  return [[f'{b}_r{r}_k{k}_s{s}_e{e}_c{c}'] for b, r, k, s, e, c in stages]


def torch_tiny_efficientnet():
  import torch
  from timm.models._efficientnet_builder import decode_arch_def
  from timm.models.efficientnet import EfficientNet
  cfg = TINY_EFFICIENTNET
  return EfficientNet(block_args=decode_arch_def(_timm_arch(cfg['stages'])), num_classes=cfg['num_classes'],
                      num_features=cfg['head_channels'], stem_size=cfg['stem_channels'], fix_stem=True,
                      pad_type='same', act_layer=torch.nn.ReLU6,
                      norm_layer=functools.partial(torch.nn.BatchNorm2d, eps=1e-3)).eval()


def torch_tiny_deit():
  from timm.models.deit import VisionTransformerDistilled
  return VisionTransformerDistilled(**TINY_DEIT).eval()


def load_recipe_into_torch(model, seed):
  """Recipe weights for every parameter and buffer of a torch module (counters untouched)."""
  import torch
  sd = model.state_dict()
  shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  values = recipe_state_dict(shapes, seed)
  model.load_state_dict({k: torch.from_numpy(values[k]) if k in values else v for k, v in sd.items()})
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def perturb_batch_norm(model, seed=0):
  """Random running statistics and affine parameters in every batch norm, so evaluation mode is exercised."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
  return model.eval()


def saved_state_dict(model, folder, file_format):
  """The model's state_dict written by torch ('pth': torch.save, or safetensors) and read back without torch."""
  if file_format == 'pth':
    import torch
    from sida_jax.formats.torch_files import read_torch_file
    path = pathlib.Path(folder) / 'weights.pth'
    torch.save(model.state_dict(), path)
    return read_torch_file(path)
  from safetensors import numpy as safetensors_numpy
  from safetensors import torch as safetensors_torch
  path = pathlib.Path(folder) / 'weights.safetensors'
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  return safetensors_numpy.load_file(str(path))


def hooked_outputs(model, x, modules):
  """(outputs of `modules` during model(x), model's output) for an NCHW numpy input."""
  import torch
  outputs = []
  hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().numpy())) for m in modules]
  with torch.no_grad():
    result = model(torch.from_numpy(x))
  for h in hooks:
    h.remove()
  return outputs, result.numpy()


def assert_close(ours, ref, rel=1e-4):
  """|ours − ref| ≤ rel · max|ref| elementwise."""
  ref = np.asarray(ref)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=rel * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------------------
# The official discriminator.

@contextlib.contextmanager
def official_code(src, constructors):
  """Imports the official modules from `src` with backbone constructors replaced by `constructors`.

  Nothing in `src` changes. For this process only: torchvision's `vgg16_bn` and `timm.create_model` return
  `constructors[name]()`; timm >= 0.9 folds `act1` into `bn1` (BatchNormAct2d), so an identity `act1` is
  added for the official slicing; stand-ins for `ftfy` (imported by the unused CLIP tokenizer) and for
  `dill._dill._load_type` (named by the class-embedding pickle) are registered when those are missing.
  """
  import timm
  import torch
  import torchvision
  stubs = {}
  if importlib.util.find_spec('ftfy') is None:
    stubs['ftfy'] = types.ModuleType('ftfy')
  if importlib.util.find_spec('dill') is None:
    dill_stub, dill_inner = types.ModuleType('dill'), types.ModuleType('dill._dill')
    dill_inner._load_type = {'set': set}.__getitem__
    dill_stub._dill = dill_inner
    stubs.update({'dill': dill_stub, 'dill._dill': dill_inner})

  def create_model(name, pretrained=False, **kwargs):
    del pretrained, kwargs
    model = constructors[name]()
    if not hasattr(model, 'act1') and hasattr(model, 'bn1'):
      model.act1 = torch.nn.Identity()
    return model

  saved = (timm.create_model, torchvision.models.__dict__.get('vgg16_bn'), list(sys.path), os.getcwd())
  sys.modules.update(stubs)
  timm.create_model = create_model
  torchvision.models.vgg16_bn = lambda *args, **kwargs: constructors['vgg16_bn']()
  sys.path.insert(0, str(src))
  os.chdir(src)  # the conditional heads open in_embeddings/ relative to the working directory
  try:
    from pg_modules import discriminator
    yield discriminator
  finally:
    timm.create_model, vgg16_bn, sys.path[:], cwd = saved
    torchvision.models.vgg16_bn = vgg16_bn
    os.chdir(cwd)
    for name in stubs:
      sys.modules.pop(name, None)


def official_modules(src, backbones, resolution, cond, constructors, interp224=True):
  """(features, heads) exactly as GDD's training_loop constructs them."""
  with official_code(src, constructors) as discriminator:
    interp = resolution < 224 and interp224
    kwargs = dict(cout=64, expand=True, proj_type=2, num_discs=4, cond=int(cond), rand_embedding=False,
                  im_res=resolution if resolution >= 224 or not interp224 else 256)
    features = discriminator.ProjectedFeatureOnly(backbones=list(backbones), diffaug=False, interp224=interp,
                                                  backbone_kwargs=kwargs)
    features = features.train().requires_grad_(False)
    channels = [f.CHANNELS for _, f in features.feature_networks.items()]
    resolutions = [f.RESOLUTIONS for _, f in features.feature_networks.items()]
    heads = discriminator.ProjectedDiscriminatorOnly(backbones=list(backbones), diffaug=False, interp224=interp,
                                                     backbone_kwargs=kwargs, channels=channels,
                                                     resolutions=resolutions)
    return features, heads.train().requires_grad_(True)


def _efficientnet_name(rest):
  """Official EfficientNet slices (conv_stem, bn1, act1, blocks[0:2] | blocks[2:3] | blocks[3:5] | blocks[5:9])."""
  level, index, tail = re.match(r'layer(\d)\.(\d+)\.(.*)', rest).groups()
  level, index = int(level), int(index)
  if level == 0 and index < 3:
    return f'{("conv_stem", "bn1")[index]}.{tail}'
  stage = {0: index - 3, 1: 2 + index, 2: 3 + index, 3: 5 + index}[level]
  return f'blocks.{stage}.{tail}'


def our_feature_name(kind, name):
  """Official `feature_networks.{backbone}.…` name -> our name in the features variables, or None if unused."""
  backbone, rest = re.match(r'feature_networks\.([^.]+)\.(.*)', name).groups()
  if rest.startswith('scratch.'):
    return f'{backbone}.{rest}'
  rest = rest[len('pretrained.'):]
  if kind == 'vgg':
    ours = 'features.' + re.match(r'layer\d\.0\.(.*)', rest).group(1)
  elif kind == 'efficientnet':
    ours = _efficientnet_name(rest)
  elif rest.startswith('model.'):
    ours = rest[len('model.'):]
    if re.match(r'(norm|head|head_dist)\.', ours):  # computed or held but never used by the discriminator
      return None
  else:
    return f'{backbone}.readout.{rest}'
  return f'{backbone}.backbone.{ours}'


def backbone_kind(name):
  return 'vgg' if name.startswith('vgg') else 'deit' if 'deit' in name else 'efficientnet'


def official_to_ours(features_sd, heads_sd):
  """Our (features, heads) flat state_dicts from the official modules' state_dicts."""
  features = {}
  for name, value in features_sd.items():
    if name.endswith('num_batches_tracked'):
      continue
    ours = our_feature_name(backbone_kind(name.split('.')[1]), name)
    if ours is not None:
      features[ours] = value
  heads = {name[len('discriminators.'):]: value for name, value in heads_sd.items()
           if not name.endswith('num_batches_tracked')}
  return features, heads


def templates(disc):
  """Shapes of a ProjectedDiscriminator's (features, heads) variables, without computing anything."""
  import jax
  images = disc._example_images()
  features = jax.eval_shape(lambda: disc.features.init(jax.random.key(0), images))
  maps = jax.eval_shape(disc.features.apply, features, images)
  heads = jax.eval_shape(lambda: disc.heads.init(jax.random.key(0), maps, disc._example_labels(), False))
  return features, heads


def discriminator_variables(disc, features_state_dict, heads_state_dict):
  """Strictly loaded ProjectedDiscriminator variables from flat state_dicts in our names."""
  from sida_jax.models.backbones import torch_layers
  features, heads = templates(disc)
  return {'features': torch_layers.load_state_dict(features, features_state_dict, 'features'),
          'heads': torch_layers.load_state_dict(heads, heads_state_dict, 'heads')}


def recipe_discriminator_variables(disc, seed=RECIPE_SEED):
  features, heads = templates(disc)
  return discriminator_variables(disc, recipe_state_dict(template_shapes(features), seed),
                                 recipe_state_dict(template_shapes(heads), seed))


def load_recipe_into_official(features, heads, seed):
  """Fills both official modules from the recipe keyed by our names (unused official tensors untouched)."""
  import torch
  for module, rename in ((features, lambda k: our_feature_name(backbone_kind(k.split('.')[1]), k)),
                         (heads, lambda k: k[len('discriminators.'):])):
    sd = module.state_dict()
    names = {k: rename(k) for k in sd if not k.endswith('num_batches_tracked')}
    names = {k: v for k, v in names.items() if v is not None}
    values = recipe_state_dict({names[k]: tuple(sd[k].shape) for k in names}, seed)
    module.load_state_dict({k: torch.from_numpy(values[names[k]]) if k in names else v for k, v in sd.items()})


def run_official(features, heads, x_fake, x_real, labels):
  """The official modules on one state (inputs NHWC numpy; the modules' dtype is used):

  'maps': the frozen feature maps of x_real; 'eval': heads in evaluation mode on x_real (state unchanged);
  then the training-mode sequence of a GDD D step: 'fake' on x_fake (with 'u_after_fake', the spectral-norm
  u vectors it leaves), 'real' on x_real, and the R1 stage on x_real ('r1_penalty', 'r1_logits'), after
  which 'buffers' holds every head buffer.
  Logits are regrouped from the official per-sample list into one [N, L_b] array per backbone.
  """
  import torch
  dtype = next(heads.parameters()).dtype
  as_input = lambda x: torch.from_numpy(nchw(x)).to(dtype)
  c = torch.from_numpy(labels).to(dtype) if labels is not None else torch.zeros(x_fake.shape[0], 0, dtype=dtype)
  b = len(features.feature_networks)
  out = {}
  heads.eval()
  with torch.no_grad():
    maps = features(as_input(x_real))
    out['maps'] = [[nhwc(m[k].numpy()) for k in sorted(m)] for m in maps]
    out['eval'] = _per_backbone(heads(maps, c), b, x_real.shape[0])
  heads.train()
  with torch.no_grad():
    out['fake'] = _per_backbone(heads(features(as_input(x_fake)), c), b, x_fake.shape[0])
    out['u_after_fake'] = _head_buffers(heads, ('weight_u',))
    out['real'] = _per_backbone(heads(features(as_input(x_real)), c), b, x_real.shape[0])
  real = as_input(x_real).requires_grad_(True)
  rows = heads(features(real), c)
  grad, = torch.autograd.grad(sum(r.sum() for r in rows), real)
  out['r1_penalty'] = grad.square().sum((1, 2, 3)).detach().numpy()
  out['r1_logits'] = _per_backbone([r.detach() for r in rows], b, x_real.shape[0])
  out['buffers'] = _head_buffers(heads, ('weight_u', 'weight_v', 'running_mean', 'running_var'))
  return out


def _head_buffers(heads, suffixes):
  return {k[len('discriminators.'):]: v.detach().numpy().copy() for k, v in heads.state_dict().items()
          if k.endswith(suffixes)}


def _per_backbone(rows, num_backbones, n):
  """The official list (one row per sample, backbone-major) regrouped into [N, L_b] arrays."""
  assert len(rows) == num_backbones * n
  return [np.stack([rows[b * n + i].numpy() for i in range(n)]) for b in range(num_backbones)]


# ---------------------------------------------------------------------------------------------------------
# Reference files.

DISCRIMINATOR_CASES = {
    # name: (backbones, resolution, label_dim)
    'gdd_d_vgg_effnet_uncond': (('vgg16_bn', 'tf_efficientnet_lite0'), 32, 0),
    'gdd_d_deit_effnet_cond': ((DEIT_TINY_NAME, 'tf_efficientnet_lite0'), 32, 10),
}


def reduced_constructors():
  """Constructors of the reduced networks (bound before `official_code` swaps timm.create_model)."""
  import timm
  return {'vgg16_bn': torch_tiny_vgg, 'tf_efficientnet_lite0': torch_tiny_efficientnet,
          DEIT_TINY_NAME: functools.partial(timm.create_model, DEIT_TINY_NAME, pretrained=False)}


def discriminator_inputs(resolution, label_dim, n=2, seed=0):
  rng = np.random.RandomState(seed)
  x_fake = rng.uniform(-1, 1, (n, resolution, resolution, 3)).astype(np.float32)
  x_real = rng.uniform(-1, 1, (n, resolution, resolution, 3)).astype(np.float32)
  labels = np.eye(label_dim, dtype=np.float32)[rng.randint(0, label_dim, n)] if label_dim else None
  return x_fake, x_real, labels


def official_discriminator_reference(src, case, dtype=None):
  """Inputs and official outputs (see run_official) for a DISCRIMINATOR_CASES entry on recipe weights."""
  import torch
  backbones, resolution, label_dim = DISCRIMINATOR_CASES[case]
  torch.manual_seed(0)
  features, heads = official_modules(src, backbones, resolution, label_dim > 0, reduced_constructors())
  load_recipe_into_official(features, heads, RECIPE_SEED)
  if dtype is not None:
    features.to(dtype), heads.to(dtype)
  inputs = discriminator_inputs(resolution, label_dim)
  return inputs, run_official(features, heads, *inputs)


def backbone_references():
  """Reduced torchvision/timm networks on recipe weights: inputs and outputs at the taps (and logits)."""
  refs = {}
  rng = np.random.RandomState(1)
  vgg_model = torch_tiny_vgg()
  load_recipe_into_torch(vgg_model, RECIPE_SEED)
  x = rng.standard_normal((2, 3, 40, 40)).astype(np.float32)
  taps = [vgg_model.features[i - 1] for i in (13, 23, 33, 43)]
  refs['vgg_tiny'] = dict(input=nhwc(x), **_taps(vgg_model.features, x, taps))
  eff = torch_tiny_efficientnet()
  load_recipe_into_torch(eff, RECIPE_SEED)
  x = rng.standard_normal((2, 3, 36, 36)).astype(np.float32)
  refs['efficientnet_tiny'] = dict(input=nhwc(x), **_taps(eff, x, [eff.blocks[i] for i in (1, 2, 4, 6)]))
  vit = torch_tiny_deit()
  load_recipe_into_torch(vit, RECIPE_SEED)
  x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  refs['deit_tiny'] = dict(input=nhwc(x), **_taps(vit, x, [vit.blocks[i] for i in TINY_DEIT_TAPS], tokens=True))
  return refs


def _taps(model, x, modules, tokens=False):
  outputs, result = hooked_outputs(model, x, modules)
  taps = {f'tap{i}': (o if tokens else nhwc(o)) for i, o in enumerate(outputs)}
  if result.ndim == 2:
    taps['logits'] = result
  return taps


def main():
  src = os.environ.get('GDD_OFFICIAL_SRC')
  if not src:
    raise SystemExit('set GDD_OFFICIAL_SRC to a checkout of Zyriix/GDD')
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  DATA.mkdir(parents=True, exist_ok=True)
  for name, arrays in backbone_references().items():
    np.savez_compressed(DATA / f'{name}.npz', **arrays)
  for case in DISCRIMINATOR_CASES:
    (x_fake, x_real, labels), out = official_discriminator_reference(src, case)
    arrays = dict(x_fake=x_fake, x_real=x_real)
    if labels is not None:
      arrays['labels'] = labels
    for key in ('eval', 'fake'):
      arrays.update({f'logits_{key}/{b}': v for b, v in enumerate(out[key])})
    arrays.update({f'u_after_fake/{k}': v for k, v in out['u_after_fake'].items()})
    np.savez_compressed(DATA / f'{case}.npz', **arrays)
  for f in sorted(DATA.glob('*.npz')):
    print(f'{f.name}: {f.stat().st_size / 1024:.1f} KiB')


if __name__ == '__main__':
  main()
