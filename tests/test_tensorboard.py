"""tensorboard: event files that a TFRecord reader accepts (framing and CRC-32C checked here independently),
with the scalars and PNG images written, and no TensorFlow import."""
import io
import struct
import subprocess
import sys

import numpy as np
import PIL.Image
from tensorboard.compat.proto import event_pb2

from sida_jax.train import tensorboard


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  """TFRecord's masking: rotate right by 15 and add a constant."""
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path) -> list:
  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    header = data[at:at + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[at + 8:at + 12])[0] == _masked(_crc32c(header))
    payload = data[at + 12:at + 12 + length]
    assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == _masked(_crc32c(payload))
    events.append(event_pb2.Event.FromString(payload))
    at += 16 + length
  return events


def test_scalars_and_images_round_trip(tmp_path):
  writer = tensorboard.SummaryWriter(str(tmp_path))
  writer.write_scalars(3, {"loss": 0.25, "kimg": np.float32(1.5)})
  grid = np.random.default_rng(0).integers(0, 256, size=(1, 6, 10, 3), dtype=np.uint8)
  gray = np.random.default_rng(1).integers(0, 256, size=(4, 4, 1), dtype=np.uint8)
  writer.write_images(7, {"samples": grid, "gray": gray})
  writer.close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
  events = _read_events(path)
  assert events[0].file_version == "brain.Event:2"
  assert events[1].step == 3
  assert {v.tag: v.simple_value for v in events[1].summary.value} == {"loss": 0.25, "kimg": 1.5}
  assert events[2].step == 7
  images = {v.tag: v.image for v in events[2].summary.value}
  assert (images["samples"].height, images["samples"].width, images["samples"].colorspace) == (6, 10, 3)
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(images["samples"].encoded_image_string))),
                                grid[0])
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(images["gray"].encoded_image_string))),
                                gray[..., 0])


def test_a_disabled_writer_writes_nothing(tmp_path):
  writer = tensorboard.SummaryWriter(str(tmp_path / "w"), enabled=False)
  writer.write_scalars(1, {"a": 1.0})
  writer.flush()
  assert not (tmp_path / "w").exists()


def test_the_training_loop_does_not_import_tensorflow():
  code = "import sys; import sida_jax.train.loop, sida_jax.train.teacher; print('tensorflow' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
