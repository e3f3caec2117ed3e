"""Evaluation of a generator: FID (and IS, precision/recall) with the official protocol.

Images are generated from EDM-style per-image seeds, quantised exactly as the official code saves them
(floor(clip(127.5x + 128))), and fed as uint8 to the detector: the FID Inception-v3 (weights supplied by the
user) or, offline, the small MNIST feature network shipped with sida_jax (an FID *proxy*, not comparable
with published FIDs).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sida_jax import sampling
from sida_jax.metrics import fid as fid_lib

DETECTORS = ("inception", "mnist")


@dataclasses.dataclass
class Detector:
  name: str
  features: Callable[[np.ndarray], tuple]   # uint8 NHWC -> (features [N, D], logits [N, K] or None)

  def statistics(self, images_uint8_batches, keep_features: bool = False) -> tuple:
    """(mu, sigma, logits or None, features or None) over batches of uint8 images, in float64."""
    moments, logits, kept = None, [], []
    for images in images_uint8_batches:
      feats, lg = self.features(images)
      feats = np.asarray(feats)
      moments = (fid_lib.FeatureMoments.zeros(feats.shape[1]) if moments is None else moments).update(feats)
      if lg is not None:
        logits.append(np.asarray(lg))
      if keep_features:
        kept.append(feats)
    if moments is None:
      raise ValueError(f"{self.name} detector: no images to compute statistics of")
    mu, sigma = moments.mean_and_covariance()
    return (mu, sigma, np.concatenate(logits) if logits else None,
            np.concatenate(kept) if kept else None)


def make_detector(detector: str, detector_path: str = "") -> Detector:
  if detector == "mnist":
    from sida_jax.metrics import mnist_features  # pylint: disable=import-outside-toplevel

    def mnist(images):
      images = np.asarray(images, np.float32) / 127.5 - 1.0
      if images.shape[-1] == 3:
        images = images.mean(axis=-1, keepdims=True)
      res = mnist_resolution(images.shape[1])
      if images.shape[1:3] != (res, res):   # e.g. the 16×16 smoke network: the net only takes 28 or 32
        images = np.asarray(jax.image.resize(images, (images.shape[0], res, res, 1), "bilinear"))
      return mnist_features.mnist_features(images), None
    return Detector("mnist", mnist)
  if detector == "inception":
    if not detector_path:
      raise ValueError("config.eval.detector_path: the Inception weights file is required "
                       "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth or an .npz of it)")
    from sida_jax.metrics import inception  # pylint: disable=import-outside-toplevel
    fn = inception.make_inception_fn(inception.load_inception_variables(detector_path))

    def incept(images):
      images = np.asarray(images)
      if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
      feats, logits = fn(jnp.asarray(images))
      return np.asarray(feats), np.asarray(logits)
    return Detector("inception", incept)
  raise ValueError(f"config.eval.detector={detector!r} is not one of {', '.join(DETECTORS)}")


def mnist_resolution(resolution: int) -> int:
  """The MNIST feature net's input size for images of `resolution`: 28 or 32 as they are, else 32 (resized)."""
  return resolution if resolution in (28, 32) else 32


def reference_statistics(detector: Detector, ref_stats: str, resolution: int) -> tuple:
  if ref_stats:
    return fid_lib.load_reference_stats(ref_stats)
  if detector.name == "mnist":
    from sida_jax.metrics import mnist_features  # pylint: disable=import-outside-toplevel
    return mnist_features.mnist_reference_stats(mnist_resolution(resolution))
  raise ValueError("config.eval.ref_stats: reference statistics are required for the Inception FID "
                   "(EDM's cifar10-32x32.npz etc., or `--mode ref` on a dataset)")


def generated_batches(generate: Callable, seeds: list, image_shape: tuple, label_dim: int,
                      batch_size: int, rng: str = "torch_cpu"):
  """uint8 batches of generated images, image i drawn from seeds[i] whatever the batch size."""
  for i in range(0, len(seeds), batch_size):
    chunk = seeds[i:i + batch_size]
    z, labels = sampling.seed_noise(chunk, image_shape, label_dim, rng)
    pad = batch_size - len(chunk)   # fixed shapes: one compilation
    if pad:
      z = np.concatenate([z, np.zeros((pad, *z.shape[1:]), z.dtype)])
      labels = None if labels is None else np.concatenate([labels, np.repeat(labels[:1], pad, 0)])
    images = generate(jnp.asarray(z), None if labels is None else jnp.asarray(labels))
    yield sampling.to_uint8(images)[:len(chunk)]


def evaluate(generate: Callable, image_shape: tuple, label_dim: int, detector: Detector,
             reference: tuple, num_images: int, batch_size: int, seed_offset: int = 0,
             inception_score: bool = True, real_features: Optional[np.ndarray] = None,
             rng: str = "torch_cpu") -> dict:
  """FID (and IS when the detector has logits; precision/recall when real features are given)."""
  seeds = list(range(seed_offset, seed_offset + num_images))
  mu, sigma, logits, feats = detector.statistics(
      generated_batches(generate, seeds, image_shape, label_dim, batch_size, rng), real_features is not None)
  results = {"fid": fid_lib.frechet_distance(mu, sigma, *reference)}
  if inception_score and logits is not None:
    results["inception_score"], results["inception_score_std"] = fid_lib.inception_score(logits)
  if real_features is not None:
    from sida_jax.metrics import precision_recall  # pylint: disable=import-outside-toplevel
    results["precision"], results["recall"] = precision_recall.precision_recall(
        real_features, feats)
  return results
