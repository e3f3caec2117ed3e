"""Shared pieces of the benchmarks: the benchmarked configs, compile/step timing, FLOPs, memory, tables.

Networks get random weights (the configured initialisers; no teacher file is read), so every benchmark
runs on a bare machine. Importing this module imports JAX: callers that need fake CPU devices set
XLA_FLAGS before importing it.
"""
from __future__ import annotations

import importlib
import math
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from configs import cifar10_uncond, edm2 as edm2_configs, smoke  # noqa: E402
from sida_jax.models.edm2 import networks as edm2  # noqa: E402

# The fixture-size DDPM++ of ../shared/fixtures/edm/edm_ddpmpp_kwargs.json (318,019 parameters).
SMOKE_KWARGS = dict(smoke.tiny_ddpmpp(label_dim=10), augment_dim=9)
# The network of EDM's edm-cifar10-32x32-uncond-vp.pkl (DDPM++, 55.7M parameters).
CIFAR10_DDPMPP_KWARGS = dict(
    img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, use_fp16=False, sigma_min=0.0,
    sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)

# A tiny EDM2 network for the smoke runs of the device suite (8×8×4 latents, 10 classes).
EDM2_TINY_KWARGS = dict(img_resolution=8, img_channels=4, label_dim=10, model_channels=16, channel_mult=(1, 2),
                        num_blocks=1, attn_resolutions=(4,), dropout=0.0)

# A one-level DDPM++ (8×8, 2 blocks of 8 channels) that compiles in seconds: the device suite's --smoke rows.
DDPMPP_TINY_KWARGS = dict(
    img_resolution=8, img_channels=3, label_dim=0, augment_dim=9, use_fp16=False, sigma_min=0.0,
    sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", embedding_type="positional",
    encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
    model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[8], dropout=0.0)

CONFIGS = ("smoke", "mnist", "cifar10", "edm2-xs", "edm2-s", "ddpmpp-tiny", "edm2-tiny")
DEFAULT_BATCH = {"smoke": 8, "cifar10": 4, "edm2-xs": 2, "edm2-s": 2, "ddpmpp-tiny": 4, "edm2-tiny": 4}
GIB = 1 << 30


class Skip(Exception):
  """A benchmark row that cannot run here; the message is the reason shown in the table."""


def _mnist_config() -> ml_collections.ConfigDict:
  """configs/mnist_sid.py on the network of configs/mnist_teacher.py (the teacher it distils)."""
  if not all((REPO / "configs" / f"{name}.py").exists() for name in ("mnist_sid", "mnist_teacher")):
    raise Skip("no configs/mnist_sid.py and configs/mnist_teacher.py in this checkout")
  config = importlib.import_module("configs.mnist_sid").get_config()
  config.network = importlib.import_module("configs.mnist_teacher").get_config().network
  return config


def bench_config(name: str, dtype: str = "float32", batch_size: Optional[int] = None, method: str = "sid"
                 ) -> ml_collections.ConfigDict:
  """A SiD run config for one benchmark row: random-weight teacher, no data, dropout and augmentation off.

  method='sida' (cifar10 only): the CIFAR-10 SiDA recipe's loss settings past its warm-up (the GAN terms on from
  the first step) with MNIST-5k digits at 32×32×3 as the real batch.
  """
  if method not in ("sid", "sida"):
    raise ValueError(f"benchmark method {method!r}: expected sid or sida")
  if name == "smoke":
    config = smoke.get_config()
    config.network.kwargs = SMOKE_KWARGS
  elif name == "cifar10":
    config = cifar10_uncond.get_config(method)
    config.network.class_name = "EDMPrecond"
    config.network.kwargs = CIFAR10_DDPMPP_KWARGS
  elif name in ("edm2-xs", "edm2-s"):
    size = name.split("-")[1]
    config = edm2_configs.get_config(f"{size},sid")
    config.network.class_name = "Precond"
    config.network.kwargs = edm2.preset_config(size)
  elif name == "ddpmpp-tiny":
    config = cifar10_uncond.get_config("sid")
    config.network.class_name = "EDMPrecond"
    config.network.kwargs = dict(DDPMPP_TINY_KWARGS)
  elif name == "edm2-tiny":
    config = edm2_configs.get_config("xs,sid")
    config.network.class_name = "Precond"
    config.network.kwargs = dict(EDM2_TINY_KWARGS)
  elif name == "mnist":
    config = _mnist_config()
  else:
    raise ValueError(f"unknown benchmark config {name!r}; expected one of {', '.join(CONFIGS)}")
  if method == "sida" and name != "cifar10":
    raise Skip(f"SiDA rows run on cifar10 (real batch: MNIST-5k at 32×32×3), not {name}")
  config.method = "sid"
  config.teacher = ""
  config.generator_init = ""
  config.data.source = ""          # SiD is data-free; labels are drawn uniformly
  config.dropout = 0.0
  config.augment_p = 0.0
  config.dtype = dtype
  config.batch_size = batch_size or DEFAULT_BATCH.get(name, config.batch_size)
  if method == "sida":
    config.method = "sida"    # the recipe's loss settings, past the warm-up: the GAN terms on from the first step
    config.loss.sid_only_kimg = config.loss.critic_only_kimg = 0.0
    config.loss.adv_pool_size = config.batch_size   # one process: the official per-GPU pool is the whole batch
    config.data.update(source="mnist5k", resolution=32, channels=3, use_labels=False)
  return config


def set_matmul_precision(precision: str) -> None:
  jax.config.update("jax_default_matmul_precision", precision)


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def compile_timed(jitted: Callable, *args) -> tuple:
  """(compiled executable, seconds to lower + compile, XLA-counted FLOPs of one call or nan)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  return compiled, seconds, counted_flops(compiled)


def counted_flops(compiled: Any) -> float:
  """FLOPs of one call of the (per-device) program, as XLA's cost analysis counts them."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", math.nan))


def median_seconds(call: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple:
  """(median, all) wall-clock seconds of `call()` (blocked until its outputs are ready) after warm-up."""
  for _ in range(warmup):
    block(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def matmul_peak_flops(size: Optional[int] = None, repeats: int = 3) -> float:
  """Achieved FLOP/s of a large float32 jnp.dot at the current default precision: the machine's peak."""
  if size is None:
    size = 2048 if jax.default_backend() == "cpu" else 8192
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.float32) for k in keys)
  dot = jax.jit(jnp.dot)
  seconds, _ = median_seconds(lambda: dot(a, b), repeats)
  return 2.0 * size ** 3 / seconds


def peak_rss_bytes() -> int:
  """Peak resident memory of this process (Linux reports ru_maxrss in KiB, macOS in bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
  """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
  try:
    with open("/proc/self/statm") as statm:
      return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def temp_bytes(compiled: Any) -> Optional[int]:
  """XLA's planned scratch memory of a compiled program (activations kept for backward, etc.)."""
  analysis = compiled.memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def device_peak_bytes() -> Optional[int]:
  """Peak bytes in use on the first device, where the backend reports it (GPU/TPU), else None."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def load_average() -> str:
  return "/".join(f"{x:.2f}" for x in os.getloadavg())


def device_description() -> str:
  devices = jax.devices()
  return f"{devices[0].platform}: {devices[0].device_kind} ×{len(devices)}"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
  """Rows as a markdown table; `columns` are (header, key, format spec); a row with 'skipped' spans."""
  lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    if row.get("skipped"):
      cells = [str(row.get(key, "")) for _, key, _ in columns[:2]]
      cells += [f"skipped: {row['skipped']}"] + [""] * (len(columns) - 3)
    else:
      cells = [_cell(row.get(key), spec) for _, key, spec in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _cell(value: Any, spec: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return format(value, spec)
