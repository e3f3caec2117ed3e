"""torch_random: PyTorch's per-seed draws, bit for bit on CPU, against stored torch draws, published values and
(when installed) torch itself; and `--mode sample` against the official generate_onestep.py PNGs."""
import hashlib
import importlib.util
import json
import os
import pathlib
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest

from configs import smoke
from conftest import fixtures_dir
from sida_jax import cli, sampling, torch_random

DATA = pathlib.Path(__file__).parent / "data" / "torch_random"


# --- mt19937 ---------------------------------------------------------------------------------------------------

def test_mt19937_matches_independent_implementations():
  # The C++ standard fixes the 10000th output of a default (seed 5489) std::mt19937: 4123659995.
  assert torch_random.mt19937_words([5489], 10000)[0, -1] == 4123659995
  # numpy's legacy RandomState(int) seeds with the same init_genrand; full-range uint32 draws are raw words.
  seeds = [0, 1, 123456789, 2**32 - 1]
  words = torch_random.mt19937_words(seeds, 1500)   # crosses two state updates
  for s, w in zip(seeds, words):
    np.testing.assert_array_equal(w, np.random.RandomState(s).randint(0, 2**32, size=1500, dtype=np.uint32))
  np.testing.assert_array_equal(torch_random.mt19937_words([2**32 + 5], 7), torch_random.mt19937_words([5], 7))


# --- the CPU generator against stored torch draws --------------------------------------------------------------

def _reference():
  return np.load(DATA / "draws.npz")


def _slices(numel):   # as in make_reference.py
  return {"head": slice(0, 16), "mid": slice(numel // 2, numel // 2 + 16), "tail": slice(numel - 16, numel)}


@pytest.mark.parametrize("k", range(16))
def test_cpu_draws_equal_stored_torch_draws(k):
  ref = _reference()
  shape = tuple(int(d) for d in ref[f"shape_{k}"])
  seeds = [int(s) for s in ref["seeds"]]
  for j, label_dim in enumerate(int(n) for n in ref["label_dims"]):
    z, labels = torch_random.cpu_randn_randint(seeds, shape, label_dim)
    np.testing.assert_array_equal(labels, ref[f"labels_{k}"][:, j], err_msg=f"label_dim {label_dim}")
  z, none = torch_random.cpu_randn_randint(seeds, shape)
  assert none is None and z.dtype == np.float32 and z.shape == (len(seeds), *shape)
  flat = z.reshape(len(seeds), -1)
  if f"full_{k}" in ref:
    np.testing.assert_array_equal(flat, ref[f"full_{k}"])
    return
  for name, sl in _slices(flat.shape[1]).items():
    np.testing.assert_array_equal(flat[:, sl], ref[f"{name}_{k}"], err_msg=name)
  assert [hashlib.sha256(d.astype("<f4").tobytes()).hexdigest() for d in flat] == list(ref[f"sha256_{k}"])


def test_reference_covers_both_normal_paths_and_large_seeds():
  ref = _reference()
  sizes = [int(np.prod(ref[f"shape_{k}"])) for k in range(16)]
  assert min(sizes) < 16 and 16 in sizes and any(n > 16 and n % 16 for n in sizes)
  assert max(int(s) for s in ref["seeds"]) >= 2**32 and 2**32 - 1 in ref["seeds"]
  assert str(ref["cpu_capability"]) in ("AVX2", "AVX512")   # the vectorised path we reproduce


def test_randn_randint_default_is_cpu_and_rejects_unknown_devices():
  a = torch_random.randn_randint([3, 4], (2, 9), 10)
  b = torch_random.cpu_randn_randint([3, 4], (2, 9), 10)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  with pytest.raises(ValueError, match="device 'mps'"):
    torch_random.randn_randint([0], (4,), device="mps")


def _round_to_float32(x: Fraction) -> np.float32:
  """Correct round-to-nearest-even of an exact rational to float32 (the independent reference)."""
  near = np.float32(float(x))
  candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
  dist = [abs(Fraction(float(c)) - x) for c in candidates]
  best = min(dist)
  ties = [c for c, d in zip(candidates, dist) if d == best]
  return min(ties, key=lambda c: int(np.array(c).view(np.uint32)) & 1)


def test_fma32_rounds_once():
  rng = np.random.default_rng(0)
  a = rng.standard_normal(2000).astype(np.float32)
  b = rng.standard_normal(2000).astype(np.float32)
  c = (rng.standard_normal(2000) * 10.0 ** rng.integers(-3, 3, 2000)).astype(np.float32)
  # Cases where the float64 sum lands exactly on a float32 midpoint: a·b = 2^-24·(1 + r·2^-46), 0 < r < 2^16,
  # plus c = ±1, so a plain double sum rounds to the midpoint 1 + 2^-24 and then, wrongly, down to 1.
  hard = []
  for big in range(2**23 + 1, 2**24):
    small = -(-2**46 // big)
    r = big * small - 2**46
    if 0 < r < 2**16 and small < 2**24:
      hard.append((np.float32(big * 2.0**-35), np.float32(small * 2.0**-35)))
    if len(hard) == 20:
      break
  ha, hb = (np.array(v, np.float32) for v in zip(*hard))
  a = np.concatenate([a, ha, -ha])
  b = np.concatenate([b, hb, hb])
  c = np.concatenate([c, np.ones(20, np.float32), -np.ones(20, np.float32)])
  out = torch_random.fma32(a, b, c)
  ref = [_round_to_float32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))) for x, y, z in zip(a, b, c)]
  np.testing.assert_array_equal(out, np.array(ref, np.float32))
  assert np.all(out[-40:-20] == np.float32(1 + 2.0**-23))   # the midpoint cases round up, not to even


# --- Philox4x32-10 and the CUDA generator (unverified on a GPU here) ------------------------------------------

def test_philox_known_answers():
  # Random123's known-answer vectors for philox4x32_10 (counter, key, output).
  kat = [("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
         ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
         ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1")]
  words = lambda text: np.array([int(w, 16) for w in text.split()], np.uint32)
  counters, keys, outputs = (np.stack([words(case[i]) for case in kat]) for i in range(3))
  np.testing.assert_array_equal(torch_random.philox4x32_10(counters, keys), outputs)


# Values printed by people running torch on GPUs, rounded to 4 decimals (github.com/pytorch/pytorch issues).
def test_cuda_draws_match_published_gpu_outputs():
  # #79496: torch.manual_seed(10); torch.randn(3, device='cuda')
  z, _ = torch_random.cuda_randn_randint([10], (3,))
  np.testing.assert_allclose(z[0], [-0.1029, 1.6810, -0.2708], atol=6e-5)
  # #62467: Generator('cuda').manual_seed(43); normal_ of [1, 3, 128, 128]; [..., 0, 0] on an RTX A6000.
  z, _ = torch_random.cuda_randn_randint([43], (1, 3, 128, 128), sm_count=84, max_threads_per_sm=1536)
  np.testing.assert_allclose(z[0, 0, :, 0, 0], [1.9983, 0.8704, 2.1127], atol=6e-5)
  # #97097: torch.manual_seed(14); torch.cuda.FloatTensor(1000, 100).normal_(5, 5 ** .5), first two rows
  # (the same on an RTX A4000 and an RTX 2070 Super).
  z, _ = torch_random.cuda_randn_randint([14], (1000, 100), sm_count=48, max_threads_per_sm=1536)
  scaled = z[0, :2, :3] * np.float32(5 ** 0.5) + np.float32(5)
  np.testing.assert_allclose(scaled, [[2.8731, 5.2727, 2.9889], [3.9968, 3.8097, 5.7328]], atol=6e-5)
  # #47347: torch.manual_seed(0); five torch.rand on cuda: thread i's first Philox word · 2^-32.
  i = np.arange(5, dtype=np.uint32)
  first = torch_random.philox4x32_10(np.stack([0 * i, 0 * i, i, 0 * i], -1), np.zeros((5, 2), np.uint32))[:, 0]
  np.testing.assert_allclose(first * 2.0**-32, [0.3990, 0.5167, 0.0249, 0.9401, 0.9459], atol=6e-5)


def test_cuda_grid_depends_on_the_gpu_beyond_one_wave():
  # #158398: Generator('cuda').manual_seed(42); randn([1, 64, 2048]) on two machines. The rows we check were
  # printed from one of them; rows 0-2 fit in any grid, rows 61 and 63 only match a 168-block grid
  # (e.g. 28 SMs × 6 blocks of 256 threads, as on an RTX 3060).
  printed = {0: ([0.1940, 2.1614, -0.1721], [1.4540, -2.7733, -0.8932]),
             1: ([-0.4574, 0.8063, 0.1580], [0.1124, 0.2769, -1.2535]),
             61: ([-0.4861, 0.3358, 1.0578], [-0.7282, 0.5087, 0.1318]),
             63: ([-1.2356, -0.4083, -0.4695], [-0.4841, 1.2850, -0.0282])}
  uncapped, _ = torch_random.cuda_randn_randint([42], (1, 64, 2048), sm_count=132, max_threads_per_sm=2048)
  capped, _ = torch_random.cuda_randn_randint([42], (1, 64, 2048), sm_count=28, max_threads_per_sm=1536)
  for row, (head, tail) in printed.items():
    got = capped[0, 0, row]
    np.testing.assert_allclose(np.concatenate([got[:3], got[-3:]]), head + tail, atol=6e-5, err_msg=str(row))
  np.testing.assert_array_equal(uncapped[0, 0, :3], capped[0, 0, :3])   # within one wave: the same
  assert not np.allclose(uncapped[0, 0, 63, :3], printed[63][0], atol=1e-2)
  with pytest.raises(ValueError, match="depends on the GPU"):
    torch_random.cuda_randn_randint([0], (1, 256, 256))


# --- live comparisons with torch (skipped without it) ----------------------------------------------------------

def _torch():
  return pytest.importorskip("torch", reason="live comparison needs torch (the parity environment)")


def test_live_cpu_draws_equal_torch():
  torch = _torch()
  if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    pytest.skip("torch's CPU capability is not AVX2/AVX512: its normal_ of ≥ 16 elements uses libm (not reproduced)")
  rng = np.random.default_rng(1)
  seeds = [int(s) for s in rng.integers(0, 2**33, 6)] + [2**32 - 1]
  for shape in [(4,), (16,), (3, 7), (5, 5, 5), (3, 32, 32), (1, 28, 28)]:
    for label_dim in (0, 10, 1000):
      z, labels = torch_random.cpu_randn_randint(seeds, shape, label_dim)
      for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s % 2**32)
        np.testing.assert_array_equal(z[i], torch.randn(shape, generator=g).numpy(), err_msg=f"{shape} {s}")
        if label_dim:
          assert labels[i] == int(torch.randint(label_dim, size=[], generator=g))


def test_live_cuda_draws_match_torch():
  torch = _torch()
  if not torch.cuda.is_available():
    pytest.skip("no CUDA device: torch_cuda stays unverified on this machine")
  props = torch.cuda.get_device_properties(0)
  seeds = [0, 1, 42, 2**32 - 1]
  for shape in [(3, 32, 32), (4, 64, 64), (1, 512, 1024)]:
    z, labels = torch_random.cuda_randn_randint(seeds, shape, 1000, sm_count=props.multi_processor_count,
                                                max_threads_per_sm=props.max_threads_per_multi_processor)
    ref = []
    for i, s in enumerate(seeds):
      g = torch.Generator("cuda").manual_seed(s)
      ref.append(torch.randn(shape, generator=g, device="cuda").cpu().numpy())
      assert labels[i] == int(torch.randint(1000, size=[], generator=g, device="cuda")), (shape, s)
    ref = np.stack(ref)
    print(f"torch_cuda {shape}: {np.mean(z == ref):.4f} of elements bit-equal, max |diff| {np.abs(z - ref).max():.2e}")
    np.testing.assert_allclose(z, ref, atol=2e-5, rtol=0)


# --- end to end: `--mode sample` on a fixture pickle vs the official generate_onestep.py -----------------------

OFFICIAL = DATA / "official_pngs"


def _pixels(folder, seeds):
  return np.stack([np.asarray(PIL.Image.open(folder / f"{s:06d}.png")) for s in seeds])


def _sample_with_our_cli(pkl, workdir, seeds):
  c = smoke.get_config()
  c.sample.source = str(pkl)
  c.sample.seeds = ",".join(str(s) for s in seeds)
  c.sample.batch_size = len(seeds)
  cli.run("sample", c, str(workdir))
  return workdir / "samples"


def _assert_same_pixels(ours, official):
  diff = np.abs(ours.astype(int) - official.astype(int))
  equal = float(np.mean(diff == 0))
  print(f"{equal:.5f} of {diff.size} pixels equal, max |diff| {diff.max()}")
  assert diff.max() <= 1 and equal >= 0.999   # the networks' float32 arithmetic differs (XLA vs torch)


def _snapshots_by_hash() -> dict:
  """{SHA-256: path} of the EDM fixture snapshots, found by listing the folder."""
  return {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in sorted(fixtures_dir("edm").glob("*.pkl"))}


def _official_cases() -> list:
  """(fixture snapshot, stored noise file) of every stored official PNG set whose snapshot this fixture set holds."""
  snapshots = _snapshots_by_hash()
  cases = []
  for noise_file in sorted(OFFICIAL.glob("*_noise.npz")):
    pkl = snapshots.get(str(np.load(noise_file)["snapshot_sha256"]))
    if pkl is not None:
      cases.append((pkl, noise_file))
  return cases


@pytest.mark.fixtures
def test_sample_mode_reproduces_official_generate_onestep_pngs(tmp_path):
  """The PNGs SiD's generate_onestep.py wrote for a fixture snapshot (found by its SHA-256) equal ours."""
  cases = _official_cases()
  if not cases:
    pytest.skip("this fixture set holds none of the snapshots the stored official PNGs were made from")
  for pkl, noise_file in cases:
    noise = np.load(noise_file)
    seeds = [int(s) for s in noise["seeds"]]
    channels, height, width = noise["latents"].shape[1:]
    label_dim = json.loads(pkl.with_name(pkl.stem + "_kwargs.json").read_text())["init_kwargs"].get("label_dim", 0)
    # The official script's latents and labels, exactly (seed 4294967301 is drawn as seed 5).
    z, y = sampling.seed_noise(seeds, (height, width, channels), label_dim=label_dim)
    np.testing.assert_array_equal(z, noise["latents"].transpose(0, 2, 3, 1))
    if label_dim:
      np.testing.assert_array_equal(y.argmax(1), noise["labels"])
    out = _sample_with_our_cli(pkl, tmp_path / pkl.stem, seeds)
    pngs = noise_file.with_name(noise_file.name[:-len("_noise.npz")])
    _assert_same_pixels(_pixels(out, seeds), _pixels(pngs, seeds))


@pytest.mark.fixtures
def test_live_official_generate_onestep(tmp_path):
  """Runs the official script itself (SIDA_OFFICIAL_SID = a checkout of mingyuanzhou/SiD) on CPU, on the first
  EDM fixture snapshot."""
  _torch()
  sid_root = os.environ.get("SIDA_OFFICIAL_SID")
  if not sid_root:
    pytest.skip("set SIDA_OFFICIAL_SID to a checkout of github.com/mingyuanzhou/SiD to run generate_onestep.py")
  pkl = sorted(fixtures_dir("edm").glob("*.pkl"))[0]
  spec = importlib.util.spec_from_file_location("make_official_pngs", DATA / "make_official_pngs.py")
  driver = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(driver)
  seeds = [7, 8, 9, 1000, 2**32 + 11]
  driver.run_generate_onestep(sid_root, str(pkl), str(tmp_path / "official"), seeds)
  out = _sample_with_our_cli(pkl, tmp_path / "ours", seeds)
  _assert_same_pixels(_pixels(out, seeds), _pixels(tmp_path / "official", seeds))
