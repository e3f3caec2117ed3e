"""The T5 text encoder (transformers `T5EncoderModel`) in Flax linen: PixArt's caption encoder.

    encoder = t5.from_config(config)                       # the text encoder's config.json as a dict
    variables = t5.variables_from_state_dict(encoder, state_dict)
    hidden = encoder.apply(variables, input_ids, attention_mask)   # [N, L, d_model] last_hidden_state

Parameter names and layouts equal the transformers `state_dict` (`shared.weight` [vocab, d_model],
`encoder.block.0.layer.0.SelfAttention.q.weight` [out, in],
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight` [num_buckets, heads],
`encoder.block.3.layer.1.DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`, ...).

T5 conventions kept here: token embeddings are not scaled; attention logits are not scaled by
1/√d_kv; a learned relative-position bias (bidirectional log buckets) is computed by the first layer
and shared by all layers; layer norms are RMS norms with a weight and no bias (statistics in float32);
the feed-forward is `wo(act(wi(x)))` or, for T5 v1.1 (`feed_forward_proj='gated-gelu'`),
`wo(gelu_tanh(wi_0(x)) · wi_1(x))`. Padded keys (attention_mask 0) are excluded from attention.
Dropout is not implemented: the encoder runs deterministically (evaluation mode).

Tied embedding: `T5EncoderModel` ties `encoder.embed_tokens.weight` to `shared.weight`, so its
`state_dict()` holds both names for one tensor, while `save_pretrained` usually writes only
`shared.weight`. The module has the one parameter `shared.weight`; the converter accepts either name
or both, and refuses both when their values differ (they are then not a tied pair).
"""
import math
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sida_jax.models.t2i.layers import Linear, dot_product_attention, strict_variables

Array = jax.Array

CLASS_NAMES = ('T5EncoderModel',)

_TIED_EMBEDDING = 'encoder.embed_tokens.weight'
_ACTIVATIONS = {
    'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'silu': jax.nn.silu,
}


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional relative-position bucket of each (query, key) pair, int32 [Lq, Lk].

  Half the buckets are for keys after the query. Within a half, distances below num_buckets/4 get
  their own bucket; larger ones share logarithmically wider buckets up to max_distance (float32
  arithmetic and truncation, as transformers computes them).
  """
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  is_small = distance < max_exact
  safe = np.maximum(distance, 1).astype(np.float32)
  large = (np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
           * np.float32(half - max_exact))
  large = np.minimum(max_exact + large.astype(np.int64), half - 1)
  return (buckets + np.where(is_small, distance, large)).astype(np.int32)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """T5LayerNorm: x / √(mean(x²) + eps) · weight, no mean subtraction and no bias; float32 statistics."""
  h = x.astype(jnp.float32)
  h = h * lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
  return (h * weight).astype(x.dtype)


class T5LayerNorm(nn.Module):
  features: int
  eps: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return rms_norm(x, self.param('weight', nn.initializers.ones, (self.features,), jnp.float32), self.eps)


class T5Block(nn.Module):
  """One encoder block: layer.0 (norm → self-attention → residual), layer.1 (norm → FF → residual)."""
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  eps: float
  is_gated: bool
  activation: str

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> Array:
    n, length, _ = x.shape
    inner = self.num_heads * self.d_kv
    h = T5LayerNorm(self.d_model, self.eps, name='layer.0.layer_norm')(x)
    q, k, v = (Linear(self.d_model, inner, use_bias=False, name=f'layer.0.SelfAttention.{s}')(h)
               .reshape(n, length, self.num_heads, self.d_kv) for s in 'qkv')
    h = dot_product_attention(q, k, v, 1.0, bias).reshape(n, length, inner)
    x = x + Linear(inner, self.d_model, use_bias=False, name='layer.0.SelfAttention.o')(h)

    act = _ACTIVATIONS[self.activation]
    h = T5LayerNorm(self.d_model, self.eps, name='layer.1.layer_norm')(x)
    prefix = 'layer.1.DenseReluDense'
    if self.is_gated:
      h = (act(Linear(self.d_model, self.d_ff, use_bias=False, name=f'{prefix}.wi_0')(h))
           * Linear(self.d_model, self.d_ff, use_bias=False, name=f'{prefix}.wi_1')(h))
    else:
      h = act(Linear(self.d_model, self.d_ff, use_bias=False, name=f'{prefix}.wi')(h))
    return x + Linear(self.d_ff, self.d_model, use_bias=False, name=f'{prefix}.wo')(h)


class T5EncoderModel(nn.Module):
  """Token ids [N, L] (+ attention_mask [N, L], 1 = token, 0 = padding) → last_hidden_state [N, L, d_model].

  Defaults are t5-small's architecture with T5's config defaults; `feed_forward_proj` is '{act}' or
  'gated-{act}' ('gated-gelu' means the tanh GELU, as in transformers). The output is float32.
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = 'relu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None) -> Array:
    is_gated, activation = _parse_feed_forward(self.feed_forward_proj)
    n, length = input_ids.shape
    embedding = self.param('shared.weight', nn.initializers.normal(1.0), (self.vocab_size, self.d_model),
                           jnp.float32)
    x = jnp.take(embedding, jnp.asarray(input_ids, jnp.int32), axis=0).astype(self.dtype)

    # The first block owns the bias table; every block adds the same [1, heads, L, L] bias.
    table = self.param('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                       nn.initializers.normal(self.d_model ** -0.5),
                       (self.relative_attention_num_buckets, self.num_heads), jnp.float32)
    buckets = relative_position_buckets(length, length, self.relative_attention_num_buckets,
                                        self.relative_attention_max_distance)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]
    if attention_mask is not None:
      mask = jnp.asarray(attention_mask)
      if mask.shape != (n, length):
        raise ValueError(f'T5EncoderModel: attention_mask has shape {mask.shape}, expected {(n, length)}')
      bias = bias + jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    for i in range(self.num_layers):
      x = T5Block(self.d_model, self.d_kv, self.d_ff, self.num_heads, self.layer_norm_epsilon, is_gated,
                  activation, name=f'encoder.block.{i}')(x, bias)
    return T5LayerNorm(self.d_model, self.layer_norm_epsilon, name='encoder.final_layer_norm')(x).astype(
        jnp.float32)


def _parse_feed_forward(feed_forward_proj: str) -> tuple[bool, str]:
  """transformers' reading of `feed_forward_proj`: (gated?, activation name)."""
  parts = feed_forward_proj.split('-')
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'gated'):
    raise ValueError(f'T5: unsupported feed_forward_proj {feed_forward_proj!r}')
  activation = 'gelu_new' if feed_forward_proj == 'gated-gelu' else parts[-1]
  if activation not in _ACTIVATIONS:
    raise ValueError(f'T5: unsupported feed_forward_proj {feed_forward_proj!r}')
  return len(parts) == 2, activation


# ----------------------------------------------------------------------------------------------------
# Building from a transformers config.json, and the strict state_dict copy.

_FIELDS = ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads', 'relative_attention_num_buckets',
           'relative_attention_max_distance', 'layer_norm_epsilon', 'feed_forward_proj')
# Entries that describe training, the decoder, generation or tokens, not the encoder's forward pass.
# `dense_act_fn` / `is_gated_act` are transformers' own reading of `feed_forward_proj` (checked below).
_IGNORED = frozenset((
    'architectures', 'model_type', 'torch_dtype', 'dtype', 'transformers_version', 'dropout_rate',
    'classifier_dropout', 'initializer_factor', 'num_decoder_layers', 'is_encoder_decoder', 'use_cache',
    'pad_token_id', 'eos_token_id', 'bos_token_id', 'decoder_start_token_id', 'sep_token_id',
    'tie_word_embeddings', 'output_past', 'n_positions', 'task_specific_params', 'gradient_checkpointing',
    'output_hidden_states', 'output_attentions', 'return_dict', 'id2label', 'label2id', 'problem_type',
    'tokenizer_class', 'prefix', 'chunk_size_feed_forward', 'add_cross_attention', 'cross_attention_hidden_size',
    'tie_encoder_decoder', 'is_decoder', 'scale_decoder_outputs', 'dense_act_fn', 'is_gated_act'))


def from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> T5EncoderModel:
  """The encoder described by a transformers T5 `config.json` dict; unset entries take T5Config's defaults.

  Only the encoder is built (the decoder entries are ignored); an unknown key, `is_decoder=True` or an
  inconsistent `dense_act_fn` / `is_gated_act` is a ValueError naming the key.
  """
  model_type = config.get('model_type', 't5')
  if model_type != 't5':
    raise ValueError(f't5.from_config: unsupported model_type {model_type!r}')
  kwargs = {}
  for key, value in config.items():
    if key.startswith('_') or key in _IGNORED:
      continue
    if key not in _FIELDS:
      raise ValueError(f't5.from_config: unknown key {key!r}')
    kwargs[key] = value
  if config.get('is_decoder'):
    raise ValueError('t5.from_config: unsupported is_decoder True (encoder only)')
  is_gated, activation = _parse_feed_forward(kwargs.get('feed_forward_proj', 'relu'))
  if config.get('dense_act_fn', activation) != activation:
    raise ValueError(f"t5.from_config: dense_act_fn {config['dense_act_fn']!r} disagrees with feed_forward_proj")
  if bool(config.get('is_gated_act', is_gated)) != is_gated:
    raise ValueError(f"t5.from_config: is_gated_act {config['is_gated_act']!r} disagrees with feed_forward_proj")
  return T5EncoderModel(**kwargs, dtype=dtype)


def example_inputs(encoder: T5EncoderModel, batch_size: int = 1) -> tuple:
  return (jnp.zeros((batch_size, 1), jnp.int32),)


def params_template(encoder: T5EncoderModel) -> Any:
  """The abstract parameter tree (jax.ShapeDtypeStruct leaves), without allocating."""
  return jax.eval_shape(lambda: encoder.init(jax.random.key(0), *example_inputs(encoder)))['params']


def variables_from_state_dict(encoder: T5EncoderModel, state_dict: Mapping[str, Any]) -> dict:
  """Strict 1:1 copy of a transformers T5EncoderModel state_dict into `encoder`'s variables, float32.

  `encoder.embed_tokens.weight` stands for `shared.weight` (tied): either or both may be present; both
  must then be equal.
  """
  state = dict(state_dict)
  if _TIED_EMBEDDING in state:
    tied = state.pop(_TIED_EMBEDDING)
    if 'shared.weight' not in state:
      state['shared.weight'] = tied
    elif not np.array_equal(np.asarray(tied), np.asarray(state['shared.weight'])):
      raise ValueError(f'T5EncoderModel state_dict: {_TIED_EMBEDDING!r} differs from \'shared.weight\' '
                       '(expected a tied copy)')
  return strict_variables(state, params_template(encoder), 'T5EncoderModel state_dict')
