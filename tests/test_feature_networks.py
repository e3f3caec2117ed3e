"""sida_jax.formats.feature_networks: the weight files of GDD's projected discriminator, found by name in one
folder and read without torch; GDD's class-embedding pickle (an nn.Embedding written through dill) and its
exports; the two allow-list entries that pickle needs, and nothing more."""
import collections
import dataclasses
import io
import pickle

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from sida_jax.formats import feature_networks as fn
from sida_jax.formats import torch_files
from torch_pickles import (Global, Storage, Tensor, TorchPickler, op_call, op_global, op_pickle, op_str,
                           zip_torch_save)

NAMES = ("vgg16_bn", "tf_efficientnet_lite0")


@dataclasses.dataclass(eq=False)
class _Embedding:
  state: dict


@dataclasses.dataclass(eq=False)
class _DillSet:
  """An empty set as dill writes it: `dill._dill._load_type('set')([])`."""


@dataclasses.dataclass(eq=False)
class _DillType:
  """`dill._dill._load_type(name)`, written by name (pickle wants the reduce function callable)."""
  name: str

  def __call__(self, *args):
    raise TypeError("a name, not a function")


class _GDDPickler(TorchPickler):
  dispatch = dict(TorchPickler.dispatch)

  def save_embedding(self, obj):
    # What pickle writes for an nn.Module: NEWOBJ of its class, then BUILD with its __dict__.
    self.save(Global("torch.nn.modules.sparse", "Embedding"))
    self.save(())
    self.write(pickle.NEWOBJ)
    self.memoize(obj)
    self.save(obj.state)
    self.write(pickle.BUILD)

  dispatch[_Embedding] = save_embedding

  def reducer_override(self, obj):
    if isinstance(obj, _DillSet):
      return _DillType("set"), ([],)
    if isinstance(obj, _DillType):
      return Global("dill._dill", "_load_type"), (obj.name,)
    return super().reducer_override(obj)


def _embedding_pickle(table):
  """{'embed': nn.Embedding} with the layout of GDD's in_embeddings/tf_efficientnet_lite0.pkl (protocol 3,
  storages as _load_from_bytes blobs, the parameter rebuilt by _rebuild_parameter, dill's set)."""
  storage = Storage(table.ravel().copy(), key="140000000")
  weight = Tensor.view_of(storage, storage.array.reshape(table.shape), parameter=True)
  empty = collections.OrderedDict
  state = {"training": True, "_parameters": empty(weight=weight), "_buffers": empty(),
           "_non_persistent_buffers_set": _DillSet(), "_backward_hooks": empty(), "_forward_hooks": empty(),
           "_forward_pre_hooks": empty(), "_state_dict_hooks": empty(), "_load_state_dict_pre_hooks": empty(),
           "_modules": empty(), "num_embeddings": table.shape[0], "embedding_dim": table.shape[1],
           "padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}
  out = io.BytesIO()
  _GDDPickler(out, 3).dump({"embed": _Embedding(state)})
  return out.getvalue()


def _table(shape=(12, 6), seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_gdd_class_embedding_pickle_and_its_exports(tmp_path):
  table = _table()
  folder = tmp_path / "in_embeddings"
  folder.mkdir()
  data = _embedding_pickle(table)
  assert b"torch.nn.modules.sparse\nEmbedding" in data and b"dill._dill\n_load_type" in data
  (folder / "tf_efficientnet_lite0.pkl").write_bytes(data)
  np.testing.assert_array_equal(fn.read_class_embedding(str(folder / "tf_efficientnet_lite0.pkl")), table)
  np.savez(folder / "tf_efficientnet_lite0.npz", weight=table)
  np.testing.assert_array_equal(fn.read_class_embedding(str(folder / "tf_efficientnet_lite0.npz")), table)
  safetensors_numpy.save_file({"weight": table}, str(folder / "tf_efficientnet_lite0.safetensors"))
  np.testing.assert_array_equal(fn.read_class_embedding(str(folder / "tf_efficientnet_lite0.safetensors")), table)
  np.savez(tmp_path / "other.npz", table=table)
  with pytest.raises(ValueError, match="no 2-D class-embedding table 'weight'"):
    fn.read_class_embedding(str(tmp_path / "other.npz"))
  (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"embed": [1, 2]}))
  with pytest.raises(ValueError, match='expected {"embed": nn.Embedding}'):
    fn.read_class_embedding(str(tmp_path / "plain.pkl"))


@pytest.mark.parametrize("payload,refused", [
    (lambda p: op_call(op_global("dill._dill", "_load_type", p), op_str("CodeType")), "_load_type('CodeType')"),
    (lambda p: op_call(op_global("dill._dill", "_load_type", p), op_str("list")), "_load_type('list')"),
    (lambda p: op_call(op_global("dill._dill", "_create_function", p)), "'dill._dill._create_function'"),
    (lambda p: op_global("torch.nn.modules.sparse", "EmbeddingBag", p), "'torch.nn.modules.sparse.EmbeddingBag'"),
    (lambda p: op_global("dill", "loads", p), "'dill.loads'"),
])
def test_only_the_embedding_and_dills_set_are_allowed(tmp_path, payload, refused):
  path = tmp_path / "payload.pkl"
  path.write_bytes(op_pickle(payload(3), 3))
  with pytest.raises(torch_files.UnsafePickleError, match=refused.replace("(", r"\(").replace(")", r"\)")):
    torch_files.read_pickle(str(path))


def test_embedding_stub_is_inert():
  """The stand-in cannot be patched, and `_load_type('set')` followed by a call is a plain set, nothing else."""
  stub = torch_files.GLOBALS["torch.nn.modules.sparse.Embedding"]
  with pytest.raises(AttributeError, match="read-only"):
    stub.new = print
  empty_list = pickle.EMPTY_LIST + pickle.MARK + op_str("a") + op_str("b") + pickle.APPENDS
  body = op_call(op_call(op_global("dill._dill", "_load_type", 3), op_str("set")), empty_list)
  assert torch_files.read_pickle(io.BytesIO(op_pickle(body, 3))) == {"a", "b"}


def _state_dict(seed):
  rng = np.random.default_rng(seed)
  return {"features.0.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
          "features.0.bias": rng.standard_normal(4).astype(np.float32)}


def _tensors(state_dict):
  """The arrays as tensors of a torch.save file (one storage each)."""
  out = {}
  for key, value in state_dict.items():
    storage = Storage(value.ravel().copy(), key=key)
    out[key] = Tensor.view_of(storage, storage.array.reshape(value.shape))
  return out


def test_weight_files_by_name_and_format(tmp_path):
  vgg, effnet = _state_dict(1), _state_dict(2)
  zip_torch_save(_tensors(vgg), tmp_path / "vgg16_bn-6c64b313.pth")
  safetensors_numpy.save_file(effnet, str(tmp_path / "tf_efficientnet_lite0.safetensors"))
  (tmp_path / "in_embeddings").mkdir()
  np.savez(tmp_path / "in_embeddings" / "tf_efficientnet_lite0.npz", weight=_table((1000, 320)))
  weights, table = fn.read(str(tmp_path), NAMES, class_embedding=True)
  for name, ref in (("vgg16_bn", vgg), ("tf_efficientnet_lite0", effnet)):
    assert sorted(weights[name]) == sorted(ref)
    for key, value in ref.items():
      np.testing.assert_array_equal(weights[name][key], value)
  np.testing.assert_array_equal(table, _table((1000, 320)))
  assert fn.read(str(tmp_path), NAMES, class_embedding=False)[1] is None
  # Facebook's DeiT release keeps the state_dict under 'model'.
  zip_torch_save({"model": _tensors(vgg)}, tmp_path / "deit.pth")
  unwrapped = fn.read_state_dict(str(tmp_path / "deit.pth"))
  np.testing.assert_array_equal(unwrapped["features.0.bias"], vgg["features.0.bias"])
  # Two files for one network: refused rather than picked.
  safetensors_numpy.save_file(vgg, str(tmp_path / "vgg16_bn.safetensors"))
  with pytest.raises(ValueError, match="several weight files for vgg16_bn"):
    fn.read(str(tmp_path), NAMES, class_embedding=False)


def test_missing_files_are_named_with_their_source_in_one_line(tmp_path):
  safetensors_numpy.save_file(_state_dict(2), str(tmp_path / "tf_efficientnet_lite0.safetensors"))
  with pytest.raises(FileNotFoundError) as error:
    fn.read(str(tmp_path), NAMES + ("deit_base_distilled_patch16_224",), class_embedding=True)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"missing in {tmp_path}: vgg16_bn-6c64b313.pth (")
  for expected in ("https://download.pytorch.org/models/vgg16_bn-6c64b313.pth", "vgg16_bn.safetensors",
                   "deit_base_distilled_patch16_224-df68dfff.pth", "in_embeddings/tf_efficientnet_lite0.pkl"):
    assert expected in message
  assert "tf_efficientnet_lite0-0aa007d2.pth" not in message   # that one is present (as .safetensors)
  with pytest.raises(FileNotFoundError, match="weights folder not found"):
    fn.read(str(tmp_path / "nowhere"), NAMES, class_embedding=False)
  with pytest.raises(ValueError, match="unknown feature network 'resnet50'"):
    fn.read(str(tmp_path), ("resnet50",), class_embedding=False)
