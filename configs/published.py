"""Published recipes for EDM teachers, one table per method, so the per-dataset config files only name a row.

Variants (shared/spec ALGORITHMS.md; REFERENCE_CODE.md):
  sid    SiD, mingyuanzhou/SiD `run_sid.sh` (REFERENCE_CODE.md §1.5);
  sida   SiDA, `run_sida.sh` (α = 1; §1.7);
  sid2a  SiD²A, `run_sid_sida.sh`: SiDA initialised from a distilled SiD generator given as
         --config.generator_init=FILE.pkl (§1.7);
  sim    SIM with the pseudo-Huber distance, CIFAR-10 ([001] Table 5, App. B.2; ALGORITHMS.md §4.3–4.4, §8.4);
  lsg    SiD-LSG's long-and-short guidance on class-conditional EDM teachers (ALGORITHMS.md §5, §8.3);
  gdd    GDD and
  gddi   GDD-I (frozen block convolutions), [004] Table 6 (ALGORITHMS.md §6, §8.5, §12.18).
Where the official runs use fp16 (`--fp16 1`, with Adam ε = 1e-6) we run the U-Nets in bfloat16 with fp32
parameters, σ math, losses and EMA. Teachers are the EDM pickles by file name; point `teacher` and
`data.path` at your copies.
"""
from configs import base

# dataset: teacher, data zip, label?, α(SiD), batch, lr, fp16, dropout, augment, ema, g_beta1,
# SiDA BCE pool (the official per-GPU `batch-gpu`, REFERENCE_CODE.md §1.7), kimg SiD/SiDA/SiD²A
EDM_RECIPES = {
    "cifar10_uncond": dict(teacher="edm-cifar10-32x32-uncond-vp.pkl", data="cifar10-32x32.zip", cond=False,
                           sid_alpha=1.2, batch=256, lr=1e-5, fp16=False, dropout=0.13, augment=0.12, ema=0.5,
                           g_beta1=0.0, pool=32, kimg=dict(sid=500_000, sida=300_000, sid2a=100_000)),
    "cifar10_cond": dict(teacher="edm-cifar10-32x32-cond-vp.pkl", data="cifar10-32x32.zip", cond=True,
                         sid_alpha=1.2, batch=256, lr=1e-5, fp16=False, dropout=0.13, augment=0.12, ema=0.5,
                         g_beta1=0.0, pool=32, kimg=dict(sid=800_000, sida=300_000, sid2a=100_000)),
    "imagenet64": dict(teacher="edm-imagenet-64x64-cond-adm.pkl", data="imagenet-64x64.zip", cond=True,
                       sid_alpha=1.2, batch=8192, lr=4e-6, fp16=True, dropout=0.10, augment=0.0, ema=2.0,
                       g_beta1=0.0, pool=32, kimg=dict(sid=1_000_000, sida=300_000, sid2a=100_000)),
    "ffhq64": dict(teacher="edm-ffhq-64x64-uncond-vp.pkl", data="ffhq-64x64.zip", cond=False,
                   sid_alpha=1.2, batch=512, lr=1e-5, fp16=True, dropout=0.05, augment=0.15, ema=0.5,
                   g_beta1=0.9, pool=64, kimg=dict(sid=500_000, sida=200_000, sid2a=100_000)),
    # The official SiDA/SiD²A AFHQ lines point --data at the FFHQ zip (a script bug, not copied here).
    "afhq64": dict(teacher="edm-afhqv2-64x64-uncond-vp.pkl", data="afhqv2-64x64.zip", cond=False,
                   sid_alpha=1.0, batch=512, lr=5e-6, fp16=True, dropout=0.05, augment=0.15, ema=0.5,
                   g_beta1=0.0, pool=64, kimg=dict(sid=500_000, sida=200_000, sid2a=100_000)),
}

# GDD / GDD-I, [004] Table 6 (ALGORITHMS.md §8.5): the VE (NCSN++) EDM teachers except ADM on ImageNet-64
# (`train.sh --transfer`), G and D learning rates, batch, γ_R1, EMA half-life, Mimg of GDD / GDD-I, and the
# Projected-GAN feature networks (§6.3; `train.sh --backbone 1` / `0`). Common to all: Adam (0, 0.99),
# ε 1e-8, bf16, dropout 0, no augmentation, EMA ramp-up 0.05, 8 GPUs — so each official GAN sum and each
# batch-norm statistics group of the heads runs over batch/8 samples (`gan_sum_size`, `gdd.batch_stat_size`;
# `train.sh`'s 4 GPUs would double them).
VGG_EFFNET = ("vgg16_bn", "tf_efficientnet_lite0")
DEIT_EFFNET = ("deit_base_distilled_patch16_224", "tf_efficientnet_lite0")
GDD_RECIPES = {
    "cifar10_uncond": dict(teacher="edm-cifar10-32x32-uncond-ve.pkl", g_lr=1e-4, d_lr=1e-4, batch=256,
                           r1_gamma=1e-4, ema=0.5, mimg=dict(gdd=5, gddi=5), features=VGG_EFFNET),
    "cifar10_cond": dict(teacher="edm-cifar10-32x32-cond-ve.pkl", g_lr=1e-4, d_lr=1e-4, batch=256,
                         r1_gamma=1e-4, ema=0.5, mimg=dict(gdd=5, gddi=5), features=VGG_EFFNET),
    "afhq64": dict(teacher="edm-afhqv2-64x64-uncond-ve.pkl", g_lr=2e-5, d_lr=4e-5, batch=256,
                   r1_gamma=1e-4, ema=0.5, mimg=dict(gdd=5, gddi=10), features=DEIT_EFFNET),
    "ffhq64": dict(teacher="edm-ffhq-64x64-uncond-ve.pkl", g_lr=2e-5, d_lr=4e-5, batch=256,
                   r1_gamma=1e-4, ema=0.5, mimg=dict(gdd=5, gddi=10), features=DEIT_EFFNET),
    "imagenet64": dict(teacher="edm-imagenet-64x64-cond-adm.pkl", g_lr=8e-6, d_lr=4e-5, batch=512,
                       r1_gamma=4e-4, ema=50.0, mimg=dict(gdd=5, gddi=5), features=DEIT_EFFNET),
}
GDD_GPUS = 8

# SiD-LSG's guidance scale for FID: [002] reports κ ∈ {1.5, 2, 3, 4.5} with κ1 = κ2 = κ3 = κ4, and FID
# improves monotonically as κ decreases to 1.5 for both SD teachers (Table 1, ALGORITHMS.md §9.7; κ = 2 gives
# better CLIP/precision instead). The EDM benchmarks rank by FID, hence 1.5 (also [002] Alg. 1's example).
LSG_KAPPA = 1.5

# The variant of each method for each dataset (SIM's published EDM runs are CIFAR-10 only; SiD-LSG needs
# class labels). Variant -> method.
METHOD_OF = {"sid": "sid", "sida": "sida", "sid2a": "sida", "sim": "sim", "lsg": "lsg", "gdd": "gdd",
             "gddi": "gdd"}
DATASET_VARIANTS = {
    "cifar10_uncond": ("sid", "sida", "sid2a", "sim", "gdd", "gddi"),
    "cifar10_cond": ("sid", "sida", "sid2a", "sim", "lsg", "gdd", "gddi"),
    "imagenet64": ("sid", "sida", "sid2a", "lsg", "gdd", "gddi"),
    "ffhq64": ("sid", "sida", "sid2a", "gdd", "gddi"),
    "afhq64": ("sid", "sida", "sid2a", "gdd", "gddi"),
}


def _edm_data(c, path: str, cond: bool) -> None:
  c.data.source = "edm_zip"
  c.data.path = path
  c.data.use_labels = cond


def _bookkeeping(c, every_kimg: float) -> None:
  c.log_every_kimg = min(100.0, every_kimg / 50)
  c.checkpoint_every_kimg = c.grid_every_kimg = c.eval_every_kimg = every_kimg


def _sid_family(c, dataset: str, variant: str) -> None:
  """SiD / SiDA / SiD²A (REFERENCE_CODE.md §1.5, §1.7); SIM and SiD-LSG start from SiD's row too."""
  r = EDM_RECIPES[dataset]
  c.teacher = r["teacher"]
  c.batch_size = r["batch"]
  c.total_kimg = float(r["kimg"]["sid" if variant in ("sim", "lsg") else variant])
  c.optim.critic_lr = c.optim.generator_lr = r["lr"]
  c.optim.eps = 1e-6 if r["fp16"] else 1e-8
  c.dtype = "bfloat16" if r["fp16"] else "float32"
  c.dropout = r["dropout"]
  c.augment_p = r["augment"]
  c.ema.halflife_mimg = r["ema"]
  if variant == "sid":
    c.loss.alpha = r["sid_alpha"]
    c.optim.generator_beta1 = r["g_beta1"]
  if variant in ("sida", "sid2a"):
    c.loss.adv_pool_size = r["pool"]
  # SiD needs only labels (conditional) — taken from the dataset loader as the official code does.
  if variant in ("sida", "sid2a") or r["cond"]:
    _edm_data(c, r["data"], r["cond"])
  _bookkeeping(c, 5000.0)


def _sim(c, dataset: str) -> None:
  """[001] Table 5: lr 1e-5 (both), batch 256, σ_init 2.5, Adam (0, 0.999), p_EDM for the fake score,
  p_SIM = logN(−3.5, 2.5²) with weight 1 for the generator (METHOD_DEFAULTS). What [001] leaves out
  (teacher, dropout, augmentation, EMA, precision, length) it takes from SiD's CIFAR-10 setting ("we follow
  the same setting as SiD", §4.1): the SiD row. Pseudo-Huber c: the ICT rule (spec A-12; `huber_c` 0)."""
  _sid_family(c, dataset, "sim")


def _lsg(c, dataset: str) -> None:
  """SiD-LSG on a class-conditional EDM teacher: SiD's row of the dataset with [002]'s α = 1, λ_sid = 1
  (METHOD_DEFAULTS), κ1 = κ2 = κ3 = κ4 = LSG_KAPPA and 10% null labels in the critic phase."""
  _sid_family(c, dataset, "lsg")
  c.loss.kappa1 = c.loss.kappa2 = c.loss.kappa3 = c.loss.kappa4 = LSG_KAPPA


def _gdd(c, dataset: str, variant: str) -> None:
  r = GDD_RECIPES[dataset]
  c.teacher = r["teacher"]
  c.batch_size = r["batch"]
  c.total_kimg = float(r["mimg"][variant] * 1000)
  c.optim.generator_lr = r["g_lr"]
  c.optim.critic_lr = r["d_lr"]       # the loop applies the lazy-R1 adjustment (lr·16/17, β2^(16/17))
  c.optim.eps = 1e-8
  c.dtype = "bfloat16"
  c.ema.halflife_mimg = r["ema"]
  c.loss.r1_gamma = r["r1_gamma"]
  c.loss.gan_sum_size = r["batch"] // GDD_GPUS
  c.loss.freeze = variant == "gddi"
  c.gdd.discriminator = "projected"
  c.gdd.feature_networks = r["features"]
  c.gdd.batch_stat_size = r["batch"] // GDD_GPUS
  _edm_data(c, EDM_RECIPES[dataset]["data"], EDM_RECIPES[dataset]["cond"])
  _bookkeeping(c, 500.0)


def edm_config(dataset: str, variant: str):
  """The published recipe `variant` of `dataset` (a key of DATASET_VARIANTS)."""
  variants = DATASET_VARIANTS[dataset]
  if variant not in variants:
    raise ValueError(f"config variant {variant!r} is not one of {', '.join(variants)} (use FILE.py:VARIANT)")
  c = base.method_config(METHOD_OF[variant])
  c.recipe = f"{dataset}:{variant}"
  c.recipe_variants = " ".join(f"{v}={METHOD_OF[v]}" for v in variants)
  if variant == "sim":
    _sim(c, dataset)
  elif variant == "lsg":
    _lsg(c, dataset)
  elif METHOD_OF[variant] == "gdd":
    _gdd(c, dataset, variant)
  else:
    _sid_family(c, dataset, variant)
  return c


# ---------------------------------------------------------------------------------------------------------
# SiD-LSG distilling Stable Diffusion (ALGORITHMS.md §5.4, §8.3, §12.17; [002] Tables 1, 3, 4; REFERENCE_CODE.md
# §1.10: `run_sid.sh`, `sid_train.py`). The teacher is the diffusers pipeline folder (--config.teacher=PATH);
# prompts are the Aesthetics6+ list (--config.data.prompts=FILE or the official folder).
#
# Guidance (κ1, κ2 = κ3, κ4): LSG with all four equal to κ ∈ {1.5, 2, 3, 4.5} ([002] Table 1, 10M images each;
# 1.5 is the best FID, higher κ the better CLIP score), and the best-FID Long and Short settings of Table 3.
SD_TEACHERS = {"sd15": "stable-diffusion-v1-5", "sd21": "stable-diffusion-2-1-base"}
SD_GUIDANCE = {"k1.5": (1.5, 1.5, 1.5), "k2": (2.0, 2.0, 2.0), "k3": (3.0, 3.0, 3.0), "k4.5": (4.5, 4.5, 4.5),
               "long": (1.0, 1.0, 2.0), "short": (1.0, 0.5, 1.0)}
# `--fp16 0` runs (the paper's numbers) in float32; the `--fp16 1` scripts here in bfloat16 compute with their
# other settings: Adam ε 1e-6, generator gradients clipped by value at 1, no EMA (`--ema 0`).
SD_PRECISIONS = ("", "_bf16")
SD_VARIANTS = tuple(f"{k}{p}" for p in SD_PRECISIONS for k in SD_GUIDANCE)


def sd_lsg_config(teacher: str, variant: str):
  """SiD-LSG recipe `variant` (a κ preset, optionally `_bf16`) for the SD teacher `teacher` ('sd15' or 'sd21')."""
  if variant not in SD_VARIANTS:
    raise ValueError(f"config variant {variant!r} is not one of {', '.join(SD_VARIANTS)} (use FILE.py:VARIANT)")
  guidance, _, precision = variant.partition("_")
  kappa1, kappa23, kappa4 = SD_GUIDANCE[guidance]
  bf16 = precision == "bf16"
  c = base.method_config("lsg")
  c.recipe = f"{teacher}_lsg:{variant}"
  c.recipe_variants = " ".join(f"{v}=lsg" for v in SD_VARIANTS)
  c.teacher = SD_TEACHERS[teacher]
  c.data.prompts = "aesthetics_6_plus"
  c.data.resolution = 512                       # 64×64×4 latents
  c.loss.kappa1, c.loss.kappa2, c.loss.kappa3, c.loss.kappa4 = kappa1, kappa23, kappa23, kappa4
  c.loss.alpha = 1.0
  c.loss.generator_scale = 1.0                  # `--lsg 1`
  c.loss.critic_scale = 1.0                     # `--ls 1`
  c.loss.null_label_rate = 0.1
  c.loss.timestep_min, c.loss.timestep_max, c.loss.init_timestep = 20, 979, 625
  c.batch_size = 512
  c.total_kimg = 10_000.0                       # 10M generated images
  c.optim.critic_lr = c.optim.generator_lr = 1e-6
  c.optim.critic_beta1 = c.optim.generator_beta1 = 0.0
  c.optim.beta2 = 0.999
  c.optim.eps = 1e-6 if bf16 else 1e-8
  c.optim.generator_grad_clip = 1.0 if bf16 else 0.0
  c.dtype = "bfloat16" if bf16 else "float32"
  c.ema.halflife_mimg = 0.0 if bf16 else 0.05
  c.ema.rampup_ratio = 0.05
  # `--tick 2 --snap 50 --dump 100`: log every 2 kimg, sample grid every 100 kimg, full state every 200 kimg.
  c.log_every_kimg = 2.0
  c.grid_every_kimg = 100.0
  c.checkpoint_every_kimg = 200.0
  # Zero-shot COCO FID (set eval.prompts, eval.ref_stats, eval.detector_path and eval_every_kimg to use it):
  # 30k images resized to 256² (Lanczos), as the official evaluation.
  c.eval.num_images = 30_000
  c.eval.resolution = 256
  c.eval.batch_size = 16
  c.eval.inception_score = False
  c.sample.batch_size = 16
  return c


# ---------------------------------------------------------------------------------------------------------
# SIM distilling PixArt-α 512 ([001] App. B.3, Table 5; ALGORITHMS.md §4.6, §8.4, §12.19). The teacher is the
# diffusers pipeline folder of PixArt-XL-2-512x512 (--config.teacher=PATH); the paper's prompts are
# SAM-LLaVA-Caption10M (--config.data.prompts=FILE, not shipped).
#
# Both phases: ln σ ~ N(−2, 2²) truncated to [0.01, 156.6155] (the PixArt schedule's EDM range), weights 1;
# generator D(2.5 z; 2.5) (t* = 2.5); Adam (0, 0.999), lr 5e-6 for both networks; batch 1024 as the paper's
# gradient accumulation 8 with gradient checkpointing (remat 'full'); bf16; ≈16k iterations (16,384 kimg).
# Not given in [001]: the pseudo-Huber c (the dimension-scaled default, 0.069 on 64×64×4 latents), Adam ε, the
# EMA (SiD's 0.5 Mimg half-life, ramp-up 0.05; the official inference code loads an `ema` state), CFG (none).
PIXART_TEACHER = "PixArt-XL-2-512x512"
PIXART_VARIANTS = ("bf16", "fp32")


def pixart_sim_config(variant: str = "bf16"):
  """SIM recipe `variant` ('bf16': the paper's; 'fp32': the same in float32) for PixArt-XL-2-512x512."""
  if variant not in PIXART_VARIANTS:
    raise ValueError(f"config variant {variant!r} is not one of {', '.join(PIXART_VARIANTS)} (use FILE.py:VARIANT)")
  c = base.method_config("sim")
  c.recipe = f"pixart_sim:{variant}"
  c.recipe_variants = " ".join(f"{v}=sim" for v in PIXART_VARIANTS)
  c.teacher = PIXART_TEACHER
  c.data.resolution = 512                       # 64×64×4 latents
  c.init_sigma = 2.5                            # t*
  c.loss.p_mean, c.loss.p_std = -2.0, 2.0       # fake score network
  c.loss.generator_p_mean, c.loss.generator_p_std = -2.0, 2.0
  c.loss.sigma_min, c.loss.sigma_max = 0.01, 156.6155   # truncation of both σ draws
  c.loss.critic_scale = 1.0
  c.loss.generator_scale = 1.0
  c.batch_size = 1024
  c.grad_accum = 8
  c.remat = "full"
  c.total_kimg = 16_384.0                       # ≈16k iterations of 1024
  c.optim.critic_lr = c.optim.generator_lr = 5e-6
  c.optim.critic_beta1 = c.optim.generator_beta1 = 0.0
  c.optim.beta2 = 0.999
  c.dtype = "bfloat16" if variant == "bf16" else "float32"
  c.log_every_kimg = 10.24                      # every 10 iterations
  c.grid_every_kimg = 1024.0                    # every 1000 iterations
  c.checkpoint_every_kimg = 1024.0
  c.sample.batch_size = 16
  return c
