"""Runs SiD's official `generate_onestep.py` on CPU and keeps its PNGs (official_pngs/<stem>/<seed>.png),
plus the latents and labels its StackedRandomGenerator draws for those seeds and the SHA-256 of the network
file (official_pngs/<stem>_noise.npz; the test finds the fixture snapshot by that hash).

    python tests/data/torch_random/make_official_pngs.py SID_CHECKOUT NETWORK_PKL SEEDS LABEL_DIM

SID_CHECKOUT is a checkout of github.com/mingyuanzhou/SiD (branch main); the script imports its
`generate_onestep`, `dnnlib`, `torch_utils` and `training` from there and changes nothing in them. Only the
surroundings are adapted for one CPU process: a single-process gloo group instead of NCCL + CUDA, and
`device=cpu` passed to the script's `main`. The test fixture pickles have their module source text omitted,
so a persistence import hook supplies SiD's `training/networks.py` as the source of every persistent class.
Needs torch (the parity environment). The stored set was made with NETWORK_PKL = the conditional DDPM++
snapshot of the public EDM fixtures, SEEDS = 0,1,2,3,42,4294967301 and LABEL_DIM = 10.
"""
import hashlib
import importlib
import os
import pathlib
import sys
import tempfile

import numpy as np
import PIL.Image


def run_generate_onestep(sid_root: str, network_pkl: str, outdir: str, seeds: list, sigma_g: float = 2.5):
  """The official script's `main` on CPU: writes outdir/<seed:06d>.png (and outdir.npz)."""
  import torch  # pylint: disable=import-outside-toplevel
  sid_root = str(pathlib.Path(sid_root).resolve())
  if sid_root not in sys.path:
    sys.path.insert(0, sid_root)
  persistence = importlib.import_module("torch_utils.persistence")
  distributed = importlib.import_module("torch_utils.distributed")
  generate_onestep = importlib.import_module("generate_onestep")
  networks_src = (pathlib.Path(sid_root) / "training" / "networks.py").read_text()

  def supply_source(meta):
    if meta.module_src == "<source omitted>":
      meta.module_src = networks_src
    return meta
  if supply_source not in persistence._import_hooks:  # pylint: disable=protected-access
    persistence.import_hook(supply_source)

  def init_one_cpu_process():
    if not torch.distributed.is_initialized():
      store = tempfile.mktemp(prefix="gloo_")
      torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
  distributed.init = init_one_cpu_process
  generate_onestep.main.callback(network_pkl=network_pkl, outdir=outdir, subdirs=False, seeds=list(seeds),
                                 class_idx=None, max_batch_size=64, num_fid_samples=len(seeds), sigma_G=sigma_g,
                                 device=torch.device("cpu"))
  return generate_onestep


def official_noise(generate_onestep, seeds: list, shape_chw: tuple, label_dim: int) -> dict:
  """latents [n, C, H, W] and labels [n] in the order the script draws them (one generator per seed)."""
  import torch  # pylint: disable=import-outside-toplevel
  rnd = generate_onestep.StackedRandomGenerator(torch.device("cpu"), seeds)
  latents = rnd.randn([len(seeds), *shape_chw], device=torch.device("cpu"))
  out = {"seeds": np.array(seeds, np.int64), "latents": latents.numpy()}
  if label_dim:
    out["labels"] = rnd.randint(label_dim, size=[len(seeds)], device=torch.device("cpu")).numpy()
  return out


def main():
  sid_root, network_pkl, seeds, label_dim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
  seeds = [int(s) for s in seeds.split(",")]
  stem = pathlib.Path(network_pkl).stem
  outdir = pathlib.Path(__file__).resolve().parent / "official_pngs" / stem
  module = run_generate_onestep(sid_root, network_pkl, str(outdir), seeds)
  npz = outdir.parent / f"{stem}.npz"
  if npz.exists():
    os.remove(npz)   # the script's own npz of the PNGs: not needed
  first = np.asarray(PIL.Image.open(outdir / f"{seeds[0]:06d}.png"))
  shape = (first.shape[2] if first.ndim == 3 else 1, *first.shape[:2])
  with open(network_pkl, "rb") as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  np.savez(outdir.parent / f"{stem}_noise.npz", **official_noise(module, seeds, shape, label_dim),
           snapshot_sha256=np.array(sha256))
  print(f"wrote {sorted(p.name for p in outdir.glob('*.png'))} to {outdir}")


if __name__ == "__main__":
  main()
