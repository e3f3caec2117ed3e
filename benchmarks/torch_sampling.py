"""The official PyTorch samplers, timed call by call on command: the other side of
`bench_sampling.py --compare-torch`. Runs in a PyTorch environment on the official code at paths the user
gives (checkouts or git directories), imported from there, never copied:

    PYTHON_WITH_TORCH benchmarks/torch_sampling.py --official-code SID_DIR --official-edm EDM_DIR --spec '{...}'

One-step generation is SiD's `sid_sampler` (`sid_generate.py`: G(σ_init·z, σ_init, labels)); the multi-step
baseline is EDM's `edm_sampler` (`generate.py`, deterministic Heun, NFE 2n−1). The network is
`training.networks.EDMPrecond` with fresh weights, under `torch.no_grad()`, on fixed latents (the noise draws
are not timed, on either side). Protocol, one JSON object per line: {"ready": ...} after a warm-up of both;
"one_step" generates the spec's `images` in calls of `batch` and prints {"seconds": s}; "heun" samples one batch
and prints {"seconds": s}; "quit" prints {"peak_rss_gib": ...} and exits.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

from torch_step import official_source, say, serve


def load_module(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official-code", required=True, help="the official SiD code (checkout or git dir)")
  parser.add_argument("--official-edm", required=True, help="the official EDM code (checkout or git dir)")
  parser.add_argument("--spec", required=True, help="JSON: network kwargs, batch, images, heun_steps, init_sigma")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPU count)")
  args = parser.parse_args(argv)
  spec = json.loads(args.spec)
  sid_dir, edm_dir = official_source(args.official_code), official_source(args.official_edm)
  sys.path.insert(0, sid_dir)   # training/, dnnlib/, torch_utils/ (EDM's generate.py imports the same names)
  import torch  # pylint: disable=import-outside-toplevel
  from training import networks  # pylint: disable=import-outside-toplevel
  sid_generate = load_module("sid_generate", os.path.join(sid_dir, "sid_generate.py"))
  edm_generate = load_module("edm_generate", os.path.join(edm_dir, "generate.py"))
  torch.set_num_threads(args.threads or os.cpu_count())
  torch.manual_seed(0)
  kwargs = dict(spec["network"])
  kwargs.pop("class_name", None)
  net = networks.EDMPrecond(**kwargs).eval().requires_grad_(False)
  n, res, ch = spec["batch"], net.img_resolution, net.img_channels
  latents = torch.randn([n, ch, res, res])
  labels = None
  if net.label_dim:
    labels = torch.zeros([n, net.label_dim])
    labels[:, 0] = 1
  calls = -(-spec["images"] // n)

  def one_step():
    with torch.no_grad():
      for _ in range(calls):
        out = sid_generate.sid_sampler(net, latents, labels, init_sigma=spec["init_sigma"])
    return out

  def heun():
    with torch.no_grad():
      return edm_generate.edm_sampler(net, latents, labels, num_steps=spec["heun_steps"])

  start = time.perf_counter()
  finite = bool(torch.isfinite(one_step()).all()) and bool(torch.isfinite(heun()).all())
  say({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(), "finite": finite,
       "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "warmup_s": time.perf_counter() - start})
  serve({"one_step": one_step, "heun": heun})

if __name__ == "__main__":
  main()
