"""SiD distillation of the MNIST teacher (configs/mnist_teacher.py) into a one-step generator.

    python main.py --config configs/mnist_sid.py --workdir runs/mnist/sid --config.teacher=runs/mnist/teacher/network
"""
from configs import base


def distill_config(method: str):
  """Settings shared by the MNIST distillation runs (small batch and higher LR than CIFAR: 2 CPU cores)."""
  c = base.method_config(method)
  c.teacher = "runs/mnist/teacher/network"
  c.batch_size = 16
  c.total_kimg = 10.0
  c.optim.critic_lr = 3e-4
  c.optim.generator_lr = 3e-4
  c.ema.halflife_mimg = 0.0005
  c.ema.rampup_ratio = 0.05
  c.dropout = 0.0
  c.log_every_kimg = 0.1
  c.checkpoint_every_kimg = 1.0
  c.grid_every_kimg = 1.0
  c.eval_every_kimg = 0.5
  c.max_to_keep = 2
  c.eval.detector = "mnist"
  c.eval.num_images = 1000
  c.eval.batch_size = 250
  c.sample.seeds = "0-63"
  return c


def get_config():
  c = distill_config("sid")
  c.loss.alpha = 1.2
  return c
