"""The frozen text side of a text-to-image run and its one-step sampler.

A `TextConditioning` holds what turns prompts into the generator's conditions and latents into images: the
tokenizer and text encoder of a pipeline (Stable Diffusion: CLIP; PixArt: T5), the empty prompt's embedding
(the null condition of classifier-free guidance, computed once), the VAE, and the training prompts. Embeddings
are computed on the fly, outside the training step, by a jitted call of the frozen encoder on token ids already
split over the devices (the embeddings come out split the same way), so the step sees them as its `labels`.
The encoder's weights follow the mesh rules of the parameters (`train/sharding.py`: split along 'fsdp' when
fsdp > 1, replicated along 'data') and are stored in the run's compute dtype (T5-XXL: 17.7 GiB in float32,
8.9 GiB in bfloat16); between calls they wait on the host. The VAE stays float32 (SD's overflows in half
precision).

The condition is the embedding array [N, L, D] for SD (its pipelines encode without an attention mask, the
padded positions condition too), and for T5 encoders (`masked`) the pytree {'embedding', 'mask'}
(`models/t2i/iddpm.text_condition`): PixArt's pipelines pass the tokenizer's attention mask to the encoder and
to the transformer's cross-attention.

Images: the generator's latents x0 are decoded as the official code does, vae.decode(x0 / scaling_factor),
and quantised like every sida_jax sample (floor(clip(127.5x + 128, 0, 255))). Image i of a sampling run or
evaluation uses seed i's noise (`sampling.seed_noise`) and prompt i mod len(prompts).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from sida_jax import sampling
from sida_jax.formats import pretrained
from sida_jax.models.t2i import iddpm
from sida_jax.text import prompts as prompts_lib
from sida_jax.train import sharding as sharding_lib

Array = jax.Array


# The jitted calls of the frozen networks live at module level, with the Flax module a static argument (modules
# compare and hash by their fields): every TextConditioning of the same architecture (a run, its resume, its
# sampling) shares one compiled program per shape instead of compiling its own.
@functools.partial(jax.jit, static_argnames=('module', 'masked', 'out_sharding'))
def _condition(variables: dict, tokens: dict, *, module: Any, masked: bool, out_sharding: Any = None) -> Any:
  if masked:
    ids, mask = tokens['input_ids'], tokens['attention_mask']
    out = iddpm.text_condition(module.apply(variables, ids, mask), mask)
  else:
    out = module.apply(variables, tokens['input_ids'])
  return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


@functools.partial(jax.jit, static_argnames=('module',))
def _encode(variables: dict, ids: Array, *, module: Any) -> Array:
  # SD pipelines call the text encoder without an attention mask (the padded positions condition too).
  return module.apply(variables, ids)


@functools.partial(jax.jit, static_argnames=('module', 'scale'))
def _decode(variables: dict, latents: Array, *, module: Any, scale: float) -> Array:
  return module.apply(variables, latents / scale, method=module.decode)


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioning:
  """Tokenizer, frozen text encoder, empty-prompt embedding, VAE and (training) prompts of a T2I run."""
  tokenizer: Any                       # sida_jax.text.CLIPTokenizer or T5Tokenizer
  text_encoder: pretrained.PretrainedNetwork
  vae: pretrained.PretrainedNetwork
  null_embedding: np.ndarray           # [1, L, D] float32: the text encoder's output for ""
  prompts: Optional[prompts_lib.PromptDataset] = None
  masked: bool = False                 # T5 (PixArt): encoder and denoiser take the attention mask
  min_shard_size: int = sharding_lib.MIN_SHARD_SIZE   # the mesh rules the encoder's weights are placed by

  @property
  def embedding_shape(self) -> tuple:
    return tuple(self.null_embedding.shape[1:])

  def tokens(self, prompts: Sequence[str]) -> dict:
    """{'input_ids'} (and with `masked` {'attention_mask'}), int32 [n, L], padded to the tokenizer's length as
    the pipelines tokenize (truncation, max_length: 77 for CLIP, 120 for PixArt's T5)."""
    if self.masked:
      tokens = self.tokenizer(list(prompts))
      return {'input_ids': np.asarray(tokens['input_ids'], np.int32),
              'attention_mask': np.asarray(tokens['attention_mask'], np.int32)}
    return {'input_ids': np.asarray(self.tokenizer(list(prompts)).input_ids, np.int32)}

  def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
    """int32 [n, L] token ids (see `tokens`)."""
    return self.tokens(prompts)['input_ids']

  def _condition_of(self, variables: dict, tokens: dict, out_sharding: Any = None) -> Any:
    return _condition(variables, tokens, module=self.text_encoder.module, masked=self.masked,
                      out_sharding=out_sharding)

  @functools.cached_property
  def _placed(self) -> dict:
    return {}

  def _placed_for(self, ids: Array) -> tuple:
    """(weights, sharding of the conditions) for token ids: on the mesh `ids` are split over, the weights
    placed once by the parameters' rules (split along 'fsdp', replicated along 'data') and the conditions
    split over the devices like the ids; for ids that are not, the weights on the default device."""
    sharding = getattr(ids, 'sharding', None)
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    if mesh not in self._placed:
      variables = self.text_encoder.variables
      if mesh is None:
        self._placed[mesh] = (jax.device_put(variables), None)
      else:
        layout = sharding_lib.Layout(mesh, self.min_shard_size)
        self._placed[mesh] = (layout.place(variables), layout.batch)
    return self._placed[mesh]

  def condition_shapes(self, batch_size: int) -> Any:
    """ShapeDtypeStructs of the condition of `batch_size` prompts (what `condition` gives)."""
    length = self.embedding_shape[0]
    tokens = {'input_ids': jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}
    if self.masked:
      tokens['attention_mask'] = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    return jax.eval_shape(self._condition_of, self.text_encoder.variables, tokens)

  def embed(self, ids: Array) -> Array:
    """Embeddings [n, L, D] float32 of token ids, without a mask (SD); on the device(s) of `ids` (the encoder's
    weights are placed there once)."""
    return _encode(self._placed_for(ids)[0], ids, module=self.text_encoder.module)

  def condition(self, tokens: dict) -> Any:
    """The denoisers' condition from `tokens` (on the devices or host): SD's embeddings [n, L, D], or with
    `masked` {'embedding': T5(ids, mask), 'mask': mask}; split over a mesh like the tokens."""
    variables, out_sharding = self._placed_for(tokens['input_ids'])
    return self._condition_of(variables, {k: tokens[k] for k in ('input_ids', 'attention_mask') if k in tokens},
                              out_sharding)

  def embed_prompts(self, prompts: Sequence[str]) -> Any:
    """The condition of `prompts` (see `condition`)."""
    return self.condition({k: jnp.asarray(v) for k, v in self.tokens(prompts).items()})

  def host_batches(self, batch_size: int, seed: int, start_step: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
    """Token ids of this process's prompts, two batches per iteration (critic, generator phase) from the
    prompt order's positions 2·step and 2·step + 1."""
    if self.prompts is None:
      raise ValueError('config.data.prompts: training a text-to-image generator needs prompts')
    step = start_step
    while True:
      yield {phase: self.tokens(self.prompts.batch(2 * step + i, batch_size, seed, process_index, process_count))
             for i, phase in enumerate(('critic', 'generator'))}
      step += 1

  def device_batch(self, batch: dict) -> dict:
    """`tokens` per phase (on the devices) -> {'labels': condition}, what the step conditions on."""
    return {phase: {'labels': self.condition(part)} for phase, part in batch.items()}

  def decode(self, latents: Array) -> Array:
    """Images in [-1, 1], NHWC float32, from x0 latents (vae.decode(x0 / scaling_factor))."""
    return _decode(self.vae.variables, latents, module=self.vae.module,
                   scale=float(self.vae.config.get('scaling_factor', 0.18215)))


def read_pipeline(folder: str, dtype: Any = jnp.float32, denoiser: bool = False,
                  weights: bool = True) -> pretrained.Pipeline:
  """What a text-to-image run reads of a pipeline folder: tokenizer and text encoder (computing in `dtype`),
  the VAE (float32), and with `denoiser` the U-Net or transformer (in `dtype`) and the scheduler config.
  `weights=False` reads the config files alone: the networks' variables are ShapeDtypeStructs."""
  index_path = os.path.join(folder, pretrained.MODEL_INDEX)
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f'{folder}: not a pipeline folder (no {pretrained.MODEL_INDEX})')
  parts = ('text_encoder', 'tokenizer')
  if denoiser:
    parts = (pretrained.denoiser_part(folder), 'scheduler') + parts
  pipe = pretrained.load_pipeline(folder, dtype, parts=parts, weights=weights)
  vae = pretrained.load_pipeline(folder, jnp.float32, parts=('vae',), weights=weights).vae
  return dataclasses.replace(pipe, vae=vae)


def stored(variables: Any, dtype: Any) -> Any:
  """The frozen encoder's weights as kept between calls: on the host, floating leaves in `dtype` (bfloat16 runs
  store bfloat16, which their compute casts to anyway); ShapeDtypeStructs stay shapes."""
  def store(x):
    dt = dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dt)
    return np.asarray(jax.device_get(x)).astype(dt)
  return jax.tree.map(store, variables)


def _is_abstract(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def text_side(pipe: pretrained.Pipeline, dtype: Any = jnp.float32,
              min_shard_size: int = sharding_lib.MIN_SHARD_SIZE) -> TextConditioning:
  """The TextConditioning (without prompts) of a pipeline read by `read_pipeline`: the text encoder's weights
  stored in `dtype`, the empty prompt's embedding (zeros of its shape when the weights are only shapes), the
  VAE as read. A T5 tokenizer (PixArt) makes it `masked`."""
  from sida_jax.text.t5_tokenizer import T5Tokenizer  # pylint: disable=import-outside-toplevel
  encoder = dataclasses.replace(pipe.text_encoder, variables=stored(pipe.text_encoder.variables, dtype))
  text = TextConditioning(tokenizer=pipe.tokenizer, text_encoder=encoder, vae=pipe.vae,
                          null_embedding=np.zeros((0,), np.float32),
                          masked=isinstance(pipe.tokenizer, T5Tokenizer), min_shard_size=min_shard_size)
  tokens = text.tokens([''])
  if _is_abstract(encoder.variables):
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tokens.items()}
    null = jax.eval_shape(text._condition_of, encoder.variables, shapes)  # pylint: disable=protected-access
    null = np.zeros((null[iddpm.EMBEDDING] if text.masked else null).shape, np.float32)
  else:
    # Computed with the host weights, not kept on a device: the run places them on its mesh.
    null = text._condition_of(encoder.variables, tokens)  # pylint: disable=protected-access
    null = null[iddpm.EMBEDDING] if text.masked else null
  return dataclasses.replace(text, null_embedding=np.asarray(null, np.float32))


def load_text_side(folder: str, dtype: Any = jnp.float32,
                   min_shard_size: int = sharding_lib.MIN_SHARD_SIZE) -> TextConditioning:
  """The TextConditioning (without prompts) of a pipeline folder: tokenizer, text encoder (computing in and
  stored in `dtype`), the empty prompt's embedding and the VAE (always float32, as the official code upcasts it:
  SD's VAE overflows in half precision). The denoiser is not read. A T5 tokenizer (PixArt) makes it `masked`."""
  return text_side(read_pipeline(folder, dtype), dtype, min_shard_size)


def generated_images(generate: Callable[[Array, Array], Array], text: TextConditioning, latent_shape: tuple,
                     seeds: Sequence[int], prompts: Sequence[str], batch_size: int,
                     rng: str = 'torch_cpu') -> Iterator[np.ndarray]:
  """uint8 [n, H, W, 3] batches: image i from seeds[i]'s noise and prompts[i mod len(prompts)], decoded by
  the VAE; `generate(z, condition) -> latents` is the one-step generator (condition: `embed_prompts`)."""
  if not prompts:
    raise ValueError('no prompts to generate images for')
  seeds = list(seeds)
  for start in range(0, len(seeds), batch_size):
    chunk = seeds[start:start + batch_size]
    z, _ = sampling.seed_noise(chunk, latent_shape, 0, rng)
    texts = [prompts[(start + i) % len(prompts)] for i in range(len(chunk))]
    pad = batch_size - len(chunk)   # fixed shapes: one compilation
    if pad:
      z = np.concatenate([z, np.zeros((pad, *z.shape[1:]), z.dtype)])
      texts = texts + [texts[0]] * pad
    latents = generate(jnp.asarray(z), text.embed_prompts(texts))
    yield sampling.to_uint8(text.decode(latents))[:len(chunk)]


def resize_like_official(images: np.ndarray, size: int) -> np.ndarray:
  """The official COCO-FID resize of uint8 images: PIL Lanczos to size×size (its torchvision round trip
  to_tensor·255 → uint8 gives every value back unchanged); size 0 keeps them as they are."""
  if size <= 0 or images.shape[1:3] == (size, size):
    return images
  return np.stack([np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.Resampling.LANCZOS))
                   for image in images])


def evaluate(generate: Callable[[Array, Array], Array], text: TextConditioning, latent_shape: tuple,
             prompts: Sequence[str], detector: Any, reference: tuple, num_images: int, batch_size: int,
             seed_offset: int = 0, resolution: int = 0, rng: str = 'torch_cpu',
             clip_score_fn: Optional[Callable[[np.ndarray, list], np.ndarray]] = None) -> dict:
  """Zero-shot FID of `num_images` generated images (image i: seed seed_offset + i, prompt i mod len(prompts),
  resized to `resolution` as the official COCO evaluation does) against reference statistics (mu, sigma).

  CLIP score is not computed here (no OpenCLIP port); `clip_score_fn(uint8 images, their prompts) -> [n]`
  adds the mean of whatever score it returns as `clip_score`.
  """
  from sida_jax.metrics import fid as fid_lib  # pylint: disable=import-outside-toplevel
  seeds = list(range(seed_offset, seed_offset + num_images))
  scores = []

  def batches():
    for start, images in zip(range(0, num_images, batch_size),
                             generated_images(generate, text, latent_shape, seeds, prompts, batch_size, rng)):
      images = resize_like_official(images, resolution)
      if clip_score_fn is not None:
        texts = [prompts[i % len(prompts)] for i in range(start, start + len(images))]
        scores.append(np.asarray(clip_score_fn(images, texts), np.float64).reshape(-1))
      yield images

  mu, sigma, _, _ = detector.statistics(batches())
  results = {'fid': fid_lib.frechet_distance(mu, sigma, *reference)}
  if clip_score_fn is not None:
    results['clip_score'] = float(np.mean(np.concatenate(scores)))
  return results
