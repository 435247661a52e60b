"""Weight import parity against independent PyTorch definitions, the conversion command, and the CIFAR-10 reader.

The PyTorch models below are written here from the architecture descriptions (not taken from the Flax code):
a CIFAR ResNet with option-A shortcuts and a torchvision-layout ResNet-50.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

from models import checkpoint, cifar10, import_torch  # noqa: E402

SHARED = Path(os.environ.get("HSIC_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = SHARED / "weights"
CIFAR = SHARED / "data" / "cifar10-subset" / "cifar-10-batches-bin"

torch.set_num_threads(2)


def need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"shared data not found at {path} (set HSIC_JAX_SHARED to the shared folder)")
  return path


# ------------------------------------------------------------------------------------------------------------------
# Independent PyTorch references.


class TorchBasicBlock(tnn.Module):
  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.stride, self.extra = stride, planes - cin

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    short = x[:, :, ::2, ::2] if self.stride == 2 else x
    if self.extra:
      short = F.pad(short, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return F.relu(out + short)


class TorchResNetCifar(tnn.Module):
  def __init__(self, depth: int, classes: int = 10):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(16)
    cin = 16
    for s, planes in enumerate((16, 32, 64), start=1):
      blocks = []
      for j in range(n):
        blocks.append(TorchBasicBlock(cin, planes, 2 if (s > 1 and j == 0) else 1))
        cin = planes
      setattr(self, f"layer{s}", tnn.Sequential(*blocks))
    self.linear = tnn.Linear(64, classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(x.mean(dim=(2, 3)))


class TorchBottleneck(tnn.Module):
  def __init__(self, cin: int, width: int, stride: int):
    super().__init__()
    out = width * 4
    self.conv1 = tnn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.conv2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(width)
    self.conv3 = tnn.Conv2d(width, out, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or cin != out:
      self.downsample = tnn.Sequential(tnn.Conv2d(cin, out, 1, stride, bias=False), tnn.BatchNorm2d(out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet50(tnn.Module):
  def __init__(self, classes: int = 1000):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(64)
    cin = 64
    for s, (n, width, stride) in enumerate(((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)), start=1):
      blocks = []
      for j in range(n):
        blocks.append(TorchBottleneck(cin, width, stride if j == 0 else 1))
        cin = width * 4
      setattr(self, f"layer{s}", tnn.Sequential(*blocks))
    self.fc = tnn.Linear(2048, classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(x.mean(dim=(2, 3)))


def randomize_bn(model: tnn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      c = m.num_features
      m.weight.data = torch.rand(c, generator=g) + 0.5
      m.bias.data = torch.randn(c, generator=g) * 0.1
      m.running_mean.data = torch.randn(c, generator=g) * 0.1
      m.running_var.data = torch.rand(c, generator=g) + 0.5


def torch_logits(model: tnn.Module, x_nhwc: np.ndarray) -> np.ndarray:
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


_flax_forward = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x), static_argnums=0)


def flax_logits(model: nnx.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
  graphdef, state = nnx.split(model)
  outs = [np.asarray(_flax_forward(graphdef, state, jnp.asarray(x[i:i + batch]))) for i in range(0, len(x), batch)]
  return np.concatenate(outs)


@pytest.fixture(scope="module")
def cifar() -> tuple[np.ndarray, np.ndarray]:
  images, labels = cifar10.load_split(need(CIFAR), "train")
  return cifar10.normalize(images), labels


@pytest.fixture(scope="module")
def resnet20_npz() -> dict[str, np.ndarray]:
  return import_torch.load_npz(need(WEIGHTS / "resnet20_cifar10.npz"))


@pytest.fixture(scope="module")
def resnet56_npz() -> dict[str, np.ndarray]:
  return import_torch.load_npz(need(WEIGHTS / "resnet56_cifar10.npz"))


# ------------------------------------------------------------------------------------------------------------------
# Parity with PyTorch.


@pytest.mark.parametrize("depth, n_images", [(20, 4660), (56, 500)])
def test_cifar_resnet_matches_torch_and_classifies(depth: int, n_images: int, cifar, request):
  """Logits equal an independent PyTorch model's; accuracy on the shared training images is that of a model trained
  on them (the pretrained ResNets saw these images: ~100% agreement expected, > 97% required)."""
  sd = request.getfixturevalue(f"resnet{depth}_npz")
  reference = TorchResNetCifar(depth)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model = import_torch.import_torch_state(f"resnet{depth}", sd)
  images, labels = cifar[0][:n_images], cifar[1][:n_images]
  got = flax_logits(model, images)
  want = torch_logits(reference, images[:64])
  np.testing.assert_allclose(got[:64], want, atol=1e-4, rtol=1e-4)
  assert np.array_equal(got[:64].argmax(1), want.argmax(1))
  acc = float(np.mean(got.argmax(1) == labels))
  print(f"resnet{depth} accuracy on {n_images} shared CIFAR-10 training images: {acc:.4f}")
  assert acc > 0.97


def test_resnet50_logits_match_torch():
  torch.manual_seed(0)
  reference = TorchResNet50(classes=1000)
  randomize_bn(reference, 1)
  sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  assert any(k.endswith("num_batches_tracked") for k in sd)  # ignored by the importer
  model = import_torch.import_torch_state("resnet50", sd)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  want = torch_logits(reference, x)
  got = flax_logits(model, x)
  scale = np.max(np.abs(want))
  assert np.max(np.abs(got - want)) <= 1e-4 * scale, (np.max(np.abs(got - want)), scale)


@pytest.mark.slow
def test_imported_resnet56_accuracy_all(cifar, resnet56_npz, request):
  if "slow" not in (request.config.getoption("markexpr") or ""):
    pytest.skip("slow (~25 s on 2 CPU cores): select with -m slow")
  images, labels = cifar
  model = import_torch.import_torch_state("resnet56", resnet56_npz)
  acc = float(np.mean(flax_logits(model, images).argmax(1) == labels))
  print(f"resnet56 accuracy on the {len(labels)} shared CIFAR-10 training images: {acc:.4f}")
  assert acc > 0.97


def test_pruned_torch_state_imports_with_inferred_widths():
  reference = TorchResNetCifar(20)
  sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  # Thin block 1's middle width to 5 channels, as a pruned PyTorch checkpoint would be.
  sd["layer1.1.conv1.weight"] = sd["layer1.1.conv1.weight"][:5]
  for k in ("weight", "bias", "running_mean", "running_var"):
    sd[f"layer1.1.bn1.{k}"] = sd[f"layer1.1.bn1.{k}"][:5]
  sd["layer1.1.conv2.weight"] = sd["layer1.1.conv2.weight"][:, :5]
  model = import_torch.import_torch_state("resnet20", sd)
  assert model.widths[3] == 5 and model.stage1.block1.conv1.kernel.shape == (3, 3, 16, 5)


# ------------------------------------------------------------------------------------------------------------------
# Errors.


def test_import_errors(resnet20_npz):
  sd = dict(resnet20_npz)
  with pytest.raises(ValueError, match="expected one of"):
    import_torch.import_torch_state("vgg16", sd)
  missing = {k: v for k, v in sd.items() if k != "layer2.1.bn1.running_var"}
  with pytest.raises(ValueError, match=r"missing keys \['layer2.1.bn1.running_var'\]"):
    import_torch.import_torch_state("resnet20", missing)
  with pytest.raises(ValueError, match="missing key 'linear.weight'"):
    import_torch.import_torch_state("resnet20", {k: v for k, v in sd.items() if k != "linear.weight"})
  extra = dict(sd, **{"layer4.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys \['layer4.0.conv1.weight'\]"):
    import_torch.import_torch_state("resnet20", extra)
  bad = dict(sd)
  bad["layer1.0.conv2.weight"] = np.zeros((16, 15, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'layer1.0.conv2.weight'\] has shape \(16, 15, 3, 3\), expected "
                                       r"\(16, 16, 3, 3\)"):
    import_torch.import_torch_state("resnet20", bad)
  with pytest.raises(ValueError, match="resnet56"):
    import_torch.import_torch_state("resnet56", sd)


def test_torch_key_names():
  assert import_torch.torch_key("resnet56", ("stage2", "block3", "bn1", "mean")) == "layer2.3.bn1.running_mean"
  assert import_torch.torch_key("resnet56", ("stem", "conv", "kernel")) == "conv1.weight"
  assert import_torch.torch_key("resnet56", ("fc", "kernel")) == "linear.weight"
  assert import_torch.torch_key("resnet50", ("stage3", "block0", "downsample", "bn", "scale")) == \
      "layer3.0.downsample.1.weight"
  assert import_torch.torch_key("resnet50", ("fc", "bias")) == "fc.bias"


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints and CLI.


def test_checkpoint_round_trip_via_cli(tmp_path: Path, resnet20_npz, cifar):
  out = tmp_path / "r20"
  assert import_torch.main(["--model", "resnet20", "--weights", str(WEIGHTS / "resnet20_cifar10.npz"),
                            "--out", str(out)]) == 0
  loaded = checkpoint.load(out)
  direct = import_torch.import_torch_state("resnet20", resnet20_npz)
  assert loaded.widths == direct.widths and loaded.num_classes == 10
  a = jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(loaded)))
  b = jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(direct)))
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
  x = cifar[0][:8]
  np.testing.assert_array_equal(flax_logits(loaded, x), flax_logits(direct, x))
  with pytest.raises(FileNotFoundError):
    checkpoint.load(tmp_path / "nope")
  with pytest.raises(FileExistsError, match="--force"):
    checkpoint.save(loaded, out)
  assert checkpoint.save(loaded, out, force=True) == out.resolve()


def test_weights_that_are_not_an_npz_get_a_clear_error(tmp_path: Path, capsys):
  np.save(tmp_path / "one.npy", np.ones(3))
  (tmp_path / "notes.txt").write_text("not weights")
  (tmp_path / "cut.npz").write_bytes((WEIGHTS / "resnet20_cifar10.npz").read_bytes()[:5000]
                                     if (WEIGHTS / "resnet20_cifar10.npz").exists() else b"PK\x03\x04broken")
  np.savez(tmp_path / "objects.npz", conv=np.ones(3), meta=np.array([{"epoch": 3}], dtype=object))
  with zipfile.ZipFile(tmp_path / "garbled.npz", "w") as zf:
    zf.writestr("conv.npy", b"\x93NUMPY garbled header")
  cases = {tmp_path: "is not a file", tmp_path / "one.npy": "holds a single array",
           tmp_path / "notes.txt": "is not an .npz archive", tmp_path / "cut.npz": "is not an .npz archive",
           tmp_path / "objects.npz": "holds object (pickled) arrays", tmp_path / "garbled.npz": "is a damaged .npz",
           tmp_path / "nope.npz": "does not exist"}
  for path, msg in cases.items():
    with pytest.raises(SystemExit):
      import_torch.main(["--model", "resnet20", "--weights", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# CIFAR-10 reader.


def test_cifar_reader_layout(tmp_path: Path):
  """A synthetic file in the official layout decodes to the right pixels (channel planes, row-major)."""
  rng = np.random.default_rng(0)
  labels = np.array([3, 9], np.uint8)
  planes = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
  records = [np.concatenate([[labels[i]], planes[i].reshape(-1)]).astype(np.uint8) for i in range(2)]
  np.concatenate(records).tofile(tmp_path / "data_batch_1.bin")
  images, got_labels = cifar10.load_split(tmp_path, "train")
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  assert got_labels.tolist() == [3, 9]
  assert images[1, 5, 7, 2] == planes[1, 2, 5, 7]
  np.testing.assert_array_equal(images, planes.transpose(0, 2, 3, 1))
  (tmp_path / "data_batch_2.bin").write_bytes(b"\x00" * 100)
  with pytest.raises(ValueError, match="not a multiple"):
    cifar10.load_split(tmp_path, "train")
  with pytest.raises(FileNotFoundError, match="test"):
    cifar10.load_split(tmp_path, "test")
  with pytest.raises(ValueError, match="split"):
    cifar10.load_split(tmp_path, "val")


def test_cifar_reader_shared_folder():
  images, labels = cifar10.load_split(need(CIFAR), "train")
  assert images.shape == (4660, 32, 32, 3) and labels.shape == (4660,)
  counts = np.bincount(labels, minlength=10)
  assert counts.sum() == 4660 and counts.min() >= 5 * 77 and counts.max() <= 5 * 103
  assert cifar10.class_names(CIFAR)[0] == "airplane"
  # Byte-level check of the first record of data_batch_1.bin.
  raw = np.fromfile(CIFAR / "data_batch_1.bin", np.uint8, count=3073)
  assert labels[0] == raw[0] and images[0, 0, 1, 0] == raw[2] and images[0, 0, 0, 2] == raw[1 + 2048]
