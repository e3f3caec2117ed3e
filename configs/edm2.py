"""Published SiD / SiDA / SiD²A settings for EDM2 ImageNet-512 teachers (REFERENCE_CODE.md §1.8). Usage:

    python main.py --config configs/edm2.py:xs,sida --workdir W --config.teacher=edm2-img512-xs-2147483-0.135.pkl \
        --config.data.path=img512-sd.zip
Sizes xs | s | m | l | xl | xxl; variants sid | sida | sid2a. Latent space (64×64×4, SD-VAE); the official
runs use fp16 (here: bfloat16 compute), batch 2048, lr 5e-5, EMA half-life 2 Mimg, λ_D = 100, σ ~ logN(−0.4, 1),
no critic gradient clipping, forced weight normalisation and the logvar head except where noted. SiDA / SiD²A
pool the BCE over the official per-GPU micro-batch (`loss.adv_pool_size`), whatever the device count.
"""
from configs import base

TEACHERS = {"xs": "edm2-img512-xs-2147483-0.135.pkl", "s": "edm2-img512-s-2147483-0.130.pkl",
            "m": "edm2-img512-m-2147483-0.100.pkl", "l": "edm2-img512-l-1879048-0.085.pkl",
            "xl": "edm2-img512-xl-1342177-0.085.pkl", "xxl": "edm2-img512-xxl-0939524-0.070.pkl"}
DROPOUT = {"xs": 0.0, "s": 0.0, "m": 0.1, "l": 0.1, "xl": 0.1, "xxl": 0.1}
# SiDA's BCE pool: the official per-GPU micro-batch `batch-gpu` (REFERENCE_CODE.md §1.8, [000] Table 6).
POOL = {"xs": 64, "s": 64, "m": 32, "l": 32, "xl": 16, "xxl": 2}
METHOD_OF = {"sid": "sid", "sida": "sida", "sid2a": "sida"}
KIMG = {"sid": {"xs": 200, "s": 200, "m": 200, "l": 200, "xl": 200, "xxl": 100},
        "sida": {"xs": 200, "s": 200, "m": 200, "l": 200, "xl": 200, "xxl": 100},
        "sid2a": {"xs": 30, "s": 80, "m": 200, "l": 55, "xl": 50, "xxl": 30}}
VARIANTS = tuple(f"{size},{variant}" for size in TEACHERS for variant in KIMG)


def get_config(arg: str = "xs,sid"):
  size, _, variant = arg.partition(",")
  variant = variant or "sid"
  if size not in TEACHERS or variant not in KIMG:
    raise ValueError(f"configs/edm2.py:{arg}: expected SIZE,VARIANT with SIZE in {', '.join(TEACHERS)} "
                     f"and VARIANT in {', '.join(KIMG)}")
  c = base.method_config(METHOD_OF[variant])
  c.recipe = f"edm2:{size},{variant}"
  c.recipe_variants = " ".join(f"{size},{v}={m}" for v, m in METHOD_OF.items())
  c.teacher = TEACHERS[size]
  c.batch_size = 2048
  c.total_kimg = float(KIMG[variant][size] * 1000)
  c.loss.alpha = 1.0
  c.loss.p_mean, c.loss.p_std = -0.4, 1.0
  c.loss.discriminator_scale = 100.0
  c.loss.critic_grad_clip = 0.0
  c.loss.generator_scale = 50.0 if (size == "m" and variant == "sid2a") else 100.0
  # EDM2-S SiDA/SiD²A ran without forced weight normalisation and without the logvar head.
  plain = size == "s" and variant != "sid"
  c.force_normalize = not plain
  c.loss.use_logvar = not plain
  c.optim.critic_lr = c.optim.generator_lr = 5e-5
  c.optim.eps = 1e-6
  c.dtype = "bfloat16"
  c.dropout = DROPOUT[size]
  c.ema.halflife_mimg = 2.0
  if variant == "sid":
    c.data.source = "labels_only"       # data-free: ImageNet labels from the dataset's dataset.json
    c.data.path = "img512-sd.zip"
  else:
    c.loss.adv_pool_size = POOL[size]
    c.data.source = "edm2_latents"
    c.data.path = "img512-sd.zip"
  c.log_every_kimg = 100.0
  c.checkpoint_every_kimg = 2000.0
  c.grid_every_kimg = 2000.0
  return c
