"""Published SiD / SiDA / SiD²A settings for cifar10_uncond (EDM teacher). Usage:

    python main.py --config configs/cifar10_uncond.py:sida --workdir W --config.teacher=TEACHER.pkl --config.data.path=DATA.zip
Variants after the colon: sid | sida | sid2a (SiD²A also needs --config.generator_init=SID_GENERATOR.pkl).
"""
from configs import published


def get_config(variant: str = "sid"):
  return published.edm_config("cifar10_uncond", variant)
