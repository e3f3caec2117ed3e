"""SiD-LSG distilling Stable Diffusion 2.1-base into a one-step text-to-image generator. Usage:

    python main.py --config configs/sd21_lsg.py:k1.5 --workdir W --config.teacher=stable-diffusion-2-1-base \
        --config.data.prompts=prompts.txt
Variants after the colon: k1.5 | k2 | k3 | k4.5 (LSG, κ1 = κ2 = κ3 = κ4) | long (κ4 = 2) | short (κ2 = κ3 = 0.5),
each also as VARIANT_bf16 (the official fp16 settings in bfloat16). `teacher` is the diffusers pipeline folder
(model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/). Values and sources: configs/published.py.
"""
from configs import published

VARIANTS = published.SD_VARIANTS


def get_config(variant: str = "k1.5"):
  return published.sd_lsg_config("sd21", variant)
