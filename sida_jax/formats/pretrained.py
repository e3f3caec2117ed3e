"""diffusers / transformers model folders (config.json + safetensors) -> sida_jax networks, without torch.

    unet = load_pretrained('stable-diffusion-v1-5/unet')          # a PretrainedNetwork
    eps = unet(latents_nhwc, timesteps, text_embeddings)
    sd = load_pretrained('stable-diffusion-v1-5')                 # a whole pipeline folder
    ids = sd.tokenizer(prompts).input_ids; text = sd.text_encoder(ids); image = sd.vae(z, method='decode')

A model folder holds `config.json` and its weights: `diffusion_pytorch_model.safetensors` (diffusers) or
`model.safetensors` (transformers), possibly sharded behind `*.safetensors.index.json`. The class comes
from `_class_name` (diffusers) or `architectures` (transformers) and selects a builder (config -> Flax
module) and a strict state_dict converter that live next to their module. PyTorch `.bin` weights are
read with the project's allow-listed torch reader; single-file `.ckpt` checkpoints are refused.
A pipeline folder (`model_index.json`) loads its denoiser (`unet`: Stable Diffusion; `transformer`: PixArt),
text_encoder, tokenizer, vae and scheduler config. With `weights=False` only the config files are read: the
networks come with ShapeDtypeStruct variables (the memory plan sizes a run from them).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONFIG = 'config.json'
MODEL_INDEX = 'model_index.json'
SCHEDULER_CONFIG = 'scheduler_config.json'
# Weight file stems: diffusers, transformers.
WEIGHT_STEMS = ('diffusion_pytorch_model', 'model')
# The denoiser entry of a pipeline's model_index.json: Stable Diffusion's U-Net or PixArt's transformer.
DENOISER_PARTS = ('unet', 'transformer')
_PIPELINE_PARTS = ('text_encoder', 'tokenizer', 'vae', 'scheduler')
_TOKENIZER_CLASSES = {'CLIPTokenizer': 'clip', 'CLIPTokenizerFast': 'clip', 'T5Tokenizer': 't5',
                      'T5TokenizerFast': 't5'}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How one published class becomes ours: config dict -> module, state_dict -> variables, and the variables'
  shapes without weights."""
  build: Callable[[Mapping[str, Any], Any], nn.Module]
  convert: Callable[[Mapping[str, Any], nn.Module], dict]
  params_template: Callable[[nn.Module], Any]


def _module_architecture(module) -> Architecture:
  """A model module exposing `from_config(config, dtype)`, `variables_from_state_dict(net, state)` and
  `params_template(net)`."""
  return Architecture(module.from_config, lambda state, net: module.variables_from_state_dict(net, state),
                      module.params_template)


def _registry() -> dict[str, Architecture]:
  # Local imports: the networks are only needed once a folder is read.
  from sida_jax.models import vae  # pylint: disable=import-outside-toplevel
  from sida_jax.models.t2i import clip_text, pixart, sd_unet, t5  # pylint: disable=import-outside-toplevel
  return {
      'UNet2DConditionModel': Architecture(sd_unet.from_diffusers_config, sd_unet.convert_diffusers_state,
                                           sd_unet.params_template),
      'AutoencoderKL': Architecture(vae.from_diffusers_config, vae.convert_diffusers_state, vae.params_template),
      'CLIPTextModel': Architecture(clip_text.from_transformers_config, clip_text.convert_transformers_state,
                                    clip_text.params_template),
      **dict.fromkeys(pixart.CLASS_NAMES, _module_architecture(pixart)),
      **dict.fromkeys(t5.CLASS_NAMES, _module_architecture(t5)),
  }


def supported_classes() -> tuple:
  return tuple(_registry())


@dataclasses.dataclass
class PretrainedNetwork:
  """A loaded network in eval mode: `net(*inputs)` is `module.apply(variables, *inputs)`, jitted.

  `net(..., method='decode')` calls another method of the module (the VAE's `encode` / `decode`);
  python bool/str keyword arguments (e.g. `return_pooled=True`) are static.
  """
  module: nn.Module
  variables: dict
  class_name: str
  config: dict
  _compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  @property
  def params(self) -> Any:
    return self.variables['params']

  def __call__(self, *args: Any, method: Optional[str] = None, **kwargs: Any) -> Any:
    flags = {k: v for k, v in kwargs.items() if isinstance(v, (bool, str))}
    arrays = {k: v for k, v in kwargs.items() if k not in flags}
    key = (method, tuple(sorted(flags.items())))
    if key not in self._compiled:
      apply = functools.partial(self.module.apply, **flags)
      if method is not None:
        apply = functools.partial(apply, method=method)
      self._compiled[key] = jax.jit(apply)
    return self._compiled[key](self.variables, *args, **arrays)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The parts of a text-to-image pipeline folder that distillation uses: Stable Diffusion (`unet`, CLIP
  text encoder and tokenizer) or PixArt (`transformer`, T5 text encoder and tokenizer)."""
  class_name: str
  text_encoder: Optional[PretrainedNetwork] = None
  tokenizer: Any = None  # sida_jax.text.CLIPTokenizer or T5Tokenizer
  vae: Optional[PretrainedNetwork] = None
  scheduler: Optional[dict] = None  # scheduler_config.json, with its `_class_name`
  unet: Optional[PretrainedNetwork] = None
  transformer: Optional[PretrainedNetwork] = None

  @property
  def denoiser(self) -> PretrainedNetwork:
    """The pipeline's noise-prediction network: the U-Net or the transformer."""
    return self.unet if self.unet is not None else self.transformer


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f'{path}: not valid JSON ({error})') from error


def class_name_of(config: Mapping[str, Any], path: str) -> str:
  """`_class_name` (diffusers) or the single entry of `architectures` (transformers)."""
  if '_class_name' in config:
    return config['_class_name']
  architectures = config.get('architectures') or []
  if len(architectures) != 1:
    raise ValueError(f'{path}: no `_class_name` and not exactly one `architectures` entry ({architectures})')
  return architectures[0]


def _read_torch_state(path: str) -> Mapping[str, Any]:
  """A `torch.save`d state_dict (`*.bin`) through the project's allow-listed reader (no torch needed)."""
  from sida_jax.formats.torch_files import read_torch_file  # pylint: disable=import-outside-toplevel
  state = read_torch_file(path)
  if not isinstance(state, Mapping) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ValueError(f'{path}: not a state_dict of tensors')
  return state


def _read_safetensors(path: str) -> Mapping[str, Any]:
  from sida_jax.formats.safetensors import read_safetensors  # pylint: disable=import-outside-toplevel
  return read_safetensors(path)   # bounded header, fp16/bf16 widened to float32


def _read_sharded(folder: str, index_name: str, reader: Callable[[str], Mapping[str, Any]]) -> dict:
  """The union of the shards named by an `*.index.json` weight_map; every shard must hold exactly the keys
  the index assigns to it."""
  index_path = os.path.join(folder, index_name)
  weight_map = _read_json(index_path).get('weight_map')
  if not isinstance(weight_map, Mapping):
    raise ValueError(f'{index_path}: no weight_map')
  by_shard = {}
  for name, shard in weight_map.items():
    by_shard.setdefault(shard, set()).add(name)
  state = {}
  for shard in sorted(by_shard):
    shard_state = reader(os.path.join(folder, shard))
    for name in sorted(shard_state):
      if name in state:
        raise ValueError(f'{os.path.join(folder, shard)}: key {name!r} is also in another shard')
    misplaced = sorted(set(shard_state) ^ by_shard[shard])
    if misplaced:
      raise ValueError(f'{index_path}: key {misplaced[0]!r} is not where the index says')
    state.update(shard_state)
  return state


def read_state_dict(folder: str, variant: Optional[str] = None) -> dict:
  """The weights of a model folder as name -> numpy array, in stored dtypes.

  Looks for (safetensors first) `<stem>[.<variant>].safetensors`, its sharded index
  `<stem>.safetensors.index[.<variant>].json`, then the same for `.bin`, with stem
  `diffusion_pytorch_model` or `model`.
  """
  tag = f'.{variant}' if variant else ''
  for ext, reader in (('safetensors', _read_safetensors), ('bin', _read_torch_state)):
    for stem in WEIGHT_STEMS + (('pytorch_model',) if ext == 'bin' else ()):
      index_name = f'{stem}.{ext}.index{tag}.json'
      if os.path.isfile(os.path.join(folder, index_name)):
        return _read_sharded(folder, index_name, reader)
      single = os.path.join(folder, f'{stem}{tag}.{ext}')
      if os.path.isfile(single):
        return dict(reader(single))
  present = sorted(os.listdir(folder))
  checkpoints = [name for name in present if name.endswith(('.ckpt', '.pt', '.pth'))]
  if checkpoints:
    raise ValueError(f'{os.path.join(folder, checkpoints[0])}: single-file checkpoints are not read; '
                     'convert it to a diffusers/transformers folder with safetensors weights')
  wanted = ' or '.join(f'{stem}{tag}.safetensors' for stem in WEIGHT_STEMS)
  raise FileNotFoundError(f'{folder}: no weights found (expected {wanted}, or a sharded '
                          f'*.safetensors.index{tag}.json); files present: {present}')


def load_network(folder: str, dtype: Any = jnp.float32, variant: Optional[str] = None,
                 weights: bool = True) -> PretrainedNetwork:
  """One model folder (`config.json` + weights) as a PretrainedNetwork computing in `dtype`; `weights=False`
  reads config.json alone and gives the variables as ShapeDtypeStructs (float32, as converted weights are)."""
  config_path = os.path.join(folder, CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} not found')
  config = _read_json(config_path)
  class_name = class_name_of(config, config_path)
  registry = _registry()
  if class_name not in registry:
    raise ValueError(f'{config_path}: unsupported class {class_name!r} (supported: {", ".join(registry)})')
  architecture = registry[class_name]
  module = architecture.build(config, dtype)
  if weights:
    variables = architecture.convert(read_state_dict(folder, variant), module)
  else:
    variables = {'params': architecture.params_template(module)}
  return PretrainedNetwork(module, variables, class_name, config)


def _same_architecture(declared: str, stored: str) -> bool:
  """Whether two class names build the same module (PixArt's folders declare `Transformer2DModel` and
  store either spelling)."""
  registry = _registry()
  return declared == stored or (declared in registry and registry[declared] == registry.get(stored))


def _load_tokenizer(folder: str, declared: str, index_path: str) -> Any:
  kind = _TOKENIZER_CLASSES.get(declared)
  if kind is None:
    raise ValueError(f'{index_path}: unsupported tokenizer class {declared!r}')
  if kind == 'clip':
    from sida_jax.text.clip_tokenizer import CLIPTokenizer  # pylint: disable=import-outside-toplevel
    return CLIPTokenizer.from_folder(folder)
  from sida_jax.text.t5_tokenizer import T5Tokenizer  # pylint: disable=import-outside-toplevel
  return T5Tokenizer.from_folder(folder)


def _index_entry(index: Mapping[str, Any], part: str, index_path: str) -> str:
  entry = index.get(part)
  if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
    raise ValueError(f'{index_path}: no {part!r} entry [library, class]')
  return entry[1]


def denoiser_part(folder: str) -> str:
  """'unet' (Stable Diffusion) or 'transformer' (PixArt): the denoiser entry of a pipeline folder's index."""
  index_path = os.path.join(folder, MODEL_INDEX)
  index = _read_json(index_path)
  present = [part for part in DENOISER_PARTS if index.get(part) is not None]
  if len(present) != 1:
    raise ValueError(f'{index_path}: no {DENOISER_PARTS[0]!r} entry [library, class]' if not present else
                     f'{index_path}: both {" and ".join(map(repr, present))} entries (expected one denoiser)')
  return present[0]


def load_pipeline(folder: str, dtype: Any = jnp.float32, variant: Optional[str] = None,
                  parts: Optional[Sequence[str]] = None, weights: bool = True) -> Pipeline:
  """A pipeline folder: `model_index.json` naming unet/ (Stable Diffusion) or transformer/ (PixArt),
  text_encoder/, tokenizer/, vae/ and scheduler/ (other parts, such as the safety checker, are not loaded).

  `parts` loads only those entries (e.g. the text side without the 3.4 GB U-Net); the others are None.
  `weights=False`: the networks' variables are ShapeDtypeStructs, no weight file is opened.
  """
  index_path = os.path.join(folder, MODEL_INDEX)
  index = _read_json(index_path)
  wanted = [denoiser_part(folder)] + list(_PIPELINE_PARTS)
  if parts is not None:
    unknown = sorted(set(parts) - set(wanted))
    if unknown:
      raise ValueError(f'{index_path}: no part {unknown[0]!r} to load (parts: {", ".join(wanted)})')
    wanted = [part for part in wanted if part in parts]
  loaded = {}
  for part in wanted:
    declared = _index_entry(index, part, index_path)
    sub = os.path.join(folder, part)
    if part == 'tokenizer':
      loaded[part] = _load_tokenizer(sub, declared, index_path)
    elif part == 'scheduler':
      scheduler = _read_json(os.path.join(sub, SCHEDULER_CONFIG))
      loaded[part] = dict(scheduler, _class_name=scheduler.get('_class_name', declared))
    else:
      network = load_network(sub, dtype, variant, weights)
      if not _same_architecture(declared, network.class_name):
        raise ValueError(f'{index_path}: {part} is declared {declared!r} but {sub} holds {network.class_name!r}')
      loaded[part] = network
  return Pipeline(class_name=index.get('_class_name', ''), **loaded)


def load_pretrained(folder: str, dtype: Any = jnp.float32, variant: Optional[str] = None):
  """A pipeline folder (with `model_index.json`) as a `Pipeline`, or a model folder as a `PretrainedNetwork`.

  Parameters are float32 whatever the stored dtype; `dtype` is the compute dtype. `variant` picks
  weights such as `diffusion_pytorch_model.fp16.safetensors`.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'pretrained folder not found: {folder}')
  if os.path.isfile(os.path.join(folder, MODEL_INDEX)):
    return load_pipeline(folder, dtype, variant)
  return load_network(folder, dtype, variant)
