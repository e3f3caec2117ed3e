"""The official PyTorch SiD iteration, timed step by step on command: the other side of
`bench_step.py --compare-torch`. Runs in a PyTorch environment, on the official code at a path the user gives
(a checkout of the SiD repository, or its git directory), which is imported from there, never copied:

    PYTHON_WITH_TORCH benchmarks/torch_step.py --official-code SID_DIR --spec '{"network": {...}, ...}'

`--method sida` runs the SiDA iteration of the official `sida` branch instead (`sida_training/`: the fake score
network's encoder as discriminator on a real batch, past the warm-up, so both GAN terms are on).
The SiD iteration follows `training/sid_training_loop.py` with one accumulation round and one process: fake
score update (generator sample without gradient, `loss_fn`, backward, nan_to_num, Adam), generator update
(`loss_fn.generator_loss` through the teacher and fake score, backward, nan_to_num, Adam), EMA. Networks are
`training.networks.EDMPrecond` with fresh weights; dropout is off and there is no augmentation, as in the
JAX benchmark. Protocol on stdin/stdout, one JSON object per line: after setup it prints {"ready": ...};
each line "step" runs one iteration and prints {"seconds": s}; "quit" prints {"peak_rss_gib": ...} and exits.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def official_source(path: str, ref: str = "HEAD") -> str:
  """A folder holding `training/` and `torch_utils/` of the official code: `path` itself, or, for a git
  directory without work tree, its `ref` (a branch, tag or commit) exported to a temporary folder."""
  if os.path.isdir(os.path.join(path, "training")) and ref == "HEAD":
    return path
  try:
    archive = subprocess.run(["git", "--git-dir", path, "archive", ref], capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise SystemExit(f"--official-code {path}: neither a checkout with training/ nor a readable git directory ({e})")
  folder = tempfile.mkdtemp(prefix="official_sid_")
  subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
  return folder


def say(obj) -> None:
  print(json.dumps(obj), flush=True)


def serve(commands: dict) -> None:
  """Answers each stdin line naming one of `commands` with {"seconds": its run time}, until "quit"; then
  prints {"peak_rss_gib": ...}."""
  for line in sys.stdin:
    command = line.strip()
    if command == "quit":
      break
    if command in commands:
      start = time.perf_counter()
      commands[command]()
      say({"seconds": time.perf_counter() - start})
  say({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30})


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official-code", required=True, help="the official SiD code (checkout or git dir)")
  parser.add_argument("--spec", required=True, help="JSON: network kwargs, batch, alpha, tmax, init_sigma, lr")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPU count)")
  parser.add_argument("--method", default="sid", choices=("sid", "sida"),
                      help="sida: the SiDA iteration of the official `sida` branch (sida_training/)")
  args = parser.parse_args(argv)
  spec = json.loads(args.spec)
  sys.path.insert(0, official_source(args.official_code, "HEAD" if args.method == "sid" else "sida"))
  import torch  # pylint: disable=import-outside-toplevel
  if args.method == "sida":
    from sida_training import sida_networks as networks  # pylint: disable=import-outside-toplevel
    from sida_training import sida_loss  # pylint: disable=import-outside-toplevel
  else:
    from training import networks, sid_loss  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads or os.cpu_count())
  torch.manual_seed(0)
  kwargs = dict(spec["network"])
  kwargs.pop("class_name", None)
  if args.method == "sida":   # the branch's encoder-decoder U-Net: the fake score network's encoder is the discriminator
    kwargs["model_type"] = kwargs.get("model_type", "SongUNet") + "_EncoderDecoder"
    true_score = networks.EDMPrecond_EncoderDecoder(**kwargs).eval().requires_grad_(False)
  else:
    true_score = networks.EDMPrecond(**kwargs).eval().requires_grad_(False)
  fake_score = copy.deepcopy(true_score).train().requires_grad_(True)
  generator = copy.deepcopy(true_score).train().requires_grad_(True)
  generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
  loss_fn = sida_loss.SIDA_EDMLoss() if args.method == "sida" else sid_loss.SID_EDMLoss()
  adam = dict(lr=spec["lr"], betas=(0.0, 0.999), eps=1e-8)
  fake_optimizer = torch.optim.Adam(fake_score.parameters(), **adam)
  g_optimizer = torch.optim.Adam(generator.parameters(), **adam)
  n, res, ch = spec["batch"], true_score.img_resolution, true_score.img_channels
  labels = torch.zeros([n, true_score.label_dim])
  if true_score.label_dim:
    labels[:, 0] = 1
  sigma_init = spec["init_sigma"] * torch.ones(n, 1, 1, 1)
  no_augment = torch.zeros(n, 9)

  def generate():
    z = spec["init_sigma"] * torch.randn([n, ch, res, res])
    return generator(z, sigma_init, labels, augment_labels=no_augment)

  def clean(module):
    for p in module.parameters():
      if p.grad is not None:
        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)

  real_images = torch.rand([n, ch, res, res]) * 2 - 1   # SiDA's discriminator reads a real batch

  def sida_iteration(nimg):
    # sida_training/sida_training_loop.py with use_gan, past its warm-up (the GAN terms on, both updates applied).
    fake_score.train().requires_grad_(True)
    fake_optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      images = generate()
    loss, loss_d = loss_fn.fakescore_discriminator_share_encoder_loss(
        fake_score=fake_score, images=images, labels=labels, real_images=real_images, true_score=true_score,
        alpha=spec["alpha"])
    (loss.sum() / n + loss_d.sum() * spec["lsd"] / n).backward()
    fake_score.eval().requires_grad_(False)
    clean(fake_score)
    torch.nn.utils.clip_grad_value_(fake_score.parameters(), 1)
    fake_optimizer.step()
    generator.train().requires_grad_(True)
    g_optimizer.zero_grad(set_to_none=True)
    images = generate()
    loss, loss_gan = loss_fn.generator_share_encoder_loss(true_score=true_score, fake_score=fake_score, images=images,
                                                          labels=labels, alpha=spec["alpha"], tmax=spec["tmax"])
    loss_gan = loss_gan.mean(dim=[1, 2, 3], keepdim=True) * ch * res * res
    (0.5 * loss.sum() * (100.0 / n) + 0.5 * loss_gan.sum() * spec["lsg_gan"] / n).backward()
    generator.eval().requires_grad_(False)
    clean(generator)
    g_optimizer.step()
    ema(nimg)

  def ema(nimg):
    halflife = min(500e3, nimg * 0.05)
    beta = 0.5 ** (n / max(halflife, 1e-8))
    with torch.no_grad():
      for p_ema, p in zip(generator_ema.parameters(), generator.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))

  def iteration(nimg):
    if args.method == "sida":
      return sida_iteration(nimg)
    fake_score.train().requires_grad_(True)
    fake_optimizer.zero_grad(set_to_none=True)
    images = generate()
    loss = loss_fn(fake_score=fake_score, images=images, labels=labels).sum() / n
    loss.backward()
    fake_score.eval().requires_grad_(False)
    clean(fake_score)
    fake_optimizer.step()
    generator.train().requires_grad_(True)
    g_optimizer.zero_grad(set_to_none=True)
    images = generate()
    loss = loss_fn.generator_loss(true_score=true_score, fake_score=fake_score, images=images, labels=labels,
                                  alpha=spec["alpha"], tmax=spec["tmax"]).sum() * (100.0 / n)
    loss.backward()
    generator.eval().requires_grad_(False)
    clean(generator)
    g_optimizer.step()
    ema(nimg)

  start = time.perf_counter()
  iteration(0)   # warm-up
  say({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
       "params_m": sum(p.numel() for p in true_score.parameters()) / 1e6,
       "warmup_s": time.perf_counter() - start})
  images_seen = [n]

  def step():
    iteration(images_seen[0])
    images_seen[0] += n

  serve({"step": step})


if __name__ == "__main__":
  main()
