"""The MNIST demo: teacher → one-step SiD / SiDA / SIM → FID-proxy, in one command on 2 CPU cores.

    python main.py --config configs/mnist.py --workdir runs/mnist --mode pipeline
Writes runs/mnist/{teacher,sid,sida,sim}/ (each an ordinary workdir), fid_vs_kimg.png, grid_<method>.png
and summary.json / summary.md. Every stage resumes if the command is run again.
Sub-configs are editable from the command line, e.g. --config.sid.total_kimg=20 --config.teacher.total_kimg=50.
"""
import ml_collections

from configs import mnist_sid
from configs import mnist_sida
from configs import mnist_sim
from configs import mnist_teacher


def get_config():
  c = ml_collections.ConfigDict()
  c.methods = "sid,sida,sim"
  c.teacher_heun_steps = 18          # NFE 35, as EDM's CIFAR-10 setting
  c.teacher = mnist_teacher.get_config()
  c.sid = mnist_sid.get_config()
  c.sida = mnist_sida.get_config()
  c.sim = mnist_sim.get_config()
  return c
