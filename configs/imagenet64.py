"""Published recipes for ImageNet 64×64, class-conditional, EDM teachers. Usage:

    python main.py --config configs/imagenet64.py:sida --workdir W --config.teacher=TEACHER.pkl \
        --config.data.path=DATA.zip
Variants after the colon: sid | sida | sid2a | lsg | gdd | gddi.
SiD²A also needs --config.generator_init=SID_GENERATOR.pkl.
GDD/GDD-I distil the same ADM teacher.
Values and their sources: configs/published.py.
"""
from configs import published

VARIANTS = published.DATASET_VARIANTS["imagenet64"]


def get_config(variant: str = "sid"):
  return published.edm_config("imagenet64", variant)
