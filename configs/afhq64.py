"""Published SiD / SiDA / SiD²A settings for afhq64 (EDM teacher). Usage:

    python main.py --config configs/afhq64.py:sida --workdir W --config.teacher=TEACHER.pkl --config.data.path=DATA.zip
Variants after the colon: sid | sida | sid2a (SiD²A also needs --config.generator_init=SID_GENERATOR.pkl).
"""
from configs import published


def get_config(variant: str = "sid"):
  return published.edm_config("afhq64", variant)
