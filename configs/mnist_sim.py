"""SIM (pseudo-Huber) on the MNIST teacher.

    python main.py --config configs/mnist_sim.py --workdir runs/mnist/sim --config.teacher=runs/mnist/teacher/network
"""
from configs import mnist_sid


def get_config():
  c = mnist_sid.distill_config("sim")
  c.loss.generator_scale = 1.0
  return c
