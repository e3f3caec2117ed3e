"""Published recipes for FFHQ 64×64, EDM teachers. Usage:

    python main.py --config configs/ffhq64.py:sida --workdir W --config.teacher=TEACHER.pkl \
        --config.data.path=DATA.zip
Variants after the colon: sid | sida | sid2a | gdd | gddi.
SiD²A also needs --config.generator_init=SID_GENERATOR.pkl.
GDD/GDD-I distil the VE (NCSN++) teacher named in `teacher`.
Values and their sources: configs/published.py.
"""
from configs import published

VARIANTS = published.DATASET_VARIANTS["ffhq64"]


def get_config(variant: str = "sid"):
  return published.edm_config("ffhq64", variant)
