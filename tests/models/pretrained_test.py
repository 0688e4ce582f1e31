"""model.init_from: torchvision ResNet-18 weights load into the Flax encoder.

A ResNet-18 state_dict with random weights, in torchvision's layout, is saved
as .npz and .safetensors (and .pth where torch is installed); the encoder's
backbone features must equal those of an independent NumPy forward pass of
torchvision's ResNet-18 (eval-mode BatchNorm, torch's symmetric padding) to
1e-4 -- and, where torchvision is installed, those of torchvision itself. The
input is 33x33: every stride-2 layer then sees an odd size, where XLA's 'SAME'
padding and torch's agree (see slamjax/models/pretrained.py); on even sizes the
features are those of 'SAME' padding (checked too).
"""

import functools
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slamjax.config import base
from slamjax.models import pretrained
from slamjax.models import resnet

SIZE = 33  # odd at every stride-2 layer: 33 -> 17 -> 9 -> 5 -> 3


# --------------------------------------------------------------------------
# An independent reference: torchvision's ResNet-18 forward in NumPy (NCHW).


def _pads(size, k, s, padding):
  if padding == "torch":
    return (k - 1) // 2, (k - 1) // 2
  out = -(-size // s)  # XLA 'SAME'
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def _conv(x, w, stride, padding):
  k = w.shape[-1]
  ph, pw = _pads(x.shape[2], k, stride, padding), _pads(x.shape[3], k, stride, padding)
  xp = np.pad(x, ((0, 0), (0, 0), ph, pw))
  win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
  return np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64), optimize=True)


def _bn(x, sd, name, eps=1e-5):
  g, b, m, v = (sd[f"{name}.{s}"].astype(np.float64)[None, :, None, None]
                for s in ("weight", "bias", "running_mean", "running_var"))
  return (x - m) / np.sqrt(v + eps) * g + b


def _maxpool(x, padding):
  ph, pw = _pads(x.shape[2], 3, 2, padding), _pads(x.shape[3], 3, 2, padding)
  xp = np.pad(x, ((0, 0), (0, 0), ph, pw), constant_values=-np.inf)
  return np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-1, -2))


def reference_features(sd, x_nhwc, padding="torch"):
  """torchvision.models.resnet18(...).eval() up to the pooled 8*width features."""
  relu = lambda a: np.maximum(a, 0)
  x = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
  x = relu(_bn(_conv(x, sd["conv1.weight"], 2, padding), sd, "bn1"))
  x = _maxpool(x, padding)
  for s in range(1, 5):
    for b in range(2):
      p = f"layer{s}.{b}"
      stride = 2 if s > 1 and b == 0 else 1
      y = relu(_bn(_conv(x, sd[p + ".conv1.weight"], stride, padding), sd, p + ".bn1"))
      y = _bn(_conv(y, sd[p + ".conv2.weight"], 1, padding), sd, p + ".bn2")
      if p + ".downsample.0.weight" in sd:
        x = _bn(_conv(x, sd[p + ".downsample.0.weight"], stride, padding), sd, p + ".downsample.1")
      x = relu(x + y)
  return x.mean(axis=(2, 3))


# --------------------------------------------------------------------------
# Helpers.


def save_safetensors(path, tensors):
  """A .safetensors file, written by hand (the format: u64 header size, JSON header, buffers)."""
  names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for name, a in tensors.items():
    a = np.ascontiguousarray(a)
    dtype = "BF16" if a.dtype == np.uint16 else names[a.dtype]  # uint16 here holds bfloat16 bits
    header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    blobs.append(a.tobytes()); offset += a.nbytes
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _x(n=2, size=SIZE, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@functools.cache
def _encoder(width, impl):
  model = resnet.Encoder(width=width, proj_dims=(8,), impl=impl)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, SIZE, SIZE, 3)), train=False))(jax.random.key(0))
  features = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  return variables, features


def _cfg(path, width):
  cfg = base.get_config()
  cfg.model.width = width
  cfg.model.init_from = str(path)
  return cfg


def _assert_close(got, want, tol=1e-4):
  err = np.max(np.abs(np.asarray(got, np.float64) - want))
  assert err < tol * max(1.0, np.max(np.abs(want))), (err, np.max(np.abs(want)))


# --------------------------------------------------------------------------
# Features equal torchvision's.


@pytest.mark.parametrize("width,impl,fmt", [(8, "native", "npz"), (8, "cpu", "safetensors"),
                                            (64, "auto", "npz"), (64, "auto", "safetensors")])
def test_features_match_numpy_torchvision_reference(tmp_path, width, impl, fmt):
  sd = pretrained.random_state_dict(width, seed=width)
  path = tmp_path / f"resnet18.{fmt}"
  np.savez(path, **sd) if fmt == "npz" else save_safetensors(path, sd)
  variables, features = _encoder(width, impl)
  loaded = pretrained.load_variables(str(path), variables, width)
  x = _x()
  want = reference_features(sd, x)
  assert want.shape == (2, 8 * width) and np.std(want) > 0.1
  _assert_close(features(loaded, x), want)
  # The projection head is not touched.
  for a, b in zip(jax.tree.leaves(loaded["params"]["head"]), jax.tree.leaves(variables["params"]["head"])):
    np.testing.assert_array_equal(a, b)


def test_even_sizes_pad_as_xla_same(tmp_path):
  """On even sizes the encoder pads as XLA's 'SAME', not as torch: the one difference."""
  sd = pretrained.random_state_dict(8, seed=3)
  np.savez(tmp_path / "r.npz", **sd)
  variables, features = _encoder(8, "native")
  got = features(pretrained.load_variables(str(tmp_path / "r.npz"), variables), _x(size=32))
  _assert_close(got, reference_features(sd, _x(size=32), padding="same"))
  assert np.max(np.abs(got - reference_features(sd, _x(size=32)))) > 1e-2


# --------------------------------------------------------------------------
# File formats and checkpoint wrappers.


def test_safetensors_dtypes_and_metadata(tmp_path):
  sd = {"conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
        "bn1.weight": np.array([1.5, -2.25], np.float16),
        "bn1.bias": (np.array([0.5, -3.0], np.float32).view(np.uint32) >> 16).astype(np.uint16),  # bf16
        "bn1.num_batches_tracked": np.array(7, np.int64)}
  save_safetensors(tmp_path / "t.safetensors", sd)
  got = pretrained.load_state_dict(str(tmp_path / "t.safetensors"))
  assert sorted(got) == ["bn1.bias", "bn1.weight", "conv1.weight"]
  np.testing.assert_array_equal(got["conv1.weight"], sd["conv1.weight"])
  np.testing.assert_array_equal(got["bn1.weight"], [1.5, -2.25])
  np.testing.assert_array_equal(got["bn1.bias"], [0.5, -3.0])
  assert all(a.dtype == np.float32 for a in got.values())


def test_safetensors_agrees_with_the_safetensors_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  sd = pretrained.random_state_dict(4)
  st.save_file({k: v for k, v in sd.items() if v.dtype == np.float32}, str(tmp_path / "a.safetensors"))
  got = pretrained.load_state_dict(str(tmp_path / "a.safetensors"))
  save_safetensors(tmp_path / "b.safetensors", sd)
  theirs = st.load_file(str(tmp_path / "b.safetensors"))
  for k, v in got.items():
    np.testing.assert_array_equal(v, sd[k])
    np.testing.assert_array_equal(theirs[k], sd[k])


def test_prefixes_are_stripped(tmp_path):
  sd = pretrained.random_state_dict(4)
  np.savez(tmp_path / "m.npz", **{"module.backbone." + k: v for k, v in sd.items()}, **{"module.head.w": np.ones(3)})
  got = pretrained.load_state_dict(str(tmp_path / "m.npz"))
  assert sorted(got) == sorted(k for k in sd if not k.endswith("num_batches_tracked"))
  assert pretrained.check(_cfg(tmp_path / "m.npz", 4))


def test_torch_pth_and_checkpoint_dicts(tmp_path):
  torch = pytest.importorskip("torch")
  sd = pretrained.random_state_dict(4)
  tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save(tsd, tmp_path / "plain.pth")
  torch.save({"epoch": 3, "state_dict": {"module." + k: v.half() for k, v in tsd.items()}}, tmp_path / "wrapped.pt")
  plain = pretrained.load_state_dict(str(tmp_path / "plain.pth"))
  wrapped = pretrained.load_state_dict(str(tmp_path / "wrapped.pt"))
  assert sorted(plain) == sorted(wrapped) == sorted(k for k in sd if not k.endswith("num_batches_tracked"))
  for k, v in plain.items():
    np.testing.assert_array_equal(v, sd[k])
    np.testing.assert_allclose(wrapped[k], sd[k], rtol=1e-3, atol=1e-3)
  assert len(pretrained.check(_cfg(tmp_path / "wrapped.pt", 4))) == 100


def _torchvision():
  torch = pytest.importorskip("torch")
  try:
    import torchvision
  except Exception as e:  # ImportError, or a torchvision built for another torch
    pytest.skip(f"torchvision unusable: {type(e).__name__}: {e}")
  return torch, torchvision


def test_matches_torchvision_resnet18(tmp_path):
  torch, torchvision = _torchvision()
  torch.manual_seed(0)
  net = torchvision.models.resnet18(weights=None)
  with torch.no_grad():  # random BN statistics and affine parameters, so all of them matter
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.0); m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 2.0)
  net.eval()
  torch.save(net.state_dict(), tmp_path / "resnet18.pth")
  net.fc = torch.nn.Identity()
  x = _x()
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  variables, features = _encoder(64, "auto")
  loaded = pretrained.load_variables(str(tmp_path / "resnet18.pth"), variables, 64)
  _assert_close(features(loaded, x), want)


# --------------------------------------------------------------------------
# Bad input: one line naming the file and the first tensor that does not fit.


def _error(cfg) -> str:
  with pytest.raises(pretrained.InitFromError) as e:
    pretrained.check(cfg)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"model.init_from={cfg.model.init_from}: "), msg
  return msg


def resnet50_state_dict(width=64):
  """Zeros shaped as torchvision's ResNet-50 (bottleneck blocks)."""
  sd, cin = {"conv1.weight": np.zeros((width, 3, 7, 7), np.float32)}, width
  bn = lambda n, c: sd.update({f"{n}.{s}": np.ones(c, np.float32) for s in ("weight", "bias", "running_mean", "running_var")})
  bn("bn1", width)
  for s, n in enumerate((3, 4, 6, 3)):
    mid = width * 2**s
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      for i, (cout, cin_, k) in enumerate(((mid, cin, 1), (mid, mid, 3), (4 * mid, mid, 1)), 1):
        sd[f"{p}.conv{i}.weight"] = np.zeros((cout, cin_, k, k), np.float32); bn(f"{p}.bn{i}", cout)
      if b == 0:
        sd[f"{p}.downsample.0.weight"] = np.zeros((4 * mid, cin, 1, 1), np.float32); bn(f"{p}.downsample.1", 4 * mid)
      cin = 4 * mid
  return sd


def test_missing_file(tmp_path):
  assert _error(_cfg(tmp_path / "nope.pth", 8)).endswith(": no such file")


@pytest.mark.parametrize("name,expect", [
    ("junk.pth", "not a PyTorch checkpoint"),
    ("junk.pt", "not a PyTorch checkpoint"),
    ("junk.npz", "not a .npz archive (not a zip file)"),
    ("junk.safetensors", "not a .safetensors file"),
    ("junk.ckpt", "unknown file type '.ckpt'"),
])
def test_not_a_checkpoint(tmp_path, name, expect):
  (tmp_path / name).write_bytes(b"This is not a checkpoint. " + bytes(range(256)) * 4)
  assert expect in _error(_cfg(tmp_path / name, 8))


def test_truncated_npz_and_single_npy(tmp_path):
  np.savez(tmp_path / "full.npz", **pretrained.random_state_dict(4))
  data = (tmp_path / "full.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
  assert "not a readable .npz archive (BadZipFile" in _error(_cfg(tmp_path / "cut.npz", 4))
  with open(tmp_path / "one.npz", "wb") as f:
    np.save(f, np.zeros(3, np.float32))
  assert "a single .npy array" in _error(_cfg(tmp_path / "one.npz", 4))


def test_zip_that_torch_did_not_write(tmp_path):
  np.savez(tmp_path / "w.npz", **pretrained.random_state_dict(4))
  os.rename(tmp_path / "w.npz", tmp_path / "w.pth")
  assert "not one written by torch.save" in _error(_cfg(tmp_path / "w.pth", 4))


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  import zipfile
  with zipfile.ZipFile(tmp_path / "r.pth", "w") as z:  # the layout of torch.save's archive
    z.writestr("r/data.pkl", b"\x80\x02}q\x00.")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  msg = _error(_cfg(tmp_path / "r.pth", 8))
  assert "needs PyTorch: pip install torch" in msg and "np.savez(" in msg


def test_resnet50_names_first_mismatch(tmp_path):
  np.savez(tmp_path / "r50.npz", **resnet50_state_dict())
  msg = _error(_cfg(tmp_path / "r50.npz", 64))
  assert ("tensor layer1.0.conv1.weight has shape (64, 64, 1, 1) in the file, "
          "but the encoder (model.width=64) expects (64, 64, 3, 3)") in msg, msg


def test_wrong_width_says_which(tmp_path):
  np.savez(tmp_path / "w16.npz", **pretrained.random_state_dict(16))
  msg = _error(_cfg(tmp_path / "w16.npz", 8))
  assert "tensor conv1.weight has shape (16, 3, 7, 7) in the file, but the encoder (model.width=8) expects (8, 3, 7, 7)" in msg
  assert msg.endswith("set model.width=16")


def test_cifar_stem_is_named(tmp_path):
  sd = pretrained.random_state_dict(8)
  sd["conv1.weight"] = np.zeros((8, 3, 3, 3), np.float32)
  save_safetensors(tmp_path / "cifar.safetensors", sd)
  msg = _error(_cfg(tmp_path / "cifar.safetensors", 8))
  assert "tensor conv1.weight has shape (8, 3, 3, 3) in the file, but the encoder (model.width=8) expects (8, 3, 7, 7)" in msg
  assert "CIFAR-style stem" in msg


def test_missing_extra_and_nonfinite_tensors(tmp_path):
  sd = pretrained.random_state_dict(4)
  del sd["layer3.1.bn2.running_var"]
  np.savez(tmp_path / "a.npz", **sd)
  assert "no tensor layer3.1.bn2.running_var (shape (16,))" in _error(_cfg(tmp_path / "a.npz", 4))
  sd = pretrained.random_state_dict(4)
  sd["layer4.2.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)  # a third block: ResNet-34
  np.savez(tmp_path / "b.npz", **sd)
  assert "tensor layer4.2.conv1.weight (shape (32, 32, 3, 3)) has no place" in _error(_cfg(tmp_path / "b.npz", 4))
  sd = pretrained.random_state_dict(4)
  sd["layer2.0.conv2.weight"][0, 0, 0, 0] = np.nan
  np.savez(tmp_path / "c.npz", **sd)
  assert "tensor layer2.0.conv2.weight holds non-finite values" in _error(_cfg(tmp_path / "c.npz", 4))


def test_two_resnets_in_one_file(tmp_path):
  sd = pretrained.random_state_dict(4)
  np.savez(tmp_path / "moco.npz", **{f"encoder_{q}.{k}": v for q in "qk" for k, v in sd.items()})
  assert "several ResNets (name prefixes ['encoder_k.', 'encoder_q.'])" in _error(_cfg(tmp_path / "moco.npz", 4))


def test_empty_init_from_is_a_no_op():
  assert pretrained.check(base.get_config()) == {}


# --------------------------------------------------------------------------
# Pretraining starts from the loaded weights.


def test_init_state_loads_backbone_and_keeps_head(tmp_path):
  from slamjax import pretrain, sharding
  sd = pretrained.random_state_dict(8, seed=5)
  np.savez(tmp_path / "r.npz", **sd)
  cfg = base.get_config()
  cfg.model.width, cfg.model.proj_dims = 8, (16, 8)
  model, tx, _ = pretrain.build(cfg, steps_per_epoch=1)
  mesh = sharding.make_mesh(-1)
  fresh = jax.device_get(pretrain.init_state(cfg, model, tx, mesh))
  cfg.model.init_from = str(tmp_path / "r.npz")
  state = pretrain.init_state(cfg, model, tx, mesh)
  params, stats = jax.device_get((state.params, state.batch_stats))
  bb = params["backbone"]
  np.testing.assert_array_equal(bb["stem_conv"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bb["stage2_block1"]["proj_conv"]["kernel"],
                                sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bb["stage4_block2"]["bn2"]["scale"], sd["layer4.1.bn2.weight"])
  np.testing.assert_array_equal(stats["backbone"]["stage3_block1"]["proj_bn"]["var"],
                                sd["layer3.0.downsample.1.running_var"])
  for name in ("head", "sim_head"):  # the projection heads keep their random init
    for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(fresh.params[name])):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.opt_state)), jax.tree.leaves(jax.device_get(tx.init(params)))):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  assert all(len(a.sharding.device_set) == mesh.size for a in jax.tree.leaves(state))
