"""transformers' `CLIPTextModel` in Flax linen: the text encoder of Stable Diffusion 1.x / 2.x.

    encoder = from_transformers_config(config)      # config.json of a transformers `text_encoder/` folder
    variables = convert_transformers_state(state, encoder)
    hidden = encoder.apply(variables, input_ids)     # last_hidden_state [N, L, hidden_size], float32

Token + position embeddings, pre-LN encoder layers with a causal mask (and an optional padding mask),
MLP activation `quick_gelu` (SD1.5's OpenAI CLIP ViT-L/14) or `gelu` (SD2's OpenCLIP ViT-H/14),
final LayerNorm. Parameter names are those of the published checkpoints
(`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...); transformers >= 5 saves them without the
`text_model.` prefix, and `convert_transformers_state` accepts both spellings.
"""
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sida_jax.models.t2i.layers import Embedding, LayerNorm, Linear, attention, strict_variables

Array = jax.Array

PREFIX = 'text_model.'
_ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: nn.gelu(x, approximate=False),
}


class CLIPEncoderLayer(nn.Module):
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  eps: float

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    d = self.hidden_size
    h = LayerNorm(d, self.eps, name='layer_norm1')(x)
    q = Linear(d, d, name='self_attn.q_proj')(h)
    k = Linear(d, d, name='self_attn.k_proj')(h)
    v = Linear(d, d, name='self_attn.v_proj')(h)
    x = x + Linear(d, d, name='self_attn.out_proj')(attention(q, k, v, self.num_heads, mask))
    h = Linear(d, self.intermediate_size, name='mlp.fc1')(LayerNorm(d, self.eps, name='layer_norm2')(x))
    h = _ACTIVATIONS[self.hidden_act](h)
    return x + Linear(self.intermediate_size, d, name='mlp.fc2')(h)


class CLIPTextModel(nn.Module):
  """`(input_ids [N, L], attention_mask [N, L] or None)` -> last_hidden_state [N, L, hidden_size] float32;
  with `return_pooled=True` also the pooled output [N, hidden_size] at each sequence's end token."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               return_pooled: bool = False) -> Any:
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'CLIPTextModel: unsupported hidden_act {self.hidden_act!r}')
    n, length = input_ids.shape
    if length > self.max_position_embeddings:
      raise ValueError(f'CLIPTextModel: {length} tokens exceed max_position_embeddings '
                       f'{self.max_position_embeddings}')
    d = self.hidden_size
    x = Embedding(self.vocab_size, d, name=PREFIX + 'embeddings.token_embedding')(input_ids)
    x = x + Embedding(self.max_position_embeddings, d, name=PREFIX + 'embeddings.position_embedding')(
        jnp.arange(length))
    x = x.astype(self.dtype)
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:  # padding: those keys are hidden from every query
      mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(d, self.intermediate_size, self.num_attention_heads, self.hidden_act,
                           self.layer_norm_eps, name=f'{PREFIX}encoder.layers.{i}')(x, mask)
    x = LayerNorm(d, self.layer_norm_eps, name=PREFIX + 'final_layer_norm')(x).astype(jnp.float32)
    if not return_pooled:
      return x
    # transformers: configs from before its eos fix (eos_token_id == 2) pool at the largest id (the
    # end token has the largest id in CLIP's vocabulary); newer ones at the first end token.
    ids = jnp.asarray(input_ids)
    position = jnp.argmax(ids if self.eos_token_id == 2 else (ids == self.eos_token_id), axis=-1)
    return x, x[jnp.arange(n), position]


# ----------------------------------------------------------------------------------------------------
# transformers config.json -> module.

_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
           'max_position_embeddings', 'hidden_act', 'layer_norm_eps', 'eos_token_id')
# Entries that do not shape the text encoder: other token ids, initialisation, dropout (eval only), the
# projection of CLIPTextModelWithProjection, and transformers' generic config entries (generation
# settings, serialisation bookkeeping) that older versions wrote into every config.json.
_IGNORED = frozenset((
    'architectures', 'model_type', 'bos_token_id', 'pad_token_id', 'sep_token_id',
    'decoder_start_token_id', 'forced_bos_token_id', 'forced_eos_token_id', 'initializer_range',
    'initializer_factor', 'attention_dropout', 'dropout', 'projection_dim', 'torch_dtype', 'dtype',
    'use_bfloat16', 'transformers_version', 'output_attentions', 'output_hidden_states', 'output_scores',
    'return_dict', 'return_dict_in_generate', 'torchscript', 'tie_word_embeddings', 'tie_encoder_decoder',
    'is_encoder_decoder', 'is_decoder', 'add_cross_attention', 'cross_attention_hidden_size', 'id2label',
    'label2id', 'finetuning_task', 'problem_type', 'tokenizer_class', 'prefix', 'task_specific_params',
    'chunk_size_feed_forward', 'tf_legacy_loss', 'max_length', 'min_length', 'do_sample',
    'early_stopping', 'num_beams', 'num_beam_groups', 'diversity_penalty', 'temperature', 'top_k', 'top_p',
    'typical_p', 'repetition_penalty', 'length_penalty', 'no_repeat_ngram_size',
    'encoder_no_repeat_ngram_size', 'bad_words_ids', 'num_return_sequences', 'remove_invalid_values',
    'exponential_decay_length_penalty', 'suppress_tokens', 'begin_suppress_tokens'))
_DEFAULTS = {f.name: f.default for f in CLIPTextModel.__dataclass_fields__.values() if f.name in _FIELDS}


def from_transformers_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> CLIPTextModel:
  """The module for a transformers `CLIPTextModel` config.json dict; unknown entries are a ValueError."""
  values = dict(_DEFAULTS)
  for key, value in config.items():
    if key.startswith('_') or key in _IGNORED:
      continue
    if key == 'pruned_heads':
      if value:
        raise ValueError(f'CLIPTextModel config: unsupported pruned_heads={value!r}')
      continue
    if key not in _FIELDS:
      raise ValueError(f'CLIPTextModel config: unknown key {key!r}')
    values[key] = value
  if values['hidden_act'] not in _ACTIVATIONS:
    raise ValueError(f'CLIPTextModel config: unsupported hidden_act={values["hidden_act"]!r}')
  if values['hidden_size'] % values['num_attention_heads']:
    raise ValueError('CLIPTextModel config: num_attention_heads does not divide hidden_size')
  return CLIPTextModel(**values, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# transformers state_dict -> variables.


def params_template(encoder: CLIPTextModel) -> dict:
  """Abstract `params` (shapes and dtypes) of `encoder`, without allocating."""
  return jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))['params']


def convert_transformers_state(state: Mapping[str, Any], encoder: CLIPTextModel) -> dict:
  """A transformers CLIPTextModel state_dict (name -> array) as `encoder`'s variables, float32.

  Names may carry the `text_model.` prefix (published checkpoints) or not (transformers >= 5), but not
  both. The `embeddings.position_ids` buffer of older checkpoints must be arange(max_position_embeddings);
  it is recomputed, not stored. Any other missing, unexpected or mis-shaped key is a ValueError naming it.
  """
  prefixed = [name for name in state if name.startswith(PREFIX)]
  if prefixed and len(prefixed) != len(state):
    bare = next(name for name in state if not name.startswith(PREFIX))
    raise ValueError(f'CLIPTextModel state_dict: {bare!r} lacks the {PREFIX!r} prefix the other keys have')
  state = dict(state) if prefixed else {PREFIX + name: value for name, value in state.items()}
  position_ids = state.pop(PREFIX + 'embeddings.position_ids', None)
  if position_ids is not None:
    expected = np.arange(encoder.max_position_embeddings)[None]
    position_ids = np.asarray(position_ids)
    if position_ids.shape != expected.shape or not np.array_equal(position_ids, expected):
      raise ValueError(f'CLIPTextModel state_dict: {PREFIX}embeddings.position_ids is not '
                       f'arange({encoder.max_position_embeddings})')
  return strict_variables(state, params_template(encoder), 'CLIPTextModel state_dict')
