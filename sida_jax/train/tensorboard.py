"""TensorBoard event files (scalars and images) without TensorFlow.

The training loops only write scalars and sample grids; importing TensorFlow for that (as clu's writers do)
costs ~13 s and ~800 MB per run. Events are the TFRecord-framed `Event` protos TensorBoard reads, written
with the `tensorboard` package's protos and record framing.
"""
from __future__ import annotations

import io
import os
import socket
import time

import numpy as np
import PIL.Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


class SummaryWriter:
  """Appends events to `logdir/events.out.tfevents.<time>.<host>.<pid>`; disabled: writes nothing (every
  process but the first)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._records = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
      self._records = RecordWriter(open(os.path.join(logdir, name), "ab"))
      self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._records is None:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def write_images(self, step: int, images: dict) -> None:
    """images: name -> uint8 [H, W, C] or [1, H, W, C] (C = 1 or 3), stored as PNG."""
    if self._records is None:
      return
    values = []
    for tag, image in images.items():
      image = np.asarray(image)
      image = image[0] if image.ndim == 4 else image
      png = io.BytesIO()
      PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
          encoded_image_string=png.getvalue())))
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    if self._records is not None:
      self._records.flush()

  def close(self) -> None:
    if self._records is not None:
      self._records.close()
      self._records = None
