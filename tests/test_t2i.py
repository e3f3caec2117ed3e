"""Text-to-image SiD-LSG end to end on a tiny SD pipeline folder (tests/data/t2i/tiny-lsg): the run assembly,
training through the shared step and loop, checkpoints and exact resume, PNG samples through the VAE, and
guidance acting on the generator's update."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from configs import base
from sida_jax import cli, evaluation
from sida_jax.metrics import fid as fid_lib
from sida_jax.train import loop, step as step_lib
from sida_jax.train import run as run_lib
from sida_jax.train import t2i

pytest.importorskip('tokenizers', reason='the pipeline tokenizer needs the tokenizers package')

PIPE = pathlib.Path(__file__).resolve().parent / 'data' / 't2i' / 'tiny-lsg'
PROMPTS = ['a photo of a cat', 'two dogs in the park', 'a red car', 'a bowl of fruit', 'a bird on a tree',
           'a train in the snow']
BATCH = 8


def _config(tmp_path, **kappas):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('\n'.join(PROMPTS) + '\n')
  c = base.method_config('lsg')
  c.teacher = str(PIPE)
  c.data.prompts = str(prompts)
  c.batch_size = BATCH
  c.optim.critic_lr = c.optim.generator_lr = 1e-3   # large enough to move the tiny networks visibly
  c.ema.halflife_mimg = 0.0001
  c.total_kimg = 3 * BATCH / 1000
  c.log_every_kimg = c.checkpoint_every_kimg = BATCH / 1000
  c.grid_every_kimg = 0.0
  for k, v in kappas.items():
    c.loss[k] = v
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_build_run_wires_the_pipeline_into_the_shared_step(tmp_path):
  run = run_lib.build_run(_config(tmp_path))
  assert run.text is not None and run.class_name == 'UNet2DConditionModel'
  assert run.image_shape == (8, 8, 4)                           # the U-Net's sample_size; VAE factor 2
  assert run.nets.generator.label_dim == 32 and run.text.embedding_shape == (77, 32)
  sigmas = np.sqrt((1 - _alphas()) / _alphas())
  assert run.spec.init_sigma == pytest.approx(sigmas[625], rel=1e-6)   # t_init = 625
  batch = next(loop.Batches(run).iterate(0))
  assert set(batch) == {'critic', 'generator'} and batch['critic']['input_ids'].shape == (BATCH, 77)
  mesh = step_lib.make_mesh()
  device = run.device_batch(step_lib.shard_batch(batch, mesh))
  emb = device['critic']['labels']
  assert emb.shape == (BATCH, 77, 32) and emb.sharding.is_equivalent_to(jax.NamedSharding(mesh, jax.sharding.PartitionSpec('data')), 3)
  np.testing.assert_allclose(emb, run.text.embed(jnp.asarray(batch['critic']['input_ids'])), rtol=1e-6, atol=1e-6)


NO_OPT = {'xla_backend_optimization_level': 0}   # a tiny graph: compile time dominates


@pytest.mark.slow
def test_data_by_fsdp_mesh_trains_as_one_device(tmp_path):
  """config.mesh data=2 × fsdp=4 on the 8 test devices: the prompts' embeddings split over every device, the
  generator's, critic's and EMA's leaves split in four along 'fsdp', and two SiD-LSG steps (κ = 2) that equal the
  one-device run: losses at the 1-vs-8-device step test's rtol 2e-5; parameters and EMA within 1 % of one Adam
  step (lr 1e-3). The LSG losses are sums of ~300 per sample, so the gradients' float32 sums carry rounding
  of ~1e-5 that depends on the summation order, and Adam turns small gradients' rounding into parameter
  differences of a few 1e-6 (measured: 3e-6; one device and the 2 × 4 mesh)."""
  config = _config(tmp_path)
  config.mesh.update(data=2, fsdp=4, min_shard_size=0)
  run = run_lib.build_run(config)
  layout = run.layout()
  assert dict(layout.mesh.shape) == {'data': 2, 'fsdp': 4}
  batches = [b for b, _ in zip(loop.Batches(run).iterate(0), range(2))]
  runs = []
  for mesh in (step_lib.make_mesh(1), layout.mesh):
    train_step = step_lib.make_train_step(run.spec, mesh, layout.min_shard_size)
    state, compiled, losses = run_lib.initial_state(run), None, []
    for batch in batches:
      args = train_step.place(state, run.frozen_variables, run.device_batch(step_lib.shard_batch(batch, mesh)))
      compiled = compiled or train_step.jitted.lower(*args).compile(NO_OPT)
      state, metrics = compiled(*args)
      losses.append([float(metrics[k]) for k in ('loss_critic', 'loss_generator')])
    runs.append((state, np.asarray(losses)))
  (one, one_losses), (placed, mesh_losses) = runs
  embeddings = run.device_batch(step_lib.shard_batch(batches[0], layout.mesh))['critic']['labels']
  assert embeddings.addressable_shards[0].data.shape == (1, 77, 32)
  split = lambda leaf: leaf.addressable_shards[0].data.size * 4 == leaf.size
  for leaf in jax.tree.leaves((placed.generator.params, placed.critic.params, placed.generator_ema)):
    assert split(leaf) or not any(n % 4 == 0 for n in leaf.shape), leaf.shape
  assert sum(split(leaf) for leaf in jax.tree.leaves(placed.generator.params)) > 20
  np.testing.assert_allclose(mesh_losses, one_losses, rtol=2e-5)
  diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))
  step = config.optim.generator_lr
  for name in ('generator', 'critic'):
    assert diff(getattr(one, name).params, getattr(placed, name).params) < 1e-2 * step
  assert diff(one.generator_ema, placed.generator_ema) < 1e-2 * step
  assert diff(one.generator.params, run.teacher.variables['params']) > step   # the generator moved


def _alphas():
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
  return np.cumprod(1 - betas)


def _sample_three(tmp_path, config, workdir, png_index):
  """--mode sample of seeds 0-2 with the prompts 'a cat', 'a dog' (batch 2): (prompt file, samples.npz contents),
  after checking the images, their prompts (i mod 2) and that PNG `png_index` is the stored image."""
  prompts = tmp_path / 'sample.txt'
  prompts.write_text('a cat\na dog\n')
  with config.unlocked():
    config.sample.prompts = str(prompts)
    config.sample.seeds = '0-2'
    config.sample.batch_size = 2
  cli.run('sample', config, str(workdir))
  samples = dict(np.load(workdir / 'samples' / 'samples.npz'))
  assert samples['images'].shape == (3, 16, 16, 3) and samples['images'].dtype == np.uint8
  assert list(samples['prompts']) == ['a cat', 'a dog', 'a cat']
  png = np.asarray(PIL.Image.open(workdir / 'samples' / f'{png_index:06d}.png'))
  np.testing.assert_array_equal(png, samples['images'][png_index])
  return prompts, samples


@pytest.mark.slow
def test_train_checkpoint_resume_sample_and_guidance(tmp_path):
  """LSG (κ = 2) through the loop: two steps, a resumed third, PNG samples and the FID of --mode eval. (That the κ
  of the config reach the step and change its losses is checked against the official code in test_lsg.py.)"""
  config = _config(tmp_path)
  workdir = tmp_path / 'run'
  assert int(loop.train_and_evaluate(config, str(workdir), stop_after_steps=2).step) == 2
  state = loop.train_and_evaluate(config, str(workdir))   # resumes from the step-2 checkpoint
  assert int(state.step) == 3
  assert int(state.nonfinite['critic']) == 0 and int(state.nonfinite['generator']) == 0
  run = run_lib.build_run(config)
  moved = [np.max(np.abs(a - b)) for a, b in zip(_leaves(state.generator.params),
                                                  _leaves(run.teacher.variables['params']))]
  assert all(np.isfinite(m) for m in moved) and max(moved) > 1e-4
  # The resumed run reads the prompts an uninterrupted one would have read at its third step.
  batches = loop.Batches(run)
  third = [next(it) for it in [batches.iterate(0)] for _ in range(3)][2]
  np.testing.assert_array_equal(next(batches.iterate(2))['generator']['input_ids'], third['generator']['input_ids'])
  recorded = json.loads((workdir / 'network.json').read_text())
  assert recorded['class_name'] == 'UNet2DConditionModel' and recorded['init_kwargs']['cross_attention_dim'] == 32

  # --mode sample: PNGs decoded by the VAE, image i from seed i and prompt i mod their number.
  prompts, samples = _sample_three(tmp_path, config, workdir, png_index=2)
  # Only the prompt changed: seed 1 with 'a dog' again gives the same image, seed 0 with 'a dog' another.
  prompts.write_text('a dog\n')
  cli.run('sample', config, str(workdir))
  again = np.load(workdir / 'samples' / 'samples.npz')
  np.testing.assert_array_equal(again['images'][1], samples['images'][1])
  assert not np.array_equal(again['images'][0], samples['images'][0])

  # --mode eval: FID of the EMA generator on config.eval.prompts against given reference statistics (here the
  # offline MNIST feature detector and statistics of random images: the plumbing, not a meaningful number).
  detector = evaluation.make_detector('mnist')
  mu, sigma, _, _ = detector.statistics([np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), np.uint8)])
  fid_lib.save_reference_stats(str(tmp_path / 'ref.npz'), mu, sigma)
  with config.unlocked():
    config.eval.update(prompts=str(prompts), detector='mnist', ref_stats=str(tmp_path / 'ref.npz'), num_images=4,
                       batch_size=2, resolution=0)
  cli.run('eval', config, str(workdir))
  results = json.loads((workdir / 'eval.json').read_text())
  assert np.isfinite(results['fid']) and results['fid'] > 0 and results['num_images'] == 4
  with config.unlocked():
    config.sample.prompts = ''
  with pytest.raises(ValueError, match='config.sample.prompts .sampling. or config.eval.prompts .evaluation.: .* is '
                                       'text-to-image'):
    cli.run('sample', config, str(workdir))


def test_refusals(tmp_path):
  config = _config(tmp_path)
  config.method = 'sid'
  with pytest.raises(ValueError, match="a Stable Diffusion teacher is distilled with 'lsg'"):
    run_lib.build_run(config)
  config = _config(tmp_path)
  config.dropout = 0.1
  with pytest.raises(ValueError, match='the SD U-Net has no dropout'):
    run_lib.build_run(config)
  config = _config(tmp_path)
  config.data.resolution = 15
  with pytest.raises(ValueError, match='not a multiple of the VAE factor 2'):
    run_lib.build_run(config)
  config = _config(tmp_path)
  config.data.prompts = ''
  run = run_lib.build_run(config)
  with pytest.raises(ValueError, match='config.data.prompts: training a text-to-image generator needs prompts'):
    next(loop.Batches(run).iterate(0))
  assert t2i.is_pipeline_folder(str(PIPE)) and not t2i.is_pipeline_folder(str(PIPE / 'unet'))
  with pytest.raises(ValueError, match="not a text-to-image"):
    t2i.load_generator(str(_fake_workdir(tmp_path)), str(PIPE), jnp.float32)


def _fake_workdir(tmp_path):
  workdir = tmp_path / 'edm'
  workdir.mkdir()
  (workdir / 'network.json').write_text(json.dumps({'class_name': 'EDMPrecond', 'init_kwargs': {}}))
  return workdir


# ---------------------------------------------------------------------------------------------------------
# SIM on a tiny PixArt-α-like pipeline folder (tests/data/t2i/tiny-pixart, made by make_pixart_pipeline.py):
# the configs/pixart_sim.py recipe with a small batch.
PIXART = pathlib.Path(__file__).resolve().parent / 'data' / 't2i' / 'tiny-pixart'


def _pixart_config(tmp_path, batch=16, grad_accum=2):
  import importlib  # pylint: disable=import-outside-toplevel
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('\n'.join(PROMPTS) + '\n')
  c = importlib.import_module('configs.pixart_sim').get_config('fp32')
  c.teacher = str(PIXART)
  c.data.prompts = str(prompts)
  c.data.resolution = 0                       # the transformer's sample_size (8 → 16² images)
  c.batch_size, c.grad_accum = batch, grad_accum
  c.optim.critic_lr = c.optim.generator_lr = 1e-3
  c.ema.halflife_mimg = 0.0001
  c.total_kimg = 3 * batch / 1000
  c.log_every_kimg = c.checkpoint_every_kimg = batch / 1000
  c.grid_every_kimg = 0.0
  return c


def test_pixart_pipeline_builds_the_sim_run(tmp_path):
  run = run_lib.build_run(_pixart_config(tmp_path))
  assert run.class_name == 'PixArtTransformer2DModel' and run.text.masked
  assert run.image_shape == (8, 8, 4) and run.spec.init_sigma == 2.5 and run.spec.grad_accum == 2
  assert run.nets.generator.label_dim == 16 and run.text.embedding_shape == (120, 16)
  assert run.spec.checkpoint_generator_objective   # the recipe's gradient checkpointing (remat 'full')
  # Both phases' σ: the recipe's truncated log-normal (ln σ ~ N(−2, 2²) on [0.01, 156.6155]).
  for draw in (run.method.critic_draws, run.method.generator_draws):
    r = np.asarray(draw(jax.random.key(0), 4096, (1,))['sigma_normal'])
    sigma = np.exp(-2.0 + 2.0 * r)
    assert sigma.min() >= 0.01 * (1 - 1e-5) and sigma.max() <= 156.6155 * (1 + 1e-5)
    assert abs(np.median(np.log(sigma)) + 2.0) < 0.3
  batch = next(loop.Batches(run).iterate(0))
  assert set(batch['critic']) == {'input_ids', 'attention_mask'} and batch['critic']['input_ids'].shape == (16, 120)
  # Refusals: each pipeline has its method.
  config = _pixart_config(tmp_path)
  config.recipe, config.method = '', 'lsg'
  with pytest.raises(ValueError, match="a PixArt teacher is distilled with 'sim'"):
    run_lib.build_run(config)
  config = _config(tmp_path)
  config.method = 'sim'
  with pytest.raises(ValueError, match="a Stable Diffusion teacher is distilled with 'lsg'"):
    run_lib.build_run(config)


@pytest.mark.slow
def test_pixart_gradient_accumulation_equals_the_full_batch(tmp_path):
  """Both phases' losses and gradients over k = 4 rounds equal one batch of 8 to fp32 precision
  (dataclasses.replace(spec, grad_accum=k)), with a critic away from the teacher (else the generator's y = 0).
  Without the recipe's remat, which only changes what the backward pass recomputes (and the compile time)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  run = run_lib.build_run(_pixart_config(tmp_path, batch=8, grad_accum=1))
  spec = dataclasses.replace(run.spec, checkpoint_generator_objective=False)
  teacher = run.teacher.variables
  tokens = next(loop.Batches(run).iterate(0))
  batch = {p: {'labels': run.text.condition({k: jnp.asarray(v) for k, v in part.items()})}
           for p, part in tokens.items()}
  state = run_lib.initial_state(run)
  leaves, treedef = jax.tree.flatten(state.critic.params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  moved = [x + 0.05 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  state = state.replace(critic=state.critic.replace(params=jax.tree.unflatten(treedef, moved)))
  draws = step_lib.sample_draws(spec, jax.random.key(7))

  @functools.partial(jax.jit, static_argnums=0)
  def phases(rounds, state, teacher, batch, draws):
    s = dataclasses.replace(spec, grad_accum=rounds)
    key = jax.random.key(8)
    critic, c_loss, _, c_grads = step_lib.critic_phase(s, state, teacher, batch['critic'], draws['critic'], key)
    _, g_loss, _, g_grads = step_lib.generator_phase(s, state, critic, teacher, batch['generator'],
                                                     draws['generator'], key)
    return jnp.stack([c_loss, g_loss]), c_grads, g_grads

  losses, c_ref, g_ref = phases(1, state, teacher, batch, draws)
  assert np.all(np.isfinite(losses))
  for rounds in (4,):
    other_losses, c_grads, g_grads = phases(rounds, state, teacher, batch, draws)
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5, atol=1e-7)
    for ref, got in ((c_ref, c_grads), (g_ref, g_grads)):
      scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref))
      worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
      assert scale > 1e-4 and worst < 1e-5 * scale, (rounds, worst, scale)


@pytest.mark.slow
def test_pixart_sim_trains_resumes_exactly_and_samples(tmp_path):
  config = _pixart_config(tmp_path)
  resumed, straight = tmp_path / 'resumed', tmp_path / 'straight'
  assert int(loop.train_and_evaluate(config, str(resumed), stop_after_steps=2).step) == 2
  state = loop.train_and_evaluate(config, str(resumed))   # from the step-2 checkpoint
  reference = loop.train_and_evaluate(config, str(straight))
  assert int(state.step) == int(reference.step) == 3
  assert int(state.nonfinite['critic']) == 0 and int(state.nonfinite['generator']) == 0
  for a, b in zip(_leaves(state), _leaves(reference)):
    np.testing.assert_array_equal(a, b)                  # the resumed run is the uninterrupted one
  run = run_lib.build_run(config)
  moved = [np.max(np.abs(a - b)) for a, b in zip(_leaves(state.generator.params),
                                                  _leaves(run.teacher.variables['params']))]
  assert max(moved) > 1e-4
  recorded = json.loads((resumed / 'network.json').read_text())
  assert recorded['class_name'] == 'PixArtTransformer2DModel' and recorded['init_sigma'] == 2.5

  # --mode sample: PNGs through the VAE; image i = VAE(D(2.5 z_i; 2.5, c(prompt i mod 2))) with the EMA weights.
  _, samples = _sample_three(tmp_path, config, resumed, png_index=1)
  from sida_jax import sampling  # pylint: disable=import-outside-toplevel
  z, _ = sampling.seed_noise([1], run.image_shape, 0, config.sample.rng)
  ema = {'params': jax.device_get(state.generator_ema)}
  latents = sampling.generate(run.nets.generator, ema, jnp.asarray(z), run.text.embed_prompts(['a dog']), 2.5)
  direct = sampling.to_uint8(run.text.decode(latents))[0]
  assert np.mean(direct != samples['images'][1]) < 0.01 and np.max(np.abs(direct.astype(int) - samples['images'][1])) <= 1
