"""Pretrained weights of GDD's Projected-GAN discriminator, read from one folder without torch.

The folder (`config.gdd.backbones`) holds one weight file per feature network, under the name its publisher
gives it or as NAME.safetensors / NAME.pth:

  vgg16_bn                         vgg16_bn-6c64b313.pth (torchvision)
  tf_efficientnet_lite0            tf_efficientnet_lite0-0aa007d2.pth (timm release, what GDD's timm loads)
  deit_base_distilled_patch16_224  deit_base_distilled_patch16_224-df68dfff.pth (Facebook's; the state_dict
                                   under 'model')

and, for class-conditional runs, GDD's class-embedding table as the official repository ships it,
`in_embeddings/tf_efficientnet_lite0.pkl` (a pickled nn.Embedding(1000, 320)), or its export
`in_embeddings/tf_efficientnet_lite0.npz` / `.safetensors` with one entry 'weight' [1000, 320].

`.pth` files are read by the allow-listed torch reader (`torch_files`), `.safetensors` files by
`safetensors.py`; the strict conversion into our modules is the backbones' own (`models/projected_gan.py`).
"""
import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from sida_jax.formats import safetensors as safetensors_lib
from sida_jax.formats import torch_files


@dataclasses.dataclass(frozen=True)
class WeightFile:
  release: str   # the file name its publisher gives it
  source: str    # where to get it


WEIGHT_FILES = {
    'vgg16_bn': WeightFile(
        'vgg16_bn-6c64b313.pth',
        'torchvision VGG16_BN_Weights.IMAGENET1K_V1, https://download.pytorch.org/models/vgg16_bn-6c64b313.pth'),
    'tf_efficientnet_lite0': WeightFile(
        'tf_efficientnet_lite0-0aa007d2.pth',
        'https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/'
        'tf_efficientnet_lite0-0aa007d2.pth, or model.safetensors of Hugging Face timm/tf_efficientnet_lite0.in1k '
        'saved as tf_efficientnet_lite0.safetensors'),
    'deit_base_distilled_patch16_224': WeightFile(
        'deit_base_distilled_patch16_224-df68dfff.pth',
        'https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth, or model.safetensors '
        'of Hugging Face timm/deit_base_distilled_patch16_224.fb_in1k saved as '
        'deit_base_distilled_patch16_224.safetensors'),
}
CLASS_EMBEDDING = 'in_embeddings/tf_efficientnet_lite0'
CLASS_EMBEDDING_SOURCE = 'the Zyriix/GDD repository (in_embeddings/), or its .npz/.safetensors export'
CLASS_EMBEDDING_EXTENSIONS = ('.pkl', '.npz', '.safetensors')


def candidates(name: str) -> tuple:
  """The file names accepted for feature network `name`, in the order they are described."""
  if name not in WEIGHT_FILES:
    raise ValueError(f'unknown feature network {name!r}: expected one of {", ".join(WEIGHT_FILES)}')
  return WEIGHT_FILES[name].release, f'{name}.safetensors', f'{name}.pth'


def describe(names: Sequence[str], class_embedding: bool) -> str:
  """What a weights folder for `names` must hold, in one line."""
  parts = [f'{candidates(n)[0]} ({WEIGHT_FILES[n].source}; or {candidates(n)[1]} / {candidates(n)[2]})'
           for n in names]
  if class_embedding:
    parts.append(f'{CLASS_EMBEDDING}.pkl ({CLASS_EMBEDDING_SOURCE})')
  return '; '.join(parts)


def _find(directory: str, names: Sequence[str], what: str) -> str:
  """The one file of `names` present in `directory`; '' when none is."""
  present = [n for n in names if os.path.isfile(os.path.join(directory, n))]
  if len(present) > 1:
    raise ValueError(f'{directory}: several weight files for {what} ({", ".join(present)}); keep one')
  return os.path.join(directory, present[0]) if present else ''


def find_files(directory: str, names: Sequence[str], class_embedding: bool) -> dict:
  """{feature network name: path} (and 'class_embedding' when asked for) of the files in `directory`.

  Raises FileNotFoundError, in one line, naming every missing file and where to get it.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'weights folder not found: {directory} (it must hold {describe(names, class_embedding)})')
  found, missing = {}, []
  for name in names:
    found[name] = _find(directory, candidates(name), name)
    if not found[name]:
      missing.append(name)
  if class_embedding:
    found['class_embedding'] = _find(directory, [CLASS_EMBEDDING + e for e in CLASS_EMBEDDING_EXTENSIONS],
                                     'the class embedding')
  absent = describe(missing, class_embedding and not found['class_embedding'])
  if absent:
    raise FileNotFoundError(f'missing in {directory}: {absent}')
  return found


def read_state_dict(path: str) -> dict:
  """A torchvision/timm state_dict (name -> numpy array) from a .pth or .safetensors file. A .pth whose only
  content is a dict under 'model' (Facebook's DeiT releases) is unwrapped."""
  if path.endswith('.safetensors'):
    return safetensors_lib.read_safetensors(path)
  contents = torch_files.read_torch_file(path)
  if isinstance(contents, Mapping) and set(contents) == {'model'} and isinstance(contents['model'], Mapping):
    contents = contents['model']
  if not isinstance(contents, Mapping) or not all(isinstance(v, np.ndarray) for v in contents.values()):
    raise ValueError(f'{path}: not a state_dict of tensors')
  return dict(contents)


def read_class_embedding(path: str) -> np.ndarray:
  """GDD's class table [classes, features] from the official pickle of an nn.Embedding, or from an
  .npz / .safetensors with one entry 'weight'."""
  if path.endswith('.pkl'):
    contents = torch_files.read_pickle(path, 'a class-embedding pickle')
    module = contents.get('embed') if isinstance(contents, Mapping) else None
    if getattr(module, 'class_name', '') != 'torch.nn.modules.sparse.Embedding':
      raise ValueError(f'{path}: expected {{"embed": nn.Embedding}}, got {type(contents).__name__}')
    table = module.state_dict().get('weight')
  elif path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as arrays:
      table = arrays['weight'] if 'weight' in arrays.files else None
  else:
    table = safetensors_lib.read_safetensors(path).get('weight')
  if table is None or np.ndim(table) != 2:
    raise ValueError(f"{path}: no 2-D class-embedding table 'weight'")
  return np.asarray(table, np.float32)


def read(directory: str, names: Sequence[str], class_embedding: bool) -> tuple:
  """({name: state_dict}, class table or None) for the feature networks `names` from `directory`."""
  files = find_files(directory, names, class_embedding)
  weights = {name: read_state_dict(files[name]) for name in names}
  table = read_class_embedding(files['class_embedding']) if class_embedding else None
  return weights, table
