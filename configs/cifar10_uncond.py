"""Published recipes for CIFAR-10 32×32, unconditional, EDM teachers. Usage:

    python main.py --config configs/cifar10_uncond.py:sida --workdir W --config.teacher=TEACHER.pkl \
        --config.data.path=DATA.zip
Variants after the colon: sid | sida | sid2a | sim | gdd | gddi.
SiD²A also needs --config.generator_init=SID_GENERATOR.pkl.
GDD/GDD-I distil the VE (NCSN++) teacher named in `teacher`.
Values and their sources: configs/published.py.
"""
from configs import published

VARIANTS = published.DATASET_VARIANTS["cifar10_uncond"]


def get_config(variant: str = "sid"):
  return published.edm_config("cifar10_uncond", variant)
