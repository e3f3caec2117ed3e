"""GDD's Projected-GAN discriminator against the official modules (stored outputs; live with torch), its
architecture facts, and the official losses on fixed logits."""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import backbone_reference as ref
from sida_jax.models import projected_gan as pg
from sida_jax.models.backbones import torch_layers

GDD_CONFIGS = {  # train.sh: --backbone 1 (CIFAR-10) and --backbone 0 (AFHQv2, FFHQ, ImageNet)
    'vgg_effnet': ('vgg16_bn', 'tf_efficientnet_lite0'),
    'deit_effnet': ('deit_base_distilled_patch16_224', 'tf_efficientnet_lite0'),
}
# Counted on the official modules (sum of numel over parameters, per backbone).
OFFICIAL_HEAD_PARAMS = {0: 10_331_328, 10: 13_757_888}
OFFICIAL_FEATURE_PARAMS = {'vgg16_bn': 15_334_912, 'tf_efficientnet_lite0': 3_335_616,
                           # the official module also holds DeiT's unused norm, head and head_dist (1,539,536)
                           'deit_base_distilled_patch16_224': 94_749_776 - 1_539_536}


def _logit_count(map_size, nominal, end=8, kernel=4):
  """Logits of one head from conv arithmetic: 4×4/2 pad-1 convs halve (floor) the map from `nominal` down
  to `end`, then a k×k valid conv."""
  size = map_size
  while nominal > end:
    size, nominal = size // 2, nominal // 2
  return (size - kernel + 1) ** 2


@pytest.mark.parametrize('config', sorted(GDD_CONFIGS))
@pytest.mark.parametrize('resolution,label_dim', [(32, 0), (64, 10)])
def test_official_architecture(config, resolution, label_dim):
  disc = pg.ProjectedDiscriminator(backbones=GDD_CONFIGS[config], resolution=resolution, label_dim=label_dim)
  assert disc.resize and disc.nominal_resolutions == (128, 64, 32, 16)  # im_res 256 under 224, ×2 by the CSM
  assert disc.feature_channels() == ((64, 64, 128, 256),) * 2            # cout 64, expand
  assert pg.head_plan(64, 128, 8) == (((64, 64), (64, 128), (128, 256), (256, 512)), 512)
  assert pg.head_plan(256, 16, 8) == (((256, 512),), 512)
  features, heads = ref.templates(disc)
  for name in GDD_CONFIGS[config]:
    assert torch_layers.count_params({'params': features['params'][name]}) == OFFICIAL_FEATURE_PARAMS[name]
    assert torch_layers.count_params({'params': heads['params'][name]}) == OFFICIAL_HEAD_PARAMS[label_dim]
  logits = jax.eval_shape(lambda v, x, c: disc.apply(v, x, c, train=True)[0], {'features': features, 'heads': heads},
                          disc._example_images(3), disc._example_labels(3))
  for name, out in zip(GDD_CONFIGS[config], logits):
    first_map = 224 if name == 'vgg16_bn' else 112   # VGG's first tap is at 1/2, the others' at 1/4 (then ×2)
    expected = sum(_logit_count(first_map >> k, nominal) for k, nominal in enumerate(disc.nominal_resolutions))
    assert out.shape == (3, expected)
  assert [o.shape[1] for o in logits] == ([484, 64] if config == 'vgg_effnet' else [64, 64])


NO_OPT = {'xla_backend_optimization_level': 0}  # tiny graphs: compile time dominates


def _jitted_apply(disc, train):
  """disc.apply compiled for CPU speed; logits come back as numpy arrays."""
  fn = jax.jit(lambda v, x, c=None: disc.apply(v, x, c, train=train), compiler_options=NO_OPT)

  def call(*args):
    logits, buffers = fn(*args)
    return [np.asarray(l) for l in logits], buffers

  return call


@pytest.mark.parametrize('case', sorted(ref.DISCRIMINATOR_CASES))
def test_matches_official_reference(case):
  """Reduced backbones (official names, narrow widths) + the official mixing layers and heads, recipe weights."""
  data = np.load(ref.DATA / f'{case}.npz')
  backbones, resolution, label_dim = ref.DISCRIMINATOR_CASES[case]
  specs = ref.reduced_specs()
  disc = pg.ProjectedDiscriminator(backbones=tuple(specs[b] for b in backbones), resolution=resolution,
                                   label_dim=label_dim)
  variables = ref.recipe_discriminator_variables(disc)
  labels = data['labels'] if label_dim else None
  logits, _ = _jitted_apply(disc, False)(variables, data['x_real'], labels)
  for b, out in enumerate(logits):
    ref.assert_close(out, data[f'logits_eval/{b}'])
  logits, buffers = _jitted_apply(disc, True)(variables, data['x_fake'], labels)
  for b, out in enumerate(logits):
    ref.assert_close(out, data[f'logits_fake/{b}'])
  flat = torch_layers.state_dict_from_variables({'buffers': buffers})
  names = [k[len('u_after_fake/'):] for k in data.files if k.startswith('u_after_fake/')]
  assert sorted(names) == sorted(k for k in flat if k.endswith('weight_u'))
  for name in names:
    ref.assert_close(flat[name], data[f'u_after_fake/{name}'])


def _official_rows(logits):
  """The official logits list: one row per sample, all samples of backbone 0 first."""
  return [row for per_backbone in logits for row in per_backbone]


def _softplus(x):
  return np.logaddexp(0, x)


def test_gdd_losses_on_fixed_logits():
  rng = np.random.RandomState(0)
  fake = [rng.standard_normal((3, 484)) * 3, rng.standard_normal((3, 64)) * 3]
  real = [rng.standard_normal((3, 484)) * 3, rng.standard_normal((3, 64)) * 3]
  # training/loss.py: sum([F.softplus(-l).mean() for l in g_logits]) over the list's rows, likewise for D.
  g_ref = sum(_softplus(-row).mean() for row in _official_rows(fake))
  d_ref = sum(_softplus(row).mean() for row in _official_rows(fake)) + sum(_softplus(-row).mean()
                                                                           for row in _official_rows(real))
  as_jax = lambda ls: [jnp.asarray(l, jnp.float32) for l in ls]
  np.testing.assert_allclose(pg.generator_loss(as_jax(fake)), g_ref, rtol=1e-6)
  np.testing.assert_allclose(pg.discriminator_loss(as_jax(fake), as_jax(real)), d_ref, rtol=1e-6)
  np.testing.assert_allclose(pg.generator_loss(as_jax(fake), num_replicas=4), g_ref / 4, rtol=1e-6)


def test_r1_penalty_closed_form():
  rng = np.random.RandomState(1)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  a = rng.standard_normal((48, 5)).astype(np.float32)

  def logits_fn(images):  # Σ logits = Σ_j (x A)_j + Σ x²  ->  ∇ = A·1 + 2x per sample
    flat = images.reshape(images.shape[0], -1)
    return [flat @ a, jnp.sum(flat ** 2, axis=1, keepdims=True)], 'aux'

  grad = a.sum(1)[None] + 2 * x.reshape(2, -1)
  expected = (grad.astype(np.float64) ** 2).sum(1)
  penalty, (logits, aux) = pg.r1_penalty(logits_fn, jnp.asarray(x), has_aux=True)
  np.testing.assert_allclose(penalty, expected, rtol=1e-5)
  assert aux == 'aux' and logits[0].shape == (2, 5)
  penalty, _ = pg.r1_penalty(lambda im: logits_fn(im)[0], jnp.asarray(x))
  np.testing.assert_allclose(pg.r1_loss(penalty, 1e-4), expected.mean() * 1e-4 / 2, rtol=1e-5)


def _small(resolution, **kwargs):
  """Reduced backbones, 8-channel mixing and 16-channel heads."""
  specs = ref.reduced_specs()
  return pg.ProjectedDiscriminator(backbones=(specs['vgg16_bn'], specs['tf_efficientnet_lite0']),
                                   resolution=resolution, cout=8, ndf=16, **kwargs)


def test_small_images_32_native_size():
  disc = _small(32, interp224=False, batch_stat_groups=2)
  # im_res 32: nominal (16, 8, 4, 2), ending at 2 with 1×1 final convs. Actual maps: VGG 32..4, EfficientNet 16..2.
  assert disc.nominal_resolutions == (16, 8, 4, 2)
  variables = ref.recipe_discriminator_variables(disc)
  x = np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  train, evaluate = _jitted_apply(disc, True), _jitted_apply(disc, False)
  logits, buffers = train(variables, x)
  assert [l.shape for l in logits] == [(4, sum(_logit_count(32 >> k, n, 2, 1) for k, n in enumerate((16, 8, 4, 2)))),
                                       (4, sum(_logit_count(16 >> k, n, 2, 1) for k, n in enumerate((16, 8, 4, 2))))]
  assert [l.shape[1] for l in logits] == [64, 16]
  # Training-mode batch norm takes statistics per group of 2 samples (one group per device officially).
  repeated, _ = train(variables, x[[0, 1, 0, 1]])
  swapped, _ = train(variables, x[[0, 2, 1, 3]])
  for b in range(2):
    np.testing.assert_allclose(repeated[b][:2], logits[b][:2], rtol=1e-5, atol=1e-5 * np.abs(logits[b]).max())
    np.testing.assert_allclose(repeated[b][2:], logits[b][:2], rtol=1e-5, atol=1e-5 * np.abs(logits[b]).max())
    assert not np.allclose(swapped[b][0], logits[b][0], rtol=1e-3)  # another partner, other statistics
  # Evaluation mode has no batch coupling.
  evaluated, same = evaluate(variables, x)
  permuted, _ = evaluate(variables, x[[2, 0, 3, 1]])
  for b in range(2):
    np.testing.assert_allclose(permuted[b], evaluated[b][[2, 0, 3, 1]], rtol=1e-5,
                               atol=1e-5 * np.abs(evaluated[b]).max())
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), same,
                                                         variables['heads']['buffers']))
  # A training call moves every spectral-norm vector v (one power iteration each; u too, unless 1-D: ±1).
  moved = torch_layers.state_dict_from_variables({'buffers': jax.tree_util.tree_map(
      lambda a, b: jnp.abs(a - b).max(), variables['heads']['buffers'], buffers)})
  assert min(v for k, v in moved.items() if k.endswith('weight_v')) > 0


def test_small_images_16_resized_conditional():
  """The official default path: 16×16 images resized to 224, heads planned for im_res 256; class projection."""
  disc = _small(16, label_dim=10, embedding_shape=(12, 6))
  assert disc.resize and disc.nominal_resolutions == (128, 64, 32, 16)
  variables = ref.recipe_discriminator_variables(disc)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  evaluate = _jitted_apply(disc, False)
  logits, _ = evaluate(variables, x, np.eye(10, dtype=np.float32)[[3, 3]])
  other, _ = evaluate(variables, x, np.eye(10, dtype=np.float32)[[3, 5]])
  assert [l.shape[1] for l in logits] == [484, 64]
  for b in range(2):
    np.testing.assert_allclose(logits[b][0], other[b][0], rtol=1e-6)  # row 0 keeps class 3
    assert not np.allclose(logits[b][1], other[b][1], rtol=1e-3)      # row 1 changes class
  with pytest.raises(ValueError, match='one-hot labels of shape \\(2, 10\\)'):
    disc.apply(variables, x, None, train=False)
  with pytest.raises(ValueError, match='expected NHWC images \\[N, 16, 16, 3\\]'):
    disc.apply(variables, x[:, :8], None, train=False)
  with pytest.raises(ValueError, match='20 classes exceed the 12-row class embedding'):
    _small(32, label_dim=20, embedding_shape=(12, 6))
  vgg_only = pg.ProjectedDiscriminator(backbones=(ref.reduced_specs()['vgg16_bn'],), resolution=16, interp224=False)
  with pytest.raises(ValueError, match='no head width for end size 0'):  # the official code: KeyError
    ref.templates(vgg_only)


def test_a_second_discriminator_of_the_same_architecture_compiles_no_init(compile_events):
  """Built apart with equal settings (a resumed run's), it reuses the compiled inits: same key, same
  variables, and no compile; another key gives other variables."""
  def build():
    return pg.ProjectedDiscriminator(backbones=(ref.reduced_specs()['tf_efficientnet_lite0'],), resolution=32,
                                     interp224=False, label_dim=0, cout=8, ndf=16)
  first = build().init(jax.random.key(7))
  compiles = compile_events.count('/jax/core/compile/backend_compile_duration')
  again = build().init(jax.random.key(7))
  other = build().init(jax.random.key(8))
  assert compile_events.count('/jax/core/compile/backend_compile_duration') == compiles
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first['heads']), jax.tree.leaves(other['heads'])))


def test_init_follows_official_initialisers():
  """PyTorch defaults (U(±1/√fan_in)) for the random mixing convs and head convs, unit spectral-norm vectors,
  batch norm 1/0 with statistics 0/1, N(0, 1) class embeddings and projection weights; a given class table
  lands in every conditional head."""
  disc = pg.ProjectedDiscriminator(backbones=(ref.reduced_specs()['tf_efficientnet_lite0'],), resolution=32,
                                   interp224=False, label_dim=10, cout=8, ndf=16)
  table = np.random.RandomState(0).standard_normal(pg.EMBEDDING_SHAPE).astype(np.float32)
  variables = disc.init(jax.random.key(0), class_embedding=table)
  features = torch_layers.state_dict_from_variables(variables['features'])
  heads = torch_layers.state_dict_from_variables(variables['heads'])
  scratch = {k: v for k, v in features.items() if '.scratch.' in k}
  assert len(scratch) == 16  # CCM and CSM: 8 convs with bias
  for name, value in {**scratch, **{k: v for k, v in heads.items() if k.endswith(('weight_orig', 'main.0.bias'))}
                      }.items():
    fan_in = value[0].size if value.ndim > 1 else heads.get(name[:-4] + 'weight_orig', scratch.get(
        name[:-4] + 'weight', np.zeros((1, 1))))[0].size
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(value).max() <= bound, name
    if value.size >= 2000:
      assert abs(value.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3), name
  for name, value in heads.items():
    if name.endswith(('weight_u', 'weight_v')):
      np.testing.assert_allclose(np.linalg.norm(value), 1, rtol=1e-5)
    elif name.endswith('main.1.weight') or name.endswith('running_var'):
      np.testing.assert_array_equal(value, 1)
    elif name.endswith(('main.1.bias', 'running_mean', 'embed_proj.bias')):
      np.testing.assert_array_equal(value, 0)
    elif name.endswith('embed.weight'):
      np.testing.assert_array_equal(value, table)
    elif name.endswith('embed_proj.weight'):
      assert abs(value.std() - 1) < 0.05 and value.shape == (64, 320)
  assert sum(k.endswith('embed.weight') for k in heads) == 4  # one table per head


def test_load_backbones_and_unprojected_maps():
  """With proj_type 0 the maps are the backbone's taps of the normalised images."""
  specs = ref.reduced_specs()
  disc = pg.ProjectedDiscriminator(backbones=(specs['tf_efficientnet_lite0'],), resolution=32, interp224=False,
                                   proj_type=0, ndf=16)
  module = ref.tiny_efficientnet(include_head=True)
  state_dict = ref.recipe_state_dict(ref.template_shapes(
      torch_layers.variables_template(module, jnp.zeros((1, 32, 32, 3)))), 3)
  variables = disc.load_backbones(ref.recipe_discriminator_variables(disc), {'tf_efficientnet_lite0': state_dict})
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  maps = jax.jit(disc.feature_maps, compiler_options=NO_OPT)(variables['features'], x)[0]
  direct = module.apply(pg.load_backbone_state_dict(module, state_dict), ((x + 1) / 2 - 0.5) / 0.5).features
  for ours, theirs in zip(maps, direct):
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert disc.feature_channels() == ((8, 16, 24, 32),)  # the reduced network's tapped stages
  with pytest.raises(ValueError,
                     match="missing weights for \\['tf_efficientnet_lite0'\\], unknown backbones \\['x'\\]"):
    disc.load_backbones(variables, {'x': state_dict})
  with pytest.raises(ValueError, match='unknown feature network'):
    pg.backbone_spec('resnet50')


# ---------------------------------------------------------------------------------------------------------
# Against the official modules (torch, timm, torchvision and a checkout of Zyriix/GDD in $GDD_OFFICIAL_SRC).

def _official_src():
  pytest.importorskip('torch', reason='parity test needs torch (requirements-parity.txt)')
  pytest.importorskip('timm', reason='parity test needs timm')
  src = os.environ.get('GDD_OFFICIAL_SRC')
  if not src or not (pathlib.Path(src) / 'pg_modules' / 'discriminator.py').is_file():
    pytest.skip('set GDD_OFFICIAL_SRC to a checkout of Zyriix/GDD')
  return src


def _replay(disc, variables, x_fake, x_real, labels):
  """Our side of backbone_reference.run_official: eval, then fake, real and R1 in training mode."""
  apply = jax.jit(disc.apply, static_argnames='train')
  out = {'maps': jax.jit(disc.feature_maps)(variables['features'], x_real),
         'eval': apply(variables, x_real, labels, train=False)[0]}
  out['fake'], buffers = apply(variables, x_fake, labels, train=True)
  variables = {**variables, 'heads': {**variables['heads'], 'buffers': buffers}}
  out['real'], buffers = apply(variables, x_real, labels, train=True)
  variables = {**variables, 'heads': {**variables['heads'], 'buffers': buffers}}
  r1 = jax.jit(lambda v, x: pg.r1_penalty(lambda im: disc.apply(v, im, labels, train=True), x, has_aux=True))
  out['r1_penalty'], (out['r1_logits'], buffers) = r1(variables, x_real)
  out['buffers'] = torch_layers.state_dict_from_variables({'buffers': buffers})
  return out


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(ref.DISCRIMINATOR_CASES))
def test_parity_official_reduced_float64(case):
  """The whole D step sequence in float64 on both sides, R1 included (exact up to rounding)."""
  src = _official_src()
  import torch
  (x_fake, x_real, labels), official = ref.official_discriminator_reference(src, case, dtype=torch.float64)
  backbones, resolution, label_dim = ref.DISCRIMINATOR_CASES[case]
  specs = ref.reduced_specs()
  disc = pg.ProjectedDiscriminator(backbones=tuple(specs[b] for b in backbones), resolution=resolution,
                                   label_dim=label_dim)
  with jax.enable_x64(True):
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), ref.recipe_discriminator_variables(disc))
    as64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)
    ours = _replay(disc, variables, as64(x_fake), as64(x_real), as64(labels))
    for key in ('eval', 'fake', 'real', 'r1_logits'):
      for o, r in zip(ours[key], official[key]):
        ref.assert_close(o, r, rel=1e-9)
    ref.assert_close(ours['r1_penalty'], official['r1_penalty'], rel=1e-9)
    assert sorted(ours['buffers']) == sorted(official['buffers'])
    for name, value in official['buffers'].items():
      ref.assert_close(ours['buffers'][name], value, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize('config', sorted(GDD_CONFIGS))
def test_parity_official_full_size(config):
  """GDD's two discriminators at full size (random pretrained-network weights, perturbed batch norms),
  conditional for DeiT + EfficientNet, float32. Feature maps, training-mode logits of the D step sequence
  and head buffers ≤ 1e-4·max. Looser, as float32 allows: evaluation-mode logits (untrained running
  statistics blow them up to ~1e10; torch's own float32 result is 8.5e-5 off its float64 one on the DeiT
  branch) ≤ 1e-3, the R1 penalty (a squared gradient norm) ≤ 3e-3. Exactness of both is shown in float64
  by test_parity_official_reduced_float64."""
  src = _official_src()
  import functools
  import timm
  import torch
  import torchvision
  backbones = GDD_CONFIGS[config]
  label_dim = 10 if config == 'deit_effnet' else 0
  constructors = {'vgg16_bn': torchvision.models.vgg16_bn,
                  **{name: functools.partial(timm.create_model, name, pretrained=False) for name in backbones
                     if name != 'vgg16_bn'}}
  torch.manual_seed(0)
  features, heads = ref.official_modules(src, backbones, 32, label_dim > 0, constructors)
  ref.perturb_batch_norm(features)
  features_sd = {k: v.numpy().copy() for k, v in features.state_dict().items()}
  heads_sd = {k: v.numpy().copy() for k, v in heads.state_dict().items()}
  inputs = ref.discriminator_inputs(32, label_dim)
  official = ref.run_official(features, heads, *inputs)
  disc = pg.ProjectedDiscriminator(backbones=backbones, resolution=32, label_dim=label_dim)
  variables = ref.discriminator_variables(disc, *ref.official_to_ours(features_sd, heads_sd))
  x_fake, x_real, labels = (None if a is None else jnp.asarray(a) for a in inputs)
  ours = _replay(disc, variables, x_fake, x_real, labels)
  errors = {f'{key}/{b}': _relative_error(o, r) for key in ('fake', 'real', 'r1_logits')
            for b, (o, r) in enumerate(zip(ours[key], official[key]))}
  errors.update({f'maps/{b}/{k}': _relative_error(o, r) for b, (per_ours, per_ref) in
                 enumerate(zip(ours['maps'], official['maps'])) for k, (o, r) in enumerate(zip(per_ours, per_ref))})
  errors['buffers'] = max(_relative_error(ours['buffers'][k], v) for k, v in official['buffers'].items())
  loose = {f'eval/{b}': _relative_error(o, r) for b, (o, r) in enumerate(zip(ours['eval'], official['eval']))}
  loose['r1_penalty'] = _relative_error(ours['r1_penalty'], official['r1_penalty'])
  print(config, errors, loose)
  assert max(errors.values()) <= 1e-4, errors
  assert max(v for k, v in loose.items() if k.startswith('eval')) <= 1e-3 and loose['r1_penalty'] <= 3e-3, loose


def _relative_error(ours, ref):
  """max|ours − ref| / max|ref|."""
  ref = np.asarray(ref, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())
