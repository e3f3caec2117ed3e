"""sida_jax command line: python main.py --config configs/X.py[:VARIANT] --workdir DIR [--mode M] [--config.a.b=v].

The flags are declared here, one line each; `sida_jax/command.py` parses them, prints --help, and runs the mode
(`sida_jax/cli.py`). A mode is an entry in command.MODES (its help line) and in cli.MODES (its function).
"""
import sys

from absl import flags
from ml_collections import config_flags

from sida_jax import command

flags.DEFINE_enum("mode", "train", list(command.MODES), "What to do (the modes are listed above).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and converted networks.")
flags.DEFINE_bool("debug", False, "Tracebacks for every error, and the libraries' logs.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file, with :VARIANT for recipes.", lock_config=True)
# Multi-process runs (README, "Scaling"). Without these flags SLURM, TPU pods and Open MPI are detected and
# jax.distributed.initialize() reads the cluster.
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: index of this process (0 … num_processes − 1).")

if __name__ == "__main__":
  sys.exit(command.main(sys.argv))
