"""Memory of SiD-LSG distilling Stable Diffusion, per device, from the published configs (no weights needed).

    python benchmarks/t2i_memory.py                       # state bytes of SD1.5 and SD2.1-base runs
    python benchmarks/t2i_memory.py --lower               # also trace and lower the real-size step
    python benchmarks/t2i_memory.py --compile --teachers sd15 --batch_per_device 1   # + XLA's temp memory

Every array a run keeps is sized with `jax.eval_shape` (nothing is allocated): the frozen teacher U-Net, the
generator (parameters, Adam moments, EMA), the fake score network (parameters, Adam moments), the text
encoder and the VAE. The state is replicated on every device (data parallelism), so these bytes are per
device; activations and gradients come on top (`--compile`: XLA's `memory_analysis()` of the compiled step on
this backend, slow to compile on CPU).
"""
import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs import base  # noqa: E402
from sida_jax.losses import lsg  # noqa: E402
from sida_jax.losses.method import Networks  # noqa: E402
from sida_jax.models import vae as vae_lib  # noqa: E402
from sida_jax.models.t2i import clip_text, ddpm, sd_unet  # noqa: E402
from sida_jax.train import state as state_lib  # noqa: E402
from sida_jax.train import step as step_lib  # noqa: E402
from sida_jax.train import t2i  # noqa: E402

# Published config.json entries of the two teachers (stable-diffusion-v1-5, stable-diffusion-2-1-base).
SD15_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 center_input_sample=False, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
                 norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
SD15_TEXT = dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408, eos_token_id=2)
SD21_TEXT = dict(SD15_TEXT, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_hidden_layers=23)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
TEACHERS = {"sd15": (SD15_UNET, SD15_TEXT), "sd21": (SD21_UNET, SD21_TEXT)}
GB = 1e9


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def components(unet_config, text_config, dtype):
  """(unet module, abstract params) and the abstract text encoder / VAE parameters."""
  unet = sd_unet.from_diffusers_config(unet_config, dtype)
  unet_params = sd_unet.params_template(unet)
  text_params = clip_text.params_template(clip_text.from_transformers_config(text_config))
  vae = vae_lib.from_diffusers_config(SD_VAE)
  vae_params = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]
  return unet, unet_params, text_params, vae_params


def abstract_state(config, unet_params):
  o = config.optim
  gtx = state_lib.make_optimizer(o.generator_lr, 0.0, o.beta2, o.eps, clip_value=o.generator_grad_clip or None)
  ctx = state_lib.make_optimizer(o.critic_lr, 0.0, o.beta2, o.eps)
  init = lambda p: state_lib.init_state(jax.random.key(0), {"params": p}, {"params": p}, gtx, ctx)
  return jax.eval_shape(init, unet_params), gtx, ctx


def step_spec(config, unet, text_config, gtx, ctx, batch):
  """The run's StepSpec with a stand-in null embedding (only its shape matters here)."""
  schedule = ddpm.from_scheduler_config(SD_SCHEDULER)
  denoiser = t2i.text_denoiser(unet, schedule)
  null = np.zeros((1, 77, text_config["hidden_size"]), np.float32)
  method = lsg.make(config, Networks(denoiser, denoiser, denoiser), lsg.embedding_null_condition(null),
                    sigma_grid=schedule.sigmas)
  return step_lib.StepSpec(method=method, nets=Networks(denoiser, denoiser, denoiser), batch_size=batch,
                           image_shape=(64, 64, 4), init_sigma=method.init_sigma, generator_tx=gtx, critic_tx=ctx,
                           ema_halflife_mimg=config.ema.halflife_mimg, ema_rampup_ratio=0.05)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teachers", default="sd15,sd21")
  parser.add_argument("--variant", default="k1.5", help="configs/sdXX_lsg.py variant (k1.5_bf16: bfloat16)")
  parser.add_argument("--lower", action="store_true", help="trace and lower the step at real size")
  parser.add_argument("--compile", action="store_true", help="also compile it and print XLA's memory analysis")
  parser.add_argument("--batch_per_device", type=int, default=1)
  args = parser.parse_args()
  from configs import published  # pylint: disable=import-outside-toplevel
  print("| teacher | U-Net params | teacher | generator (params + Adam + EMA) | fake score (params + Adam) "
        "| text encoder | VAE | total per device |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.teachers.split(","):
    config = published.sd_lsg_config(name, args.variant)
    unet_config, text_config = TEACHERS[name]
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    unet, unet_params, text_params, vae_params = components(unet_config, text_config, dtype)
    state, gtx, ctx = abstract_state(config, unet_params)
    teacher = nbytes(unet_params)
    generator = nbytes((state.generator, state.generator_ema))
    critic = nbytes(state.critic)
    text, vae = nbytes(text_params), nbytes(vae_params)
    total = teacher + generator + critic + text + vae
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(unet_params))
    print(f"| {name} | {count:,} | {teacher / GB:.2f} GB | {generator / GB:.2f} GB | {critic / GB:.2f} GB | "
          f"{text / GB:.2f} GB | {vae / GB:.2f} GB | {total / GB:.2f} GB |")
    if args.lower or args.compile:
      mesh = step_lib.make_mesh()
      batch = args.batch_per_device * mesh.devices.size
      spec = step_spec(config, unet, text_config, gtx, ctx, batch)
      embeddings = jax.ShapeDtypeStruct((batch, 77, text_config["hidden_size"]), jnp.float32)
      step = step_lib.make_train_step(spec, mesh)
      lowered = step.lower(state, {"params": unet_params},
                           {"critic": {"labels": embeddings}, "generator": {"labels": embeddings}})
      print(f"  {name}: step lowered at batch {batch} ({mesh.devices.size} device(s))")
      if args.compile:
        analysis = lowered.compile().memory_analysis()
        print(f"  {name}: XLA temp {analysis.temp_size_in_bytes / GB:.2f} GB, arguments "
              f"{analysis.argument_size_in_bytes / GB:.2f} GB, outputs {analysis.output_size_in_bytes / GB:.2f} GB "
              f"on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  main()
