"""SiDA on the MNIST teacher with the real MNIST-5k digits (stage boundaries scaled to the short run).

    python main.py --config configs/mnist_sida.py --workdir runs/mnist/sida --config.teacher=runs/mnist/teacher/network
"""
from configs import mnist_sid
from configs import mnist_teacher


def get_config():
  c = mnist_sid.distill_config("sida")
  mnist_teacher.mnist_data(c)
  c.loss.alpha = 1.0
  c.loss.critic_only_kimg = 0.1   # official: 100 / 200 kimg of a 300,000-kimg run; here 5% / 10%
  c.loss.sid_only_kimg = 0.2
  return c
