"""SiD on a tiny randomly initialised DDPM++ teacher at 16×16: trains, checkpoints and samples in < 1 min.

    python main.py --config configs/smoke.py --workdir /tmp/smoke
    python main.py --config configs/smoke.py --workdir /tmp/smoke --mode sample
Swap in a real teacher with --config.teacher=FILE.pkl (or a converted folder).
`configs/smoke.py:toy` uses the small MLP denoiser instead (compiles in seconds: CLI and resume tests).
"""
from configs import base


VARIANTS = ("ddpmpp", "toy")


def tiny_ddpmpp(resolution: int = 16, channels: int = 3, label_dim: int = 0, model_channels: int = 16):
  """Constructor kwargs of a small EDMPrecond + SongUNet (DDPM++ flavour), as a snapshot would store them."""
  return dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, use_fp16=False,
              sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet",
              embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=model_channels,
              channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, augment_dim=0)


def get_config(network: str = "ddpmpp"):
  c = base.get_config()
  c.method = "sid"
  if network == "ddpmpp":
    c.network.class_name = "EDMPrecond"
    c.network.kwargs = tiny_ddpmpp()
  elif network == "toy":
    c.network.class_name = "ToyPrecond"
    c.network.kwargs = dict(img_resolution=16, img_channels=3, label_dim=0, features=[32, 32], dropout=0.0)
  else:
    raise ValueError(f"configs/smoke.py:{network}: expected 'ddpmpp' or 'toy'")
  c.batch_size = 8
  c.total_kimg = 0.08            # 10 iterations
  c.optim.critic_lr = 1e-4
  c.optim.generator_lr = 1e-4
  c.ema.halflife_mimg = 0.0005
  c.log_every_kimg = 0.04
  c.checkpoint_every_kimg = 0.04
  c.grid_every_kimg = 0.08
  c.max_to_keep = 2
  c.sample.seeds = "0-15"
  c.sample.batch_size = 8
  c.eval.detector = "mnist"
  c.eval.num_images = 64
  c.eval.batch_size = 32
  return c
