"""The official launch settings of SiD / SiDA / SiD²A for EDM teachers (shared/spec REFERENCE_CODE.md
§1.5, §1.7), as one table, so the per-dataset config files only name a row.

Variants: 'sid' (mingyuanzhou/SiD `run_sid.sh`), 'sida' (`run_sida.sh`, α = 1), 'sid2a' (`run_sid_sida.sh`:
SiDA initialised from a distilled SiD generator given as --config.generator_init=FILE.pkl).
Where the official runs use fp16 (`--fp16 1`, with Adam ε = 1e-6) we run the U-Nets in bfloat16 with fp32
parameters, σ math, losses and EMA. Teachers are the EDM pickles by file name; point `teacher` and
`data.path` at your copies.
"""
from configs import base

# dataset: teacher, data zip, label?, α(SiD), batch, lr, fp16, dropout, augment, ema, g_beta1, kimg SiD/SiDA/SiD²A
EDM_RECIPES = {
    "cifar10_uncond": dict(teacher="edm-cifar10-32x32-uncond-vp.pkl", data="cifar10-32x32.zip", cond=False,
                           sid_alpha=1.2, batch=256, lr=1e-5, fp16=False, dropout=0.13, augment=0.12, ema=0.5,
                           g_beta1=0.0, kimg=dict(sid=500_000, sida=300_000, sid2a=100_000)),
    "cifar10_cond": dict(teacher="edm-cifar10-32x32-cond-vp.pkl", data="cifar10-32x32.zip", cond=True,
                         sid_alpha=1.2, batch=256, lr=1e-5, fp16=False, dropout=0.13, augment=0.12, ema=0.5,
                         g_beta1=0.0, kimg=dict(sid=800_000, sida=300_000, sid2a=100_000)),
    "imagenet64": dict(teacher="edm-imagenet-64x64-cond-adm.pkl", data="imagenet-64x64.zip", cond=True,
                       sid_alpha=1.2, batch=8192, lr=4e-6, fp16=True, dropout=0.10, augment=0.0, ema=2.0,
                       g_beta1=0.0, kimg=dict(sid=1_000_000, sida=300_000, sid2a=100_000)),
    "ffhq64": dict(teacher="edm-ffhq-64x64-uncond-vp.pkl", data="ffhq-64x64.zip", cond=False,
                   sid_alpha=1.2, batch=512, lr=1e-5, fp16=True, dropout=0.05, augment=0.15, ema=0.5,
                   g_beta1=0.9, kimg=dict(sid=500_000, sida=200_000, sid2a=100_000)),
    # The official SiDA/SiD²A AFHQ lines point --data at the FFHQ zip (a script bug, not copied here).
    "afhq64": dict(teacher="edm-afhqv2-64x64-uncond-vp.pkl", data="afhqv2-64x64.zip", cond=False,
                   sid_alpha=1.0, batch=512, lr=5e-6, fp16=True, dropout=0.05, augment=0.15, ema=0.5,
                   g_beta1=0.0, kimg=dict(sid=500_000, sida=200_000, sid2a=100_000)),
}

VARIANTS = ("sid", "sida", "sid2a")


def edm_config(dataset: str, variant: str):
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is not one of {', '.join(VARIANTS)} (use FILE.py:VARIANT)")
  r = EDM_RECIPES[dataset]
  c = base.get_config()
  c.method = "sid" if variant == "sid" else "sida"
  c.teacher = r["teacher"]
  c.batch_size = r["batch"]
  c.total_kimg = float(r["kimg"][variant])
  c.loss.alpha = r["sid_alpha"] if variant == "sid" else 1.0
  c.optim.critic_lr = c.optim.generator_lr = r["lr"]
  c.optim.generator_beta1 = r["g_beta1"] if variant == "sid" else 0.0
  c.optim.eps = 1e-6 if r["fp16"] else 1e-8
  c.dtype = "bfloat16" if r["fp16"] else "float32"
  c.dropout = r["dropout"]
  c.augment_p = r["augment"]
  c.ema.halflife_mimg = r["ema"]
  # SiD needs only labels (conditional) — taken from the dataset loader as the official code does.
  if variant != "sid" or r["cond"]:
    c.data.source = "edm_zip"
    c.data.path = r["data"]
    c.data.use_labels = r["cond"]
  c.log_every_kimg = 100.0
  c.checkpoint_every_kimg = 5000.0
  c.grid_every_kimg = 5000.0
  c.eval_every_kimg = 5000.0
  return c
