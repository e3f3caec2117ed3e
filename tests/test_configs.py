"""configs/*.py: every file and variant loads through config_flags, sets only base keys, and matches the
official launch tables (shared/spec REFERENCE_CODE.md §1.5, §1.7, §1.8)."""
import importlib.util
import inspect
import pathlib
import sys

from absl import flags
from ml_collections import config_flags
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import base, published  # noqa: E402

CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")
FREE_FORM = ("network.kwargs.",)   # constructor kwargs: any keys the architecture takes


def _module(path):
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants(path):
  """The arguments after the colon that a config file accepts ([None]: no argument)."""
  module = _module(path)
  if not hasattr(module, "get_config"):
    return []
  if not inspect.signature(module.get_config).parameters:
    return [None]
  if hasattr(module, "VARIANTS"):
    return list(module.VARIANTS)
  if hasattr(module, "TEACHERS"):   # EDM2: SIZE,VARIANT
    return [f"{size},{variant}" for size in module.TEACHERS for variant in module.KIMG]
  return list(published.VARIANTS)


CASES = [pytest.param(p, v, id=f"{p.name}:{v}" if v else p.name) for p in CONFIG_FILES for v in _variants(p)]


def _load(path, variant=None):
  """Exactly as main.py loads --config: a config_flags file flag, locked."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  values(["main.py", f"--config={path}" + (f":{variant}" if variant else "")])
  return values.config


def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _run_configs(config):
  """The run configurations in `config`: itself, or (a multi-stage pipeline) its sub-configs with a method."""
  if "method" in config:
    return [config]
  return [value for value in config.values() if hasattr(value, "items") and "method" in value]


@pytest.mark.parametrize("path,variant", CASES)
def test_config_loads_and_sets_only_base_keys(path, variant):
  config = _load(path, variant)
  assert config.is_locked
  runs = _run_configs(config)
  assert runs, f"{path.name}: neither a run config nor a pipeline of run configs"
  declared = {k: v for k, v in _flat(base.get_config()).items() if not k.startswith(FREE_FORM)}
  for run in runs:
    values = {k: v for k, v in _flat(run).items() if not k.startswith(FREE_FORM)}
    assert set(values) == set(declared), (sorted(set(values) - set(declared)), sorted(set(declared) - set(values)))
    for key, value in values.items():   # types as declared (ints may stand for floats)
      assert isinstance(value, type(declared[key])) or (
          isinstance(declared[key], float) and isinstance(value, int)), key
  with pytest.raises(AttributeError):
    runs[0].loss.alpah = 1.0   # locked: a misspelt override fails


def test_discovery_finds_the_variants():
  found = {(path.name, variant) for path, variant in (case.values for case in CASES)}
  assert {("smoke.py", "toy"), ("cifar10_uncond.py", "sid2a"), ("edm2.py", "m,sid2a")} <= found
  assert not any(name in ("base.py", "published.py") and v for name, v in found)


# Official values (REFERENCE_CODE.md): (file, variant) -> {key: value}.
SPOT_CHECKS = {
    ("cifar10_uncond.py", "sid"): {"method": "sid", "loss.alpha": 1.2, "batch_size": 256, "optim.critic_lr": 1e-5,
                                   "optim.generator_lr": 1e-5, "dropout": 0.13, "augment_p": 0.12,
                                   "ema.halflife_mimg": 0.5, "total_kimg": 500_000, "dtype": "float32",
                                   "init_sigma": 2.5, "loss.tmax": 800, "loss.generator_scale": 100},
    ("cifar10_cond.py", "sid"): {"total_kimg": 800_000, "data.use_labels": True, "loss.alpha": 1.2},
    ("imagenet64.py", "sid"): {"batch_size": 8192, "optim.generator_lr": 4e-6, "ema.halflife_mimg": 2.0,
                               "dropout": 0.10, "augment_p": 0.0, "dtype": "bfloat16", "optim.eps": 1e-6,
                               "total_kimg": 1_000_000},
    ("ffhq64.py", "sid"): {"optim.generator_beta1": 0.9, "batch_size": 512, "dropout": 0.05, "augment_p": 0.15},
    ("afhq64.py", "sid"): {"loss.alpha": 1.0, "optim.critic_lr": 5e-6, "optim.generator_lr": 5e-6,
                           "batch_size": 512},
    ("afhq64.py", "sida"): {"method": "sida", "loss.alpha": 1.0, "total_kimg": 200_000,
                            "data.path": "afhqv2-64x64.zip", "loss.discriminator_scale": 1.0,
                            "loss.adversarial_scale": 0.01},
    ("cifar10_uncond.py", "sida"): {"method": "sida", "loss.alpha": 1.0, "total_kimg": 300_000,
                                    "data.use_labels": False},
    ("imagenet64.py", "sid2a"): {"method": "sida", "total_kimg": 100_000, "batch_size": 8192},
    ("edm2.py", "s,sida"): {"force_normalize": False, "loss.use_logvar": False, "method": "sida",
                            "loss.discriminator_scale": 100.0, "total_kimg": 200_000},
    ("edm2.py", "s,sid"): {"force_normalize": True, "loss.use_logvar": True},
    ("edm2.py", "m,sid2a"): {"loss.generator_scale": 50.0, "total_kimg": 200_000, "dropout": 0.1,
                             "force_normalize": True},
    ("edm2.py", "xs,sid"): {"batch_size": 2048, "optim.generator_lr": 5e-5, "ema.halflife_mimg": 2.0,
                            "loss.alpha": 1.0, "loss.generator_scale": 100.0, "dropout": 0.0,
                            "augment_p": 0.0, "teacher": "edm2-img512-xs-2147483-0.135.pkl"},
    ("edm2.py", "xxl,sid2a"): {"total_kimg": 30_000, "teacher": "edm2-img512-xxl-0939524-0.070.pkl"},
    ("edm2.py", "l,sid2a"): {"total_kimg": 55_000},
}


@pytest.mark.parametrize("file,variant", list(SPOT_CHECKS))
def test_published_values(file, variant):
  config = _flat(_load(REPO / "configs" / file, variant))
  for key, expected in SPOT_CHECKS[(file, variant)].items():
    matches = config[key] == (pytest.approx(expected) if isinstance(expected, float) else expected)
    assert matches, (key, config[key], expected)


@pytest.mark.parametrize("path,arg,message", [
    ("cifar10_uncond.py", "gan", "not one of"), ("edm2.py", "xxxl,sid", "SIZE,VARIANT"),
    ("edm2.py", "s,sim", "SIZE,VARIANT"),
])
def test_bad_variants_are_rejected(path, arg, message):
  with pytest.raises(ValueError, match=message):
    _module(REPO / "configs" / path).get_config(arg)
