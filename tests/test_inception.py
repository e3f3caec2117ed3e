"""Tests for sida_jax.metrics.inception: TF1 resize, architecture, strict weight loading, torch parity."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax.metrics import inception

# torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with the FID
# graph's 1008 classes instead of 1000 (+8 × 2049) that is the count below.
FID_INCEPTION_NUM_PARAMS = 27_161_264 - 3_326_696 + 8 * 2049


def _abstract_variables():
  return jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), jnp.zeros([1, 8, 8, 3]))


def test_resize_like_tf1_matches_tensorflow():
  tf = pytest.importorskip("tensorflow")
  images = np.random.default_rng(0).integers(0, 256, size=[2, 32, 45, 3]).astype(np.uint8)
  expected = tf.compat.v1.image.resize_bilinear(images, [299, 299], align_corners=False,
                                                half_pixel_centers=False).numpy()
  np.testing.assert_allclose(np.asarray(inception.resize_like_tf1(jnp.asarray(images))), expected,
                             rtol=1e-5, atol=1e-3)


def test_architecture_shapes_and_names():
  variables = _abstract_variables()
  params = flax.traverse_util.flatten_dict(variables["params"], sep=".")
  buffers = flax.traverse_util.flatten_dict(variables["buffers"], sep=".")
  assert sum(np.prod(p.shape) for p in params.values()) == FID_INCEPTION_NUM_PARAMS
  assert params["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  assert params["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  assert params["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
  assert params["fc.weight"].shape == (1008, 2048)
  bn_layers = [n[:-len(".weight")] for n in params if n.endswith(".bn.weight")]
  assert len(bn_layers) == 94
  assert set(buffers) == {f"{n}.{s}" for n in bn_layers for s in ("running_mean", "running_var")}
  gray = jnp.zeros([3, 32, 32, 1], jnp.uint8)
  features, logits = jax.eval_shape(inception.InceptionV3().apply, variables, gray)
  assert features.shape == (3, 2048) and logits.shape == (3, 1008)
  assert features.dtype == logits.dtype == jnp.float32


def test_state_dict_checks_are_strict():
  shapes = {name: leaf.shape for col in _abstract_variables().values()
            for name, leaf in flax.traverse_util.flatten_dict(col, sep=".").items()}
  state = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
  variables = inception.variables_from_state_dict(state)
  assert set(variables) == {"params", "buffers"}
  with pytest.raises(ValueError, match="missing \\['fc.bias'\\]"):
    inception.variables_from_state_dict({k: v for k, v in state.items() if k != "fc.bias"})
  with pytest.raises(ValueError, match="unexpected \\['AuxLogits.fc.weight'\\]"):
    inception.variables_from_state_dict({**state, "AuxLogits.fc.weight": np.zeros([1])})
  with pytest.raises(ValueError, match="'fc.bias' has shape \\(1000,\\)"):
    inception.variables_from_state_dict({**state, "fc.bias": np.zeros([1000])})
  with pytest.raises(ValueError, match="unknown file type"):
    inception.load_inception_variables("weights.bin")


def _torch_fid_inception(torch):
  """pytorch-fid's FID Inception body (torchvision names), written out in plain torch."""
  nn, F = torch.nn, torch.nn.functional

  class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
      self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

  class A(nn.Module):
    def __init__(self, c, pool):
      super().__init__()
      self.branch1x1 = BasicConv2d(c, 64, kernel_size=1)
      self.branch5x5_1 = BasicConv2d(c, 48, kernel_size=1)
      self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
      self.branch3x3dbl_1 = BasicConv2d(c, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
      self.branch_pool = BasicConv2d(c, pool, kernel_size=1)

    def forward(self, x):
      return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        self.branch_pool(avg(x))], 1)

  class B(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.branch3x3 = BasicConv2d(c, 384, kernel_size=3, stride=2)
      self.branch3x3dbl_1 = BasicConv2d(c, 64, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
      self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
      return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                        F.max_pool2d(x, 3, 2)], 1)

  class C(nn.Module):
    def __init__(self, c, c7):
      super().__init__()
      row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
      self.branch1x1 = BasicConv2d(c, 192, kernel_size=1)
      self.branch7x7_1 = BasicConv2d(c, c7, kernel_size=1)
      self.branch7x7_2 = BasicConv2d(c7, c7, **row)
      self.branch7x7_3 = BasicConv2d(c7, 192, **col)
      self.branch7x7dbl_1 = BasicConv2d(c, c7, kernel_size=1)
      self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
      self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
      self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
      self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
      self.branch_pool = BasicConv2d(c, 192, kernel_size=1)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      d = x
      for i in range(1, 6):
        d = getattr(self, f"branch7x7dbl_{i}")(d)
      return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg(x))], 1)

  class D(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.branch3x3_1 = BasicConv2d(c, 192, kernel_size=1)
      self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
      self.branch7x7x3_1 = BasicConv2d(c, 192, kernel_size=1)
      self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
      self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
      self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
      b7 = x
      for i in range(1, 5):
        b7 = getattr(self, f"branch7x7x3_{i}")(b7)
      return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

  class E(nn.Module):
    def __init__(self, c, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = BasicConv2d(c, 320, kernel_size=1)
      self.branch3x3_1 = BasicConv2d(c, 384, kernel_size=1)
      self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = BasicConv2d(c, 448, kernel_size=1)
      self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
      self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
      self.branch_pool = BasicConv2d(c, 192, kernel_size=1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg(x)
      return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
      self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
      self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
      self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
      self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
      self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
      self.Mixed_7a = D(768)
      self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
      self.fc = nn.Linear(2048, 1008)

    def forward(self, images_uint8):
      # NVIDIA detector's input handling: TF1 resize as a shifted affine grid, then (x - 128) / 128.
      x = images_uint8.to(self.fc.weight.dtype)
      n, _, h, w = x.shape
      theta = torch.eye(2, 3, dtype=x.dtype)
      theta[0, 2] += 1 / w - 1 / 299
      theta[1, 2] += 1 / h - 1 / 299
      grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, 3, 299, 299], align_corners=False)
      x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
      x = (x - 128) / 128
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
      x = F.max_pool2d(x, 3, 2)
      for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, f"Mixed_{name}")(x)
      features = x.mean((2, 3))
      return features, self.fc(features), features @ self.fc.weight.T

  return Net()


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
  """(folder with .pth and .npz state dicts, uint8 NHWC images, float64 torch outputs)."""
  torch = pytest.importorskip("torch", reason="torch not installed: parity vs PyTorch not checked")
  torch.manual_seed(0)
  net = _torch_fid_inception(torch)
  assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_NUM_PARAMS
  images = torch.randint(0, 256, [2, 3, 37, 50], dtype=torch.uint8)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.momentum = 1.0  # the calibration pass below sets the running stats to batch stats
    net.train()
    net(images)  # keeps activations O(1) through the random network
    net.eval()
    # float32-representable weights, compared in float64: a random 94-layer net amplifies float32
    # rounding to ~1e-3, which would hide small porting errors; in float64 a correct port agrees to 1e-12.
    net.float()
    folder = tmp_path_factory.mktemp("inception")
    torch.save(net.state_dict(), folder / "inception.pth")
    np.savez(folder / "inception.npz",
             **{k: v.numpy() for k, v in net.state_dict().items() if "num_batches" not in k})
    outputs = [t.numpy() for t in net.double()(images)]
  return folder, images.permute(0, 2, 3, 1).numpy(), outputs


def test_parity_with_torch(torch_reference):
  folder, images, (features, logits, logits_no_bias) = torch_reference
  variables = inception.load_inception_variables(folder / "inception.npz")
  with jax.enable_x64(True):
    model = inception.InceptionV3(dtype=jnp.float64)
    variables64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)
    got_features, got_logits = model.apply(variables64, images, use_output_bias=True)
    _, got_no_bias = model.apply(variables64, images)
  np.testing.assert_allclose(got_features, features, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(got_no_bias, logits_no_bias, rtol=1e-9, atol=1e-9)
  # The float32 production path, to float32-through-94-layers accuracy.
  features32, logits32 = inception.make_inception_fn(variables)(images)
  assert features32.dtype == jnp.float32
  np.testing.assert_allclose(features32, features, atol=1e-2 * np.abs(features).max())
  np.testing.assert_allclose(logits32, logits_no_bias, atol=1e-2 * np.abs(logits_no_bias).max())


def test_pth_and_npz_load_identically(torch_reference):
  pytest.importorskip("sida_jax.formats.torch_files")
  folder, _, _ = torch_reference
  from_pth = inception.load_inception_variables(folder / "inception.pth")
  from_npz = inception.load_inception_variables(folder / "inception.npz")
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_npz)
