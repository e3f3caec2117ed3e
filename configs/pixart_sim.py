"""SIM distilling PixArt-α (PixArt-XL-2-512x512) into a one-step text-to-image generator. Usage:

    python main.py --config configs/pixart_sim.py --workdir W --config.teacher=PixArt-XL-2-512x512 \
        --config.data.prompts=prompts.txt
Variants after the colon: bf16 (the paper's, default) | fp32. `teacher` is the diffusers pipeline folder
(model_index.json, transformer/, text_encoder/ (T5), tokenizer/, vae/, scheduler/). Batch 1024 in 8 accumulation
rounds (`--config.grad_accum`); values and sources: configs/published.py.
"""
from configs import published

VARIANTS = published.PIXART_VARIANTS


def get_config(variant: str = "bf16"):
  return published.pixart_sim_config(variant)
