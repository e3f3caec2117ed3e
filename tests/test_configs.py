"""configs/*.py: every file and variant loads through config_flags, sets only base keys, carries the
published values of its paper / official launch script (a table citing shared/spec ALGORITHMS.md and
REFERENCE_CODE.md section by section), and refuses to run another method's recipe."""
import importlib.util
import inspect
import pathlib
import sys

from absl import flags
from ml_collections import config_flags
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import base  # noqa: E402
from sida_jax.losses import method as method_lib  # noqa: E402

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
  raise AssertionError(f"{path.name}: get_config takes an argument but the file lists no VARIANTS")


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
  assert {("smoke.py", "toy"), ("cifar10_uncond.py", "sid2a"), ("edm2.py", "m,sid2a"), ("cifar10_uncond.py", "sim"),
          ("cifar10_cond.py", "lsg"), ("imagenet64.py", "gdd"), ("afhq64.py", "gddi")} <= found
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
    ("edm2.py", "s,sim", "SIZE,VARIANT"), ("ffhq64.py", "sim", "not one of"),
    ("cifar10_uncond.py", "lsg", "not one of"), ("sd15_lsg.py", "k5", "not one of"),
    ("sd21_lsg.py", "k2_fp16", "not one of"), ("pixart_sim.py", "fp16", "not one of"),
])
def test_bad_variants_are_rejected(path, arg, message):
  with pytest.raises(ValueError, match=message):
    _module(REPO / "configs" / path).get_config(arg)


# ---------------------------------------------------------------------------------------------------------
# The published recipes, value by value. Sections: A = shared/spec ALGORITHMS.md, R = REFERENCE_CODE.md.

# SiD, R §1.5 (`run_sid.sh`) with A §8.1, §12.8 (Adam, ε 1e-6 with fp16), §12.10 (dropout), §12.11 (augment).
SID_COMMON = {"method": "sid", "init_sigma": 2.5, "loss.tmax": 800, "loss.generator_scale": 100,
              "loss.critic_scale": 1, "loss.p_mean": -1.2, "loss.p_std": 1.2, "optim.critic_beta1": 0.0,
              "optim.beta2": 0.999, "ema.rampup_ratio": 0.05}
SID_ROWS = {   # teacher, batch, lr, fp16, dropout, augment, EMA, α(SiD), generator β1, kimg, labels
    "cifar10_uncond": ("edm-cifar10-32x32-uncond-vp.pkl", 256, 1e-5, False, 0.13, 0.12, 0.5, 1.2, 0.0, 500_000, False),
    "cifar10_cond": ("edm-cifar10-32x32-cond-vp.pkl", 256, 1e-5, False, 0.13, 0.12, 0.5, 1.2, 0.0, 800_000, True),
    "imagenet64": ("edm-imagenet-64x64-cond-adm.pkl", 8192, 4e-6, True, 0.10, 0.0, 2.0, 1.2, 0.0, 1_000_000, True),
    "ffhq64": ("edm-ffhq-64x64-uncond-vp.pkl", 512, 1e-5, True, 0.05, 0.15, 0.5, 1.2, 0.9, 500_000, False),
    "afhq64": ("edm-afhqv2-64x64-uncond-vp.pkl", 512, 5e-6, True, 0.05, 0.15, 0.5, 1.0, 0.0, 500_000, False),
}
DATA = {"cifar10_uncond": "cifar10-32x32.zip", "cifar10_cond": "cifar10-32x32.zip",
        "imagenet64": "imagenet-64x64.zip", "ffhq64": "ffhq-64x64.zip", "afhq64": "afhqv2-64x64.zip"}
# SiDA / SiD²A, R §1.7 (`run_sida.sh`, `run_sid_sida.sh`; A §12.4–12.7, §12.16): α 1, λ_adv 0.01, λ_D 1,
# critic clip 1, stages 100/200 kimg; BCE pool = `batch-gpu` 32/32/32/64/64; kimg SiDA / SiD²A.
SIDA_ROWS = {"cifar10_uncond": (32, 300_000), "cifar10_cond": (32, 300_000), "imagenet64": (32, 300_000),
             "ffhq64": (64, 200_000), "afhq64": (64, 200_000)}


def _sid_family(dataset, variant):
  teacher, batch, lr, fp16, dropout, augment, ema, alpha, g_beta1, kimg, cond = SID_ROWS[dataset]
  row = dict(SID_COMMON, **{
      "teacher": teacher, "batch_size": batch, "optim.critic_lr": lr, "optim.generator_lr": lr,
      "optim.eps": 1e-6 if fp16 else 1e-8, "dtype": "bfloat16" if fp16 else "float32", "dropout": dropout,
      "augment_p": augment, "ema.halflife_mimg": ema})
  if variant == "sid":
    row.update({"loss.alpha": alpha, "optim.generator_beta1": g_beta1, "total_kimg": kimg,
                "data.source": "edm_zip" if cond else "", "recipe": f"{dataset}:sid"})
    return "R §1.5, A §8.1, §12.8, §12.10, §12.16", row
  pool, sida_kimg = SIDA_ROWS[dataset]
  row.update({"method": "sida", "loss.alpha": 1.0, "optim.generator_beta1": 0.0, "loss.adv_pool_size": pool,
              "loss.adversarial_scale": 0.01, "loss.discriminator_scale": 1.0, "loss.critic_grad_clip": 1.0,
              "loss.critic_only_kimg": 100, "loss.sid_only_kimg": 200, "data.source": "edm_zip",
              "data.path": DATA[dataset], "data.use_labels": cond, "generator_init": "",
              "total_kimg": sida_kimg if variant == "sida" else 100_000})
  return "R §1.7, A §3.7, §8.1, §12.4–12.7, §12.16", row


# SIM, A §4.3–4.4 and §8.4 ([001] Table 5): lr 1e-5 both, batch 256, σ(t*) 2.5, Adam (0, 0.999), fake net
# p_EDM(−1.2, 1.2) with λ_EDM, generator p_SIM(−3.5, 2.5) with weight 1; c by the ICT rule (A-12: huber_c 0).
# What [001] leaves out it takes from SiD's CIFAR-10 setting (VP teacher, dropout, augment, EMA, fp32, length).
def _sim(dataset):
  teacher, _, _, _, dropout, augment, ema, _, _, kimg, cond = SID_ROWS[dataset]
  return "A §4.3–4.4, §8.4; unstated values: SiD's CIFAR-10 row (R §1.5)", {
      "method": "sim", "teacher": teacher, "batch_size": 256, "optim.critic_lr": 1e-5, "optim.generator_lr": 1e-5,
      "init_sigma": 2.5, "optim.critic_beta1": 0.0, "optim.generator_beta1": 0.0, "optim.beta2": 0.999,
      "loss.p_mean": -1.2, "loss.p_std": 1.2, "loss.generator_p_mean": -3.5, "loss.generator_p_std": 2.5,
      "loss.generator_scale": 1.0, "loss.huber_c": 0.0, "dropout": dropout, "augment_p": augment,
      "ema.halflife_mimg": ema, "dtype": "float32", "optim.eps": 1e-8, "total_kimg": kimg,
      "data.source": "edm_zip" if cond else "", "recipe": f"{dataset}:sim"}


# SiD-LSG on class-conditional EDM teachers, A §5.3–5.4, §8.3, §12.17: α 1, λ_sid 1, 10% null labels in the
# critic phase, κ1 = κ2 = κ3 = κ4 = 1.5 ([002]'s best-FID LSG scale, A §9.7); the rest is SiD's row (A §8.1).
def _lsg(dataset):
  teacher, batch, lr, fp16, dropout, augment, ema, _, _, kimg, _ = SID_ROWS[dataset]
  return "A §5.3–5.4, §8.3, §9.7, §12.17; SiD's row (R §1.5)", {
      "method": "lsg", "teacher": teacher, "batch_size": batch, "optim.critic_lr": lr, "optim.generator_lr": lr,
      "dtype": "bfloat16" if fp16 else "float32", "dropout": dropout, "augment_p": augment,
      "ema.halflife_mimg": ema, "total_kimg": kimg, "loss.alpha": 1.0, "loss.generator_scale": 1.0,
      "loss.kappa1": 1.5, "loss.kappa2": 1.5, "loss.kappa3": 1.5, "loss.kappa4": 1.5, "loss.null_label_rate": 0.1,
      "init_sigma": 2.5, "loss.tmax": 800, "data.use_labels": True}


# GDD / GDD-I, A §8.5 ([004] Table 6) with A §6.3–6.5, §6.8, §12.18 and R §4.1: Adam (0, 0.99) for G and D
# (the loop turns D's into lr·16/17, β2^(16/17)), ε 1e-8, bf16, dropout 0, no augmentation, EMA ramp-up 0.05,
# lazy R1 every 16 iterations, σ_max 80, 8 GPUs (so each official GAN sum runs over batch/8 samples); teachers:
# VE NCSN++ (CIFAR-10, AFHQv2, FFHQ) and ADM (ImageNet-64), `train.sh --transfer`.
GDD_ROWS = {   # teacher, G lr, D lr, batch, γ_R1, EMA, Mimg GDD, Mimg GDD-I
    "cifar10_uncond": ("edm-cifar10-32x32-uncond-ve.pkl", 1e-4, 1e-4, 256, 1e-4, 0.5, 5, 5),
    "cifar10_cond": ("edm-cifar10-32x32-cond-ve.pkl", 1e-4, 1e-4, 256, 1e-4, 0.5, 5, 5),
    "afhq64": ("edm-afhqv2-64x64-uncond-ve.pkl", 2e-5, 4e-5, 256, 1e-4, 0.5, 5, 10),
    "ffhq64": ("edm-ffhq-64x64-uncond-ve.pkl", 2e-5, 4e-5, 256, 1e-4, 0.5, 5, 10),
    "imagenet64": ("edm-imagenet-64x64-cond-adm.pkl", 8e-6, 4e-5, 512, 4e-4, 50.0, 5, 5),
}
# [004] §6.3 / `train.sh --backbone 1` (CIFAR-10) and `--backbone 0` (the 64×64 datasets).
GDD_FEATURE_NETWORKS = {"cifar10_uncond": ("vgg16_bn", "tf_efficientnet_lite0"),
                        "cifar10_cond": ("vgg16_bn", "tf_efficientnet_lite0")}
DEIT_EFFNET = ("deit_base_distilled_patch16_224", "tf_efficientnet_lite0")


def _gdd(dataset, variant):
  teacher, g_lr, d_lr, batch, gamma, ema, mimg, mimg_i = GDD_ROWS[dataset]
  return "A §8.5 ([004] Table 6), §6.3–6.5, §6.8, §12.18; R §4.1", {
      "method": "gdd", "teacher": teacher, "optim.generator_lr": g_lr, "optim.critic_lr": d_lr,
      "batch_size": batch, "loss.r1_gamma": gamma, "ema.halflife_mimg": ema, "ema.rampup_ratio": 0.05,
      "total_kimg": 1000 * (mimg if variant == "gdd" else mimg_i), "loss.freeze": variant == "gddi",
      "optim.generator_beta1": 0.0, "optim.critic_beta1": 0.0, "optim.beta2": 0.99, "optim.eps": 1e-8,
      "dtype": "bfloat16", "dropout": 0.0, "augment_p": 0.0, "init_sigma": 80.0, "loss.r1_interval": 16,
      "loss.gan_sum_size": batch // 8, "gdd.discriminator": "projected", "gdd.batch_stat_size": batch // 8,
      "gdd.feature_networks": GDD_FEATURE_NETWORKS.get(dataset, DEIT_EFFNET), "gdd.interp224": True,
      "gdd.cout": 64, "gdd.ndf": 0, "data.source": "edm_zip", "data.path": DATA[dataset],
      "data.use_labels": SID_ROWS[dataset][-1], "recipe": f"{dataset}:{variant}"}


def _published(file, variant):
  dataset = file[:-len(".py")]
  if variant in ("sid", "sida", "sid2a"):
    return _sid_family(dataset, variant)
  return {"sim": lambda: _sim(dataset), "lsg": lambda: _lsg(dataset)}.get(
      variant, lambda: _gdd(dataset, variant))()


EDM_VARIANTS = {"cifar10_uncond.py": ("sid", "sida", "sid2a", "sim", "gdd", "gddi"),
                "cifar10_cond.py": ("sid", "sida", "sid2a", "sim", "lsg", "gdd", "gddi"),
                "imagenet64.py": ("sid", "sida", "sid2a", "lsg", "gdd", "gddi"),
                "ffhq64.py": ("sid", "sida", "sid2a", "gdd", "gddi"),
                "afhq64.py": ("sid", "sida", "sid2a", "gdd", "gddi")}
PUBLISHED = [(f, v) for f, variants in EDM_VARIANTS.items() for v in variants]


def test_every_edm_recipe_variant_is_in_the_published_table():
  found = {case.values for case in CASES if case.values[0].name in EDM_VARIANTS}
  assert {(REPO / "configs" / f, v) for f, v in PUBLISHED} == found


@pytest.mark.parametrize("file,variant", PUBLISHED)
def test_recipe_carries_the_published_values(file, variant):
  source, expected = _published(file, variant)
  config = _flat(_load(REPO / "configs" / file, variant))
  for key, value in expected.items():
    matches = config[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
    assert matches, f"{file}:{variant} {key} = {config[key]!r}, published {value!r} ({source})"


# EDM2 SiDA / SiD²A BCE pool = the official `batch-gpu` per size (R §1.8, A §8.2 "Batch per GPU").
EDM2_POOL = {"xs": 64, "s": 64, "m": 32, "l": 32, "xl": 16, "xxl": 2}


@pytest.mark.parametrize("size", list(EDM2_POOL))
def test_edm2_sida_pools_over_the_official_batch_gpu(size):
  for variant in ("sida", "sid2a"):
    assert _load(REPO / "configs" / "edm2.py", f"{size},{variant}").loss.adv_pool_size == EDM2_POOL[size]


def _methods_of(file):
  return {v: _load(REPO / "configs" / file, v).method for v in _variants(REPO / "configs" / file)}


# SiD-LSG distilling Stable Diffusion, A §5.3–5.4, §8.3, §9.7, §12.17, R §1.10 (`run_sid.sh`, `sid_train.py`):
# κ presets of [002] Table 1 (LSG) and Table 3 (best-FID Long / Short); batch 512, lr 1e-6 both, Adam (0, 0.999),
# α 1, λ_sid = ls = 1, t ∈ {20..979}, t_init 625, 10% empty prompts, 10 Mimg, 512² images, EMA 0.05 Mimg in
# fp32; the fp16 scripts: ε 1e-6, generator gradients clipped by value at 1, `--ema 0` (here bfloat16).
SD_FILES = {"sd15_lsg.py": "stable-diffusion-v1-5", "sd21_lsg.py": "stable-diffusion-2-1-base"}
SD_KAPPAS = {"k1.5": (1.5,) * 4, "k2": (2.0,) * 4, "k3": (3.0,) * 4, "k4.5": (4.5,) * 4,
             "long": (1.0, 1.0, 1.0, 2.0), "short": (1.0, 0.5, 0.5, 1.0)}
SD_CASES = [(f, k + p) for f in SD_FILES for p in ("", "_bf16") for k in SD_KAPPAS]


def test_every_sd_recipe_variant_is_in_the_published_table():
  found = {case.values for case in CASES if case.values[0].name in SD_FILES}
  assert {(REPO / "configs" / f, v) for f, v in SD_CASES} == found


@pytest.mark.parametrize("file,variant", SD_CASES)
def test_sd_lsg_recipe_carries_the_published_values(file, variant):
  kappas = SD_KAPPAS[variant.split("_")[0]]
  bf16 = variant.endswith("_bf16")
  expected = {
      "method": "lsg", "teacher": SD_FILES[file], "recipe": f"{file[:-3]}:{variant}", "batch_size": 512,
      "optim.critic_lr": 1e-6, "optim.generator_lr": 1e-6, "optim.critic_beta1": 0.0, "optim.generator_beta1": 0.0,
      "optim.beta2": 0.999, "loss.alpha": 1.0, "loss.generator_scale": 1.0, "loss.critic_scale": 1.0,
      "loss.kappa1": kappas[0], "loss.kappa2": kappas[1], "loss.kappa3": kappas[2], "loss.kappa4": kappas[3],
      "loss.null_label_rate": 0.1, "loss.timestep_min": 20, "loss.timestep_max": 979, "loss.init_timestep": 625,
      "total_kimg": 10_000, "data.resolution": 512, "dtype": "bfloat16" if bf16 else "float32",
      "optim.eps": 1e-6 if bf16 else 1e-8, "optim.generator_grad_clip": 1.0 if bf16 else 0.0,
      "ema.halflife_mimg": 0.0 if bf16 else 0.05, "ema.rampup_ratio": 0.05, "eval.resolution": 256,
      "eval.num_images": 30_000}
  config = _flat(_load(REPO / "configs" / file, variant))
  for key, value in expected.items():
    matches = config[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
    assert matches, f"{file}:{variant} {key} = {config[key]!r}, published {value!r}"


# SIM distilling PixArt-α 512, A §4.6, §8.4 ([001] App. B.3, Table 5): log-normal(−2, 2) σ in both phases truncated
# to [0.01, 156.6155], weights 1, t* = 2.5, Adam (0, 0.999) lr 5e-6 both, batch 1024 = gradient accumulation 8
# with gradient checkpointing, bf16, ≈16k iterations.
PIXART_CASES = [("pixart_sim.py", "bf16"), ("pixart_sim.py", "fp32")]


def test_every_pixart_recipe_variant_is_in_the_published_table():
  found = {case.values for case in CASES if case.values[0].name == "pixart_sim.py"}
  assert {(REPO / "configs" / f, v) for f, v in PIXART_CASES} == found


@pytest.mark.parametrize("file,variant", PIXART_CASES)
def test_pixart_sim_recipe_carries_the_published_values(file, variant):
  expected = {
      "method": "sim", "teacher": "PixArt-XL-2-512x512", "recipe": f"pixart_sim:{variant}", "data.resolution": 512,
      "init_sigma": 2.5, "loss.p_mean": -2.0, "loss.p_std": 2.0, "loss.generator_p_mean": -2.0,
      "loss.generator_p_std": 2.0, "loss.sigma_min": 0.01, "loss.sigma_max": 156.6155, "loss.critic_scale": 1.0,
      "loss.generator_scale": 1.0, "batch_size": 1024, "grad_accum": 8, "remat": "full",
      "optim.critic_lr": 5e-6, "optim.generator_lr": 5e-6, "optim.critic_beta1": 0.0,
      "optim.generator_beta1": 0.0, "optim.beta2": 0.999, "total_kimg": 16_384.0,
      "dtype": "bfloat16" if variant == "bf16" else "float32"}
  config = _flat(_load(REPO / "configs" / file, variant))
  for key, value in expected.items():
    matches = config[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
    assert matches, f"{file}:{variant} {key} = {config[key]!r}, published {value!r}"
  assert _load(REPO / "configs" / file).dtype == "bfloat16"     # the paper's variant is the default


@pytest.mark.parametrize("file", list(EDM_VARIANTS) + ["edm2.py"] + list(SD_FILES) + ["pixart_sim.py"])
def test_another_methods_override_is_refused_naming_the_right_variant(file):
  methods = _methods_of(file)
  for variant, own in methods.items():
    config = _load(REPO / "configs" / file, variant)
    method_lib.check_recipe_method(config)        # its own method passes
    for other in ("sid", "sida", "sim", "lsg", "gdd"):
      if other == own:
        continue
      config.method = other
      with pytest.raises(ValueError) as error:
        method_lib.check_recipe_method(config)
      message = str(error.value)
      assert "\n" not in message and message.startswith(f"config.method={other!r} on recipe ")
      named = [m.split(":", 1)[1] for m in message.split() if m.startswith(f"configs/{file}:")]
      size = variant.rpartition(",")[0]          # EDM2: SIZE,VARIANT
      expected = [v for v, m in methods.items() if m == other and v.rpartition(",")[0] == size]
      assert named == expected, message          # exactly the variants of that method
      if not named:
        assert "has no" in message


def test_build_run_refuses_before_loading_anything():
  from sida_jax.train import run as run_lib   # pylint: disable=import-outside-toplevel
  config = _load(REPO / "configs" / "cifar10_uncond.py", "sid")
  config.method = "sim"
  with pytest.raises(ValueError, match=r"^config.method='sim' on recipe cifar10_uncond:sid: "
                                       r"use configs/cifar10_uncond.py:sim$"):
    run_lib.build_run(config)


@pytest.mark.parametrize("method,expected", [
    ("sid", {"loss.alpha": 1.2, "loss.generator_scale": 100.0}),                    # A §8.1
    ("sida", {"loss.alpha": 1.0, "loss.generator_scale": 100.0}),                   # A §3.4, §8.1
    ("sim", {"loss.generator_scale": 1.0, "loss.generator_p_mean": -3.5, "loss.generator_p_std": 2.5}),  # A §4.4
    ("lsg", {"loss.alpha": 1.0, "loss.generator_scale": 1.0, "loss.null_label_rate": 0.1}),  # A §5.4, §12.17
    ("gdd", {"init_sigma": 80.0, "optim.beta2": 0.99, "dropout": 0.0, "augment_p": 0.0,    # A §6.8, §12.18
             "gdd.discriminator": "projected"}),                                             # A §6.3
])
def test_free_form_configs_get_each_methods_own_defaults(method, expected):
  config = _flat(base.method_config(method))
  assert config["method"] == method and config["recipe"] == ""
  for key, value in expected.items():
    assert config[key] == value, key
