"""sida_jax command line: python main.py --config configs/X.py --workdir DIR [--mode M] [--config.a.b=v]."""
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and converted networks.")
flags.DEFINE_enum("mode", "train", ["train", "teacher", "sample", "eval", "convert", "ref", "pipeline", "plan"],
                  "What to do.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs (docs/notes/scaling.md). Without these flags, SLURM, TPU pods and Open MPI are detected
# (sida_jax.train.loop.maybe_initialize_distributed, then jax.distributed.initialize() reads the cluster).
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: index of this process (0 … num_processes − 1).")


class _QuietLibraries:
  """Keeps checkpointing chatter (Orbax logs every file operation at INFO) out of the progress log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_logger().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from sida_jax import cli  # after flag parsing, so --help stays fast
  # Before anything touches a device (jax.devices() below).
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  else:
    cli.loop.maybe_initialize_distributed()   # SLURM, TPU pods, Open MPI, $JAX_COORDINATOR_ADDRESS
  logging.info("JAX devices: %s", jax.devices())
  cli.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
