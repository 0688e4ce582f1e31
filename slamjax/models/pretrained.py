r"""Initial encoder weights from a local torchvision ResNet-18 file (``model.init_from``).

``config.model.init_from`` names a local file holding a torchvision ResNet-18
``state_dict``: ``.pth``/``.pt`` (as written by ``torch.save``), ``.safetensors``
or ``.npz``. Its backbone tensors replace the encoder's backbone parameters
and BatchNorm statistics before training; the projection head(s) keep their
random initialisation, and ``fc.*`` (the ImageNet classifier) and
``*.num_batches_tracked`` are ignored. Nothing is downloaded.

Name mapping (torchvision -> ``slamjax.models.resnet``; conv kernels OIHW -> HWIO)::

  conv1.weight                       backbone/stem_conv/kernel
  bn1.{weight,bias}                  backbone/stem_bn/{scale,bias}            (params)
  bn1.{running_mean,running_var}     backbone/stem_bn/{mean,var}              (batch_stats)
  layer{s}.{b}.conv{k}.weight        backbone/stage{s}_block{b+1}/conv{k}/kernel
  layer{s}.{b}.bn{k}.*               backbone/stage{s}_block{b+1}/bn{k}/*
  layer{s}.{b}.downsample.0.weight   backbone/stage{s}_block{b+1}/proj_conv/kernel
  layer{s}.{b}.downsample.1.*        backbone/stage{s}_block{b+1}/proj_bn/*

Any ``model.width`` loads a file of the same width (torchvision's ResNet-18 is
width 64). BatchNorm is the same function (epsilon 1e-5; Flax's momentum 0.9
is torch's 0.1). The layers are torchvision's, but convolutions and the
max-pool pad as XLA's ``'SAME'``: on an even-sized input a stride-2 layer pads
(k-1)//2 before and one more after, where torch pads (k-1)//2 on both sides,
so on even sizes the sampling grid is shifted by one pixel. The features equal
torch's (to float32 rounding) when every stride-2 layer sees an odd size, i.e.
for input sizes 32*k + 1 (33, 65, 97, 129, ...); on other sizes the weights
are the same but the features are not torch's (random width-64 weights:
cosine similarity 0.98 at 32x32, 0.999 at 224x224).

ImageNet weights expect RGB in [0, 1] normalised by ImageNet's statistics:
``augment.mean=(0.485, 0.456, 0.406)``, ``augment.std=(0.229, 0.224, 0.225)``.

Checkpoints wrapped in a dict (``{"state_dict": ...}``, ``{"model": ...}``,
``{"model_state_dict": ...}``) and name prefixes such as ``module.``
(DataParallel) or ``backbone.`` are unwrapped when exactly one ResNet is found.

``.pth``/``.pt`` files need PyTorch (read with ``torch.load(...,
weights_only=True)``, torch's loader that runs no code from the file). Without
torch, convert them once, where torch is installed::

  import numpy as np, torch
  sd = torch.load("resnet18.pth", map_location="cpu", weights_only=True)
  np.savez("resnet18.npz", **{k: v.float().numpy() for k, v in sd.items() if v.is_floating_point()})

``.safetensors`` and ``.npz`` files are read with numpy alone.

Every problem raises :class:`InitFromError` (a ``ValueError``) with a one-line
message naming the file and, for a tensor that does not fit, its name and both
shapes. :func:`check` runs every check from the config alone (cheap: no data,
no compiled model), so a runner can fail before decoding any data.

Example:
  >>> import numpy as np, tempfile, os
  >>> from slamjax.config import base
  >>> cfg = base.get_config(); cfg.model.width = 4
  >>> sd = random_state_dict(4)
  >>> path = os.path.join(tempfile.mkdtemp(), "r18.npz"); np.savez(path, **sd)
  >>> cfg.model.init_from = path
  >>> len(check(cfg))  # the tensors that will be loaded
  100
  >>> cfg.model.width = 8
  >>> check(cfg)  # ... expects (8, 3, 7, 7); the file's ResNet has width 4: set model.width=4
  Traceback (most recent call last):
  ...
  slamjax.models.pretrained.InitFromError: model.init_from=...r18.npz: tensor conv1.weight has shape (4, 3, 7, 7) ...
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")
# Tensors of a torchvision ResNet-18 that the encoder has no use for.
_IGNORED = re.compile(r"^fc\.|(^|\.)num_batches_tracked$")
# Keys under which training checkpoints keep the model's state_dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Flax BatchNorm variable -> torch name, in torchvision's order.
_BN = (("params", "scale", "weight"), ("params", "bias", "bias"),
       ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var"))
_BLOCK_MODULES = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
                  "proj_conv": "downsample.0", "proj_bn": "downsample.1"}
_BLOCK = re.compile(r"^stage(\d+)_block(\d+)$")
_TORCH_CONVERT_HINT = (
    "where torch is installed: sd = torch.load(path, map_location='cpu', weights_only=True); "
    "np.savez('resnet18.npz', **{k: v.float().numpy() for k, v in sd.items() if v.is_floating_point()})")


class InitFromError(ValueError):
  """A ``model.init_from`` file that cannot initialise the encoder."""


def _fail(path, msg: str):
  raise InitFromError(f"model.init_from={path}: {msg}")


# --------------------------------------------------------------------------
# Reading files.


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a ``.pth``/``.pt``, ``.safetensors`` or ``.npz`` file, by name.

  Returns float32 arrays in torch's layout (conv weights OIHW) under
  torchvision's names: checkpoint wrappers and a single common prefix
  (``module.``, ``backbone.``, ...) are removed; integer tensors such as
  ``num_batches_tracked`` are dropped. Raises :class:`InitFromError` for a
  missing or unreadable file.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    _fail(path, "no such file")
  if not os.path.isfile(path):
    _fail(path, "not a file")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt"):
    tensors = _read_torch(path)
  elif suffix == ".safetensors":
    tensors = _read_safetensors(path)
  elif suffix == ".npz":
    tensors = _read_npz(path)
  else:
    _fail(path, f"unknown file type {suffix or '(no suffix)'!r}; valid: {list(SUFFIXES)}")
  tensors = {n: a for n, a in tensors.items() if not n.endswith("num_batches_tracked")}
  if not tensors:
    _fail(path, "holds no floating-point tensors")
  return _strip_prefix(path, tensors)


def _as_float32(path, name, a) -> np.ndarray | None:
  a = np.asarray(a)
  if a.dtype.kind in "iub":  # num_batches_tracked and other counters
    return None
  if a.dtype.kind != "f":
    _fail(path, f"tensor {name} has dtype {a.dtype}, not a floating-point type")
  return np.ascontiguousarray(a, dtype=np.float32)


def _read_npz(path) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    magic = f.read(6)
  if magic == b"\x93NUMPY":
    _fail(path, "a single .npy array, not a .npz archive of named tensors")
  if not magic.startswith(b"PK\x03\x04"):
    _fail(path, "not a .npz archive (not a zip file)")
  out = {}
  with open(path, "rb") as f:  # our handle: np.load leaks its own on a bad zip
    try:
      z = np.load(f, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError, ...
      _fail(path, f"not a readable .npz archive ({type(e).__name__}: {_first_line(e)})")
    if not isinstance(z, np.lib.npyio.NpzFile):
      _fail(path, "not a .npz archive of named tensors")
    with z:
      for name in z.files:
        try:
          a = z[name]
        except Exception as e:  # zipfile.BadZipFile, object arrays (pickles), ...
          _fail(path, f"cannot read tensor {name} ({type(e).__name__}: {_first_line(e)})")
        a = _as_float32(path, name, a)
        if a is not None:
          out[name] = a
  return out


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _read_safetensors(path) -> dict[str, np.ndarray]:
  """A .safetensors file: u64-LE header size, JSON header, raw little-endian buffers."""
  size = os.path.getsize(path)
  bad = lambda why: _fail(path, f"not a .safetensors file ({why})")
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      bad("shorter than its 8-byte header size")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 << 20:
      bad(f"header size {n} does not fit a file of {size} bytes")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      bad(f"header is not JSON: {_first_line(e)}")
    if not isinstance(header, dict):
      bad("header is not a JSON object")
    start = 8 + n
    out = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
      except (KeyError, TypeError, ValueError):
        bad(f"bad header entry for {name!r}")
      if dtype not in _SAFETENSORS_DTYPES:
        _fail(path, f"tensor {name} has dtype {dtype}, which slamjax cannot read")
      np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
      count = int(np.prod(shape, dtype=np.int64))
      if not 0 <= begin <= end or start + end > size or end - begin != count * np_dtype.itemsize:
        bad(f"data offsets of {name!r} do not fit its shape {shape} and dtype {dtype}")
      f.seek(start + begin)
      a = np.frombuffer(f.read(end - begin), dtype=np_dtype).reshape(shape)
      if dtype == "BF16":  # bfloat16 is the upper half of a float32
        a = (a.astype(np.uint32) << 16).view(np.float32)
      a = _as_float32(path, name, a)
      if a is not None:
        out[name] = a
  return out


def _read_torch(path) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    magic = f.read(4)
  # torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle.
  if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
    _fail(path, "not a PyTorch checkpoint (neither a zip archive nor a pickle)")
  if magic.startswith(b"PK\x03\x04"):
    try:
      with zipfile.ZipFile(path) as z:
        if not any(n.endswith("data.pkl") for n in z.namelist()):
          _fail(path, "a zip archive, but not one written by torch.save (no data.pkl)")
    except zipfile.BadZipFile as e:
      _fail(path, f"not a PyTorch checkpoint (bad zip archive: {_first_line(e)})")
  try:
    import torch
  except ImportError:
    _fail(path, "reading .pth/.pt files needs PyTorch: pip install torch, or convert the file to "
          f".npz once ({_TORCH_CONVERT_HINT})")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
    _fail(path, f"torch.load(weights_only=True) cannot read it ({type(e).__name__}: {_first_line(e)}); "
          "save the model's state_dict(), not the model object")
  obj = _unwrap(path, obj, lambda v: isinstance(v, torch.Tensor))
  out = {}
  for name, t in obj.items():
    if not isinstance(t, torch.Tensor):
      continue
    if t.is_floating_point():
      out[name] = _as_float32(path, name, t.detach().to("cpu", torch.float32).numpy())
  return out


def _unwrap(path, obj, is_tensor) -> Mapping[str, Any]:
  """The state_dict inside a training checkpoint ({'state_dict': ...}, ...)."""
  for _ in range(4):
    if not isinstance(obj, Mapping):
      _fail(path, f"holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    if any(is_tensor(v) for v in obj.values()):
      return obj
    inner = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if not inner:
      _fail(path, f"holds no tensors and none of the keys {list(_WRAPPER_KEYS)} "
            f"(keys: {_preview(list(obj))})")
    obj = obj[inner[0]]
  _fail(path, "checkpoint dicts nested too deeply")


def _strip_prefix(path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes the one prefix in front of the ResNet's names ('module.', 'backbone.', ...)."""
  if "conv1.weight" in tensors:
    return tensors
  prefixes = sorted(name[:-len("conv1.weight")] for name in tensors
                    if name.endswith(".conv1.weight") and name[:-len("conv1.weight")] + "layer1.0.conv1.weight" in tensors)
  if len(prefixes) > 1:
    _fail(path, f"holds several ResNets (name prefixes {prefixes}); save the one to load as its own file")
  if not prefixes:
    return tensors  # the missing conv1.weight is reported by the mapping
  p = prefixes[0]
  return {name[len(p):]: a for name, a in tensors.items() if name.startswith(p)}


def _first_line(e) -> str:
  lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # no terminal colours
  return lines[0][:200] if lines else ""


def _preview(names, n: int = 5) -> str:
  names = list(names)
  more = f", ... ({len(names)} in all)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


# --------------------------------------------------------------------------
# Mapping onto the Flax encoder.


def _expected(backbone_params, backbone_stats) -> list[tuple[str, str, tuple[str, ...], tuple[int, ...]]]:
  """(torch name, collection, path under 'backbone', torch-layout shape), in torchvision's order."""
  def conv(torch_name, tree_path):
    kh, kw, cin, cout = _leaf(backbone_params, tree_path + ("kernel",)).shape
    return [(torch_name + ".weight", "params", tree_path + ("kernel",), (cout, cin, kh, kw))]

  def bn(torch_name, tree_path):
    out = []
    for collection, flax_name, suffix in _BN:
      tree = backbone_params if collection == "params" else backbone_stats
      shape = tuple(_leaf(tree, tree_path + (flax_name,)).shape)
      out.append((f"{torch_name}.{suffix}", collection, tree_path + (flax_name,), shape))
    return out

  entries = conv("conv1", ("stem_conv",)) + bn("bn1", ("stem_bn",))
  blocks = []
  for name in backbone_params:
    m = _BLOCK.match(name)
    if m:
      blocks.append((int(m.group(1)), int(m.group(2)), name))
    elif name not in ("stem_conv", "stem_bn"):
      raise AssertionError(f"encoder module backbone/{name} has no torchvision counterpart")
  for stage, block, name in sorted(blocks):
    for sub in ("conv1", "bn1", "conv2", "bn2", "proj_conv", "proj_bn"):
      if sub not in backbone_params[name]:
        continue
      torch_name = f"layer{stage}.{block - 1}.{_BLOCK_MODULES[sub]}"
      entries += conv(torch_name, (name, sub)) if "conv" in sub else bn(torch_name, (name, sub))
  covered = {(c, p) for _, c, p, _ in entries}
  for collection, tree in (("params", backbone_params), ("batch_stats", backbone_stats)):
    for p in _paths(tree):
      if (collection, p) not in covered:
        raise AssertionError(f"encoder variable {collection}/backbone/{'/'.join(p)} has no torchvision counterpart")
  return entries


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def _set(tree, path, value):
  """A copy of nested dict ``tree`` with ``path`` set to ``value`` (copies only the spine)."""
  tree = dict(tree)
  tree[path[0]] = value if len(path) == 1 else _set(tree.get(path[0], {}), path[1:], value)
  return tree


def map_state_dict(path: str, tensors: Mapping[str, np.ndarray], variables, width: int | None = None):
  """Checks ``tensors`` against the encoder's ``variables`` and converts them.

  ``variables`` is the encoder's ``{'params': ..., 'batch_stats': ...}`` (arrays
  or ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``). Returns
  ``{'params': {...}, 'batch_stats': {...}}`` holding only the backbone's
  variables, as numpy arrays in the Flax layout and the encoder's dtypes.
  Raises :class:`InitFromError` naming the first tensor (in torchvision's
  order) that is missing, has another shape or holds non-finite values, then
  any tensor the encoder has no place for; ``width`` only improves the message.
  """
  params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
  entries = _expected(params, stats)
  where = f"the encoder (model.width={width})" if width is not None else "the encoder"
  out = {"params": {}, "batch_stats": {}}
  for torch_name, collection, tree_path, shape in entries:
    if torch_name not in tensors:
      _fail(path, f"no tensor {torch_name} (shape {shape}) in the file (not a complete torchvision "
            f"ResNet-18 state_dict?); its tensors: {_preview(tensors)}")
    a = tensors[torch_name]
    if a.shape != shape:
      hint = "; not a torchvision ResNet-18 (another architecture?)"
      if torch_name == "conv1.weight" and a.ndim == 4 and a.shape[1:] != shape[1:]:
        hint = (f"; the file's stem is {a.shape[2]}x{a.shape[3]} over {a.shape[1]} channels, the encoder's is "
                f"torchvision's {shape[2]}x{shape[3]} over {shape[1]} (another architecture, e.g. a CIFAR-style stem?)")
      elif torch_name == "conv1.weight" and a.ndim == 4:
        hint = f"; the file's ResNet has width {a.shape[0]}: set model.width={a.shape[0]}"
      _fail(path, f"tensor {torch_name} has shape {tuple(a.shape)} in the file, but {where} expects {shape}{hint}")
    if not np.all(np.isfinite(a)):
      _fail(path, f"tensor {torch_name} holds non-finite values")
    if collection == "batch_stats" and tree_path[-1] == "var" and np.any(a < 0):
      _fail(path, f"tensor {torch_name} holds negative variances")
    leaf = _leaf(variables[collection]["backbone"], tree_path)
    value = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a  # OIHW -> HWIO
    out[collection] = _set(out[collection], tree_path, np.ascontiguousarray(value, dtype=leaf.dtype))
  known = {e[0] for e in entries}
  extra = [n for n in tensors if n not in known and not _IGNORED.search(n)]
  if extra:
    _fail(path, f"tensor {extra[0]} (shape {tuple(tensors[extra[0]].shape)}) has no place in a "
          f"ResNet-18 encoder (another architecture?); unexpected: {_preview(extra)}")
  return out


def merge(variables, backbone):
  """``variables`` with the backbone's leaves replaced by those of ``backbone``."""
  out = dict(variables)
  for collection, tree in backbone.items():
    for p in _paths(tree):
      out[collection] = _set(out[collection], ("backbone",) + p, _leaf(tree, p))
  return out


def load_variables(path: str, variables, width: int | None = None):
  """``variables`` (the encoder's) with the backbone loaded from ``path``.

  The projection head(s) and anything else outside ``backbone`` are returned
  unchanged; the loaded leaves are numpy arrays.
  """
  backbone = map_state_dict(path, load_state_dict(path), variables, width)
  return merge(variables, backbone)


# --------------------------------------------------------------------------
# Config entry points.


def _variable_shapes(cfg):
  import jax
  import jax.numpy as jnp

  from slamjax.models import resnet
  model = resnet.get_model(cfg.model)
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False), jax.random.key(0))


def check(cfg) -> dict[str, tuple[int, ...]]:
  """Loads ``cfg.model.init_from`` and checks it against the encoder of ``cfg``.

  Needs no data and compiles nothing (the encoder's shapes come from
  ``jax.eval_shape``), so runners call it before decoding any data. Returns
  the loaded tensors' torch names and shapes (``{}`` when ``init_from`` is
  empty); raises :class:`InitFromError` with a one-line message otherwise.
  """
  path = cfg.model.get("init_from", "")
  if not path:
    return {}
  tensors = load_state_dict(path)
  map_state_dict(path, tensors, _variable_shapes(cfg), cfg.model.width)
  return {n: tuple(a.shape) for n, a in tensors.items() if not _IGNORED.search(n)}


def init_state_from(cfg, state, tx, mesh):
  """``state`` (a fresh ``pretrain.TrainState``) with the backbone loaded from ``cfg.model.init_from``.

  The optimizer state is initialised again from the loaded parameters; the
  projection head(s), the step and the RNG are kept. Returns ``state``
  unchanged when ``init_from`` is empty.
  """
  path = cfg.model.get("init_from", "")
  if not path:
    return state
  import jax

  from slamjax import sharding
  replicated = sharding.replicated(mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  backbone = map_state_dict(path, load_state_dict(path), variables, cfg.model.width)
  loaded = merge(variables, backbone)
  params = jax.device_put(loaded["params"], replicated)
  batch_stats = jax.device_put(loaded["batch_stats"], replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  if jax.process_index() == 0:
    n = sum(a.size for a in jax.tree.leaves(backbone))
    print(f"model.init_from: loaded the backbone ({n / 1e6:.2f}M values) from {path}", flush=True)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


# --------------------------------------------------------------------------
# Test and doc helper.


def random_state_dict(width: int = 64, seed: int = 0, stage_sizes=(2, 2, 2, 2)) -> dict[str, np.ndarray]:
  """A torchvision-layout ResNet-18 ``state_dict`` of random weights (numpy, OIHW), with ``fc``.

  Convolutions are He-initialised and BatchNorm has random affine parameters
  and running statistics, so every tensor matters for the features.
  """
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, cout, cin, k):
    sd[name + ".weight"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)

  def bn(name, c):
    sd[name + ".weight"] = rng.uniform(0.5, 1.0, c).astype(np.float32)
    sd[name + ".bias"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
    sd[name + ".running_mean"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
    sd[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[name + ".num_batches_tracked"] = np.array(100, np.int64)

  conv("conv1", width, 3, 7)
  bn("bn1", width)
  cin = width
  for s, n in enumerate(stage_sizes):
    cout = width * 2**s
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      stride = 2 if s > 0 and b == 0 else 1
      conv(p + ".conv1", cout, cin, 3); bn(p + ".bn1", cout)
      conv(p + ".conv2", cout, cout, 3); bn(p + ".bn2", cout)
      if stride != 1 or cin != cout:
        conv(p + ".downsample.0", cout, cin, 1); bn(p + ".downsample.1", cout)
      cin = cout
  sd["fc.weight"] = (rng.standard_normal((1000, cin)) * 0.01).astype(np.float32)
  sd["fc.bias"] = np.zeros(1000, np.float32)
  return sd
