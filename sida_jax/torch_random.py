"""PyTorch's per-seed random draws in numpy: the noise and labels of image i as the official scripts draw them.

EDM's `generate.py`, SiD's `generate_onestep.py` and EDM2's `generate_images.py` give every image its own
generator (`StackedRandomGenerator`): `torch.Generator(device).manual_seed(seed % 2**32)`, then
`torch.randn([C, H, W])` and, for conditional networks only, `torch.randint(label_dim, size=[])` from the same
generator. This module redoes those draws without torch.

CPU generator (`device="cpu"`): bit for bit (tested against torch 2.13.0 and 2.14.1).
* mt19937 seeded like `manual_seed` (the reference init_genrand; seeds ≥ 2**32 are reduced mod 2**32).
* `randn` of fewer than 16 elements: two 53-bit uniforms per pair of normals (each from two 32-bit words,
  the first one high), Box–Muller in float64 (r = sqrt(−2·log1p(−u2)), θ = 2π·u1; r·cos θ, then r·sin θ),
  cast to float32. The float64 functions are Python's `math`, i.e. the C library's, which torch calls too.
* `randn` of 16 elements or more: all uniforms (word & 0xFFFFFF)·2⁻²⁴ first, then Box–Muller on blocks of
  16 (u1 = 1 − u[j], u2 = u[j + 8] for j < 8; r·cos θ → j, r·sin θ → j + 8) in float32 with the Cephes-style
  log and sincos of ATen's `avx_mathfun.h`, including the multiply-adds the compiler fused. When the size is not a
  multiple of 16, 16 fresh uniforms redo the last 16 elements. This is the code of x86-64 builds running with
  the AVX2 or AVX512 CPU capability. NOT reproduced: the DEFAULT capability (x86 without AVX2, ARM,
  `ATEN_CPU_CAPABILITY=default`), which evaluates the same blocks with the C library's float32 logf/sinf/cosf
  and draws different values (38 % of elements differ, by up to 2e-6).
* `randint(high)`: word % high, from one 32-bit word for high < 2**28, else from two words (first one high).

CUDA generator (`device="cuda"`): UNVERIFIED on a GPU. Written from the ATen and curand sources; checked
against values people printed from GPU runs (4 decimals) and, when a CUDA device is present, against torch
(tests/test_torch_random.py). Philox4x32-10 with key = seed and 128-bit counter = (offset/4 + call) + 2⁶⁴·thread.
`randn` runs `curand_normal4` in a grid-stride loop: with T = 256·(number of blocks) threads, element i is
component (i // T) mod 4 of call i // 4T of thread i mod T, and the components are (r·sin, r·cos) of words
(x, y), then of (z, w). The grid has ceil(numel/256) blocks, capped at SM count × (max threads per SM / 256):
up to `CUDA_ONE_WAVE` elements every GPU agrees; larger draws need `sm_count` and `max_threads_per_sm`. The
generator's offset then moves by 4 per call per thread, and `randint` takes word x of thread 0 there. Words,
layout, uniforms and labels are integer (or exactly rounded float) arithmetic, so they should match exactly;
the normals cannot: the device uses the `__sincosf` hardware approximation (and its own logf) where we use
correctly rounded functions, so expect differences around 1e-6.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

DEVICES = ("cpu", "cuda")
_f32 = np.float32
_u32 = np.uint32


# ---------------------------------------------------------------------------------------------------------------
# mt19937, vectorised over seeds (state laid out [624, n_seeds] so each update is one contiguous row op).

_MT_N, _MT_M = 624, 397
_MT_UPPER, _MT_LOWER, _MT_MATRIX_A = _u32(0x80000000), _u32(0x7FFFFFFF), _u32(0x9908B0DF)


def _mt_seed(seeds: np.ndarray) -> np.ndarray:
  state = np.empty((_MT_N, seeds.size), _u32)
  state[0] = seeds
  for j in range(1, _MT_N):
    prev = state[j - 1]
    state[j] = _u32(1812433253) * (prev ^ (prev >> _u32(30))) + _u32(j)
  return state


def _mt_twist(mt: np.ndarray) -> None:
  """The in-place state update, in the four stretches whose inputs are all old or all already updated."""
  def update(lo, hi, far):
    y = (mt[lo:hi] & _MT_UPPER) | (mt[lo + 1:hi + 1] & _MT_LOWER)
    mt[lo:hi] = far ^ (y >> _u32(1)) ^ ((y & _u32(1)) * _MT_MATRIX_A)
  update(0, _MT_N - _MT_M, mt[_MT_M:])
  update(_MT_N - _MT_M, 2 * (_MT_N - _MT_M), mt[:_MT_N - _MT_M])
  update(2 * (_MT_N - _MT_M), _MT_N - 1, mt[_MT_N - _MT_M:_MT_M - 1])
  y = (mt[_MT_N - 1] & _MT_UPPER) | (mt[0] & _MT_LOWER)
  mt[_MT_N - 1] = mt[_MT_M - 1] ^ (y >> _u32(1)) ^ ((y & _u32(1)) * _MT_MATRIX_A)


def _mt_temper(y: np.ndarray) -> np.ndarray:
  y = y ^ (y >> _u32(11))
  y = y ^ ((y << _u32(7)) & _u32(0x9D2C5680))
  y = y ^ ((y << _u32(15)) & _u32(0xEFC60000))
  return y ^ (y >> _u32(18))


def mt19937_words(seeds: Sequence[int], count: int) -> np.ndarray:
  """The first `count` 32-bit outputs of `torch.Generator().manual_seed(s)` for each seed s: uint32 [n, count]."""
  seeds = _as_seed_array(seeds)
  state = _mt_seed(seeds)
  blocks = []
  for _ in range(-(-count // _MT_N)):
    _mt_twist(state)   # torch (like the reference code) twists before the very first output
    blocks.append(_mt_temper(state))
  if not blocks:
    return np.zeros((seeds.size, 0), _u32)
  return np.concatenate(blocks)[:count].T.copy()


def _as_seed_array(seeds) -> np.ndarray:
  """Seeds reduced mod 2**32 as the official scripts do (`int(seed) % (1 << 32)`)."""
  return np.array([int(s) % (1 << 32) for s in seeds], _u32)


# ---------------------------------------------------------------------------------------------------------------
# float32 arithmetic of torch's AVX2 Box–Muller.

def fma32(a, b, c) -> np.ndarray:
  """Fused multiply-add in float32 with one rounding, like the vfmadd the compiler emitted.

  a·b of two floats is exact in float64, so only a·b + c rounds twice (to float64, then float32). That is wrong
  only when the float64 sum lands exactly on a float32 midpoint without being exact; those rare elements are
  nudged by one float64 ulp towards the exact sum before the final rounding.
  """
  p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
  c = np.asarray(c, np.float64)
  s = p + c
  midpoint = (s.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
  if midpoint.any():
    back = s - p
    err = (p - (s - back)) + (c - back)   # TwoSum: p + c = s + err exactly
    s = np.where(midpoint & (err != 0), np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
  return s.astype(_f32)


_LOG_POLY = tuple(_f32(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                     1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                     3.3333331174e-1))
_LOG_Q1, _LOG_Q2, _SQRT_HALF = _f32(-2.12194440e-4), _f32(0.693359375), _f32(0.707106781186547524)
_PIO4_PARTS = (_f32(-0.78515625), _f32(-2.4187564849853515625e-4), _f32(-3.77489497744594108e-8))
_FOUR_OVER_PI = _f32(1.27323954473516)
_COS_POLY = (_f32(2.443315711809948e-5), _f32(-1.388731625493765e-3), _f32(4.166664568298827e-2))
_SIN_POLY = (_f32(-1.9515295891e-4), _f32(8.3321608736e-3), _f32(-1.6666654611e-1))
_TWO_PI_F32 = _f32(2.0 * math.pi)


def _avx2_log(x: np.ndarray) -> np.ndarray:
  """Cephes logf as torch's avx_mathfun computes it, for x in (0, 1] (no special cases needed here)."""
  bits = x.view(np.int32)
  e = ((bits >> 23) - 0x7F).astype(_f32) + _f32(1)
  m = ((bits & np.int32(~0x7F800000)) | np.int32(0x3F000000)).view(_f32)   # mantissa in [0.5, 1)
  small = m < _SQRT_HALF
  e = e - small.astype(_f32)
  m = (m - _f32(1)) + np.where(small, m, _f32(0))
  z = m * m
  y = np.full_like(m, _LOG_POLY[0])
  for coef in _LOG_POLY[1:]:
    y = fma32(y, m, coef)
  y = y * m
  y = fma32(y, z, e * _LOG_Q1)   # the compiler fused this product, not e·q1
  y = y - z * _f32(0.5)
  return fma32(e, _LOG_Q2, m + y)


def _avx2_sincos(x: np.ndarray) -> tuple:
  """Cephes sinf/cosf as torch's avx_mathfun sincos computes them, for x ≥ 0."""
  quadrant = ((x * _FOUR_OVER_PI).astype(np.int32) + 1) & ~1
  q = quadrant.astype(_f32)
  for part in _PIO4_PARTS:   # x − q·π/4 in three pieces
    x = fma32(q, part, x)
  z = x * x
  cos_p = fma32(fma32(np.full_like(z, _COS_POLY[0]), z, _COS_POLY[1]), z, _COS_POLY[2])
  cos_p = fma32(cos_p * z, z, -(z * _f32(0.5))) + _f32(1)   # the second ·z fused with − z/2
  sin_p = fma32(fma32(np.full_like(z, _SIN_POLY[0]), z, _SIN_POLY[1]), z, _SIN_POLY[2])
  sin_p = fma32(sin_p * z, x, x)
  swap = (quadrant & 2) != 0
  sin = np.where(swap, cos_p, sin_p)
  cos = np.where(swap, sin_p, cos_p)
  sin = np.where((quadrant & 4) != 0, -sin, sin)   # the signs of quadrants 4-7 and 2-5
  cos = np.where(((quadrant - 2) & 4) == 0, -cos, cos)
  return sin, cos


def _avx2_box_muller(u: np.ndarray, chunk: int = 2048) -> np.ndarray:
  """Normals from uniforms [..., 16] (one block each): torch's AVX2 `normal_fill_16` with mean 0, std 1."""
  flat = u.reshape(-1, 16)
  out = np.empty_like(flat)
  for i in range(0, flat.shape[0], chunk):   # chunks that stay in cache
    blk = flat[i:i + chunk]
    radius = np.sqrt(_f32(-2) * _avx2_log(_f32(1) - blk[:, :8]))
    sin, cos = _avx2_sincos(_TWO_PI_F32 * blk[:, 8:])
    out[i:i + chunk, :8] = radius * cos
    out[i:i + chunk, 8:] = radius * sin
  return out.reshape(u.shape) + _f32(0)   # fma(n, std=1, mean=0) turns −0 into +0


# ---------------------------------------------------------------------------------------------------------------
# CPU generator: torch.randn / torch.randint with a fresh `manual_seed` generator per seed.

def _cpu_normal_words(numel: int) -> int:
  if numel >= 16:
    return numel + (16 if numel % 16 else 0)
  return 4 * ((numel + 1) // 2)


def _cpu_normal_from_words(words: np.ndarray, numel: int) -> np.ndarray:
  """float32 [n, numel] normals from each row's words, following torch's CPU `normal_` paths."""
  n = words.shape[0]
  if numel >= 16:
    u = (words & _u32(0xFFFFFF)).astype(_f32) * _f32(2.0 ** -24)
    body = numel // 16 * 16
    out = np.empty((n, numel), _f32)
    out[:, :body] = _avx2_box_muller(u[:, :body].reshape(n, -1, 16)).reshape(n, body)
    if numel % 16:   # the last 16 elements are redone from 16 fresh uniforms
      out[:, numel - 16:] = _avx2_box_muller(u[:, numel:numel + 16])
    return out
  out = np.empty((n, numel), _f32)
  for row in range(n):
    w = words[row].astype(np.uint64)
    doubles = (((w[0::2] << np.uint64(32)) | w[1::2]) & np.uint64((1 << 53) - 1)).astype(np.float64) * 2.0 ** -53
    for k in range(0, numel, 2):
      u1, u2 = float(doubles[k]), float(doubles[k + 1])
      radius = math.sqrt(-2.0 * math.log1p(-u2))
      theta = 2.0 * math.pi * u1
      out[row, k] = radius * math.cos(theta)
      if k + 1 < numel:
        out[row, k + 1] = radius * math.sin(theta)
  return out


def _randint_words(high: int) -> int:
  return 2 if high >= 1 << 28 else 1


def _randint_from_words(words: np.ndarray, high: int) -> np.ndarray:
  if high >= 1 << 28:
    value = (words[:, 0].astype(np.uint64) << np.uint64(32)) | words[:, 1].astype(np.uint64)
  else:
    value = words[:, 0].astype(np.uint64)
  return (value % np.uint64(high)).astype(np.int64)


def cpu_randn_randint(seeds: Sequence[int], shape: Sequence[int], high: int = 0) -> tuple:
  """For each seed: torch.randn(shape) then (if high > 0) torch.randint(high, size=[]) from
  `torch.Generator('cpu').manual_seed(seed % 2**32)`. Returns float32 [n, *shape] and int64 [n] or None."""
  shape = tuple(int(d) for d in shape)
  numel = int(np.prod(shape, dtype=np.int64))
  n_normal = _cpu_normal_words(numel) if numel else 0
  n_int = _randint_words(high) if high > 0 else 0
  words = mt19937_words(seeds, n_normal + n_int)
  noise = _cpu_normal_from_words(words[:, :n_normal], numel).reshape(-1, *shape)
  labels = _randint_from_words(words[:, n_normal:], high) if high > 0 else None
  return noise, labels


# ---------------------------------------------------------------------------------------------------------------
# CUDA generator (UNVERIFIED against a GPU, see the module docstring).

_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = _u32(0x9E3779B9), _u32(0xBB67AE85)


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
  """Philox4x32 with 10 rounds (Random123, curand): uint32 counter [..., 4], key [..., 2] → uint32 [..., 4]."""
  c = [np.asarray(counter, _u32)[..., i] for i in range(4)]
  k0, k1 = (np.asarray(key, _u32)[..., i] for i in range(2))
  for r in range(10):
    if r:
      k0, k1 = k0 + _PHILOX_W0, k1 + _PHILOX_W1
    p0 = c[0].astype(np.uint64) * _PHILOX_M0
    p1 = c[2].astype(np.uint64) * _PHILOX_M1
    hi0, lo0 = (p0 >> np.uint64(32)).astype(_u32), p0.astype(_u32)
    hi1, lo1 = (p1 >> np.uint64(32)).astype(_u32), p1.astype(_u32)
    c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
  return np.stack(c, axis=-1)


# Up to this many elements every GPU runs one wave of threads (40 SMs × 4 blocks of 256 on a T4), so the draw
# does not depend on the GPU; beyond it the caller must say which GPU (SM count, max threads per SM).
CUDA_ONE_WAVE = 256 * 40 * 4
_CURAND_INV_2POW32 = _f32(2.3283064e-10)
_CURAND_INV_2POW32_2PI = _f32(_CURAND_INV_2POW32 * _f32(6.2831855))


def _curand_box_muller(x: np.ndarray, y: np.ndarray) -> tuple:
  """curand's `_curand_box_muller` for two uint32 words: (sin, cos) normals. sin/cos/log are correctly rounded
  here; the device uses `__sincosf` (hardware approximation) and its own logf."""
  u = fma32(x.astype(_f32), _CURAND_INV_2POW32, _CURAND_INV_2POW32 / _f32(2))
  v = fma32(y.astype(_f32), _CURAND_INV_2POW32_2PI, _CURAND_INV_2POW32_2PI / _f32(2))
  s = np.sqrt(_f32(-2) * np.log(u.astype(np.float64)).astype(_f32))
  v64 = v.astype(np.float64)
  return np.sin(v64).astype(_f32) * s, np.cos(v64).astype(_f32) * s


def _cuda_launch(numel: int, unroll: int, sm_count: Optional[int], max_threads_per_sm: Optional[int]) -> tuple:
  """(threads T, Philox offset increment) of ATen's `calc_execution_policy`: 256-thread blocks, at most
  SM count × (max threads per SM / 256) of them."""
  blocks = -(-numel // 256)
  if sm_count is not None:
    if not max_threads_per_sm:
      raise ValueError("cuda randn: give max_threads_per_sm with sm_count (e.g. 2048 on A100/H100, 1536 on RTX 30/40)")
    blocks = min(blocks, sm_count * (max_threads_per_sm // 256))
  threads = 256 * blocks
  calls = (numel - 1) // (threads * unroll) + 1
  return threads, calls * 4


def _philox_words(seeds: np.ndarray, thread: np.ndarray, call: np.ndarray, offset: int) -> np.ndarray:
  """The 4 words of the `call`-th curand4 of `curand_init(seed, thread, offset)` ([n_seeds, m, 4])."""
  block = offset // 4 + call.astype(np.uint64)   # offset is a multiple of 4 here (ATen rounds it up)
  counter = np.stack([block.astype(_u32), (block >> np.uint64(32)).astype(_u32),
                      thread.astype(_u32), (thread.astype(np.uint64) >> np.uint64(32)).astype(_u32)], -1)
  key = np.stack([seeds, np.zeros_like(seeds)], -1)
  return philox4x32_10(counter[None], key[:, None])


def cuda_randn_randint(seeds: Sequence[int], shape: Sequence[int], high: int = 0,
                       sm_count: Optional[int] = None, max_threads_per_sm: Optional[int] = None) -> tuple:
  """Like `cpu_randn_randint` for `torch.Generator('cuda')`. UNVERIFIED against a GPU; labels are exact
  integer arithmetic, the normals only close (see the module docstring)."""
  shape = tuple(int(d) for d in shape)
  numel = int(np.prod(shape, dtype=np.int64))
  seeds = _as_seed_array(seeds)
  offset = 0
  noise = np.zeros((seeds.size, numel), _f32)
  if numel:
    if sm_count is None and numel > CUDA_ONE_WAVE:
      raise ValueError(f"cuda randn of {numel} elements (> {CUDA_ONE_WAVE}): the grid depends on the GPU; "
                       "give its SM count and max threads per SM")
    threads, increment = _cuda_launch(numel, 4, sm_count, max_threads_per_sm)
    i = np.arange(numel, dtype=np.int64)
    thread, rest = i % threads, i // threads
    call, component = rest // 4, rest % 4
    words = _philox_words(seeds, thread, call, offset)
    pair = np.where(component < 2, 0, 2)
    x = np.take_along_axis(words, np.broadcast_to(pair[None, :, None], (seeds.size, numel, 1)), -1)[..., 0]
    y = np.take_along_axis(words, np.broadcast_to(pair[None, :, None] + 1, (seeds.size, numel, 1)), -1)[..., 0]
    sin, cos = _curand_box_muller(x, y)
    noise = np.where((component % 2 == 0)[None], sin, cos)
    offset += increment
  labels = None
  if high > 0:
    words = _philox_words(seeds, np.zeros(1, np.int64), np.zeros(1, np.int64), offset)[:, 0]
    if high >= 1 << 28:
      value = (words[:, 0].astype(np.uint64) << np.uint64(32)) | words[:, 1].astype(np.uint64)
    else:
      value = words[:, 0].astype(np.uint64)
    labels = (value % np.uint64(high)).astype(np.int64)
  return noise.reshape(-1, *shape), labels


def randn_randint(seeds: Sequence[int], shape: Sequence[int], high: int = 0, device: str = "cpu") -> tuple:
  """`StackedRandomGenerator(device, seeds)`: randn([n, *shape]) then, if high > 0, randint(high, size=[n])."""
  if device == "cpu":
    return cpu_randn_randint(seeds, shape, high)
  if device == "cuda":
    return cuda_randn_randint(seeds, shape, high)
  raise ValueError(f"torch_random device {device!r}: expected one of {DEVICES}")
