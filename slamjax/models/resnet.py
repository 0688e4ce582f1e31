"""ResNet-18 encoder with an MLP projection head (Flax linen, BatchNorm).

The encoder follows torchvision's ResNet-18 (7x7/2 stem, 3x3/2 max-pool, four
stages of two basic blocks) with a configurable base width, so that small
CPU runs can use a narrower network with the same topology.

``impl`` picks how the layers are computed: ``'native'`` uses XLA's
convolution and reduce-window ops (the right choice on GPU/TPU), ``'cpu'``
uses the formulations of :mod:`slamjax.models.layers` that are fast on
XLA:CPU, and ``'auto'`` (default) picks ``'cpu'`` on the CPU backend. Both
have the same parameters and compute the same function, so checkpoints are
interchangeable.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = Encoder(width=4, proj_dims=(16, 16))
  >>> x = jnp.zeros((2, 32, 32, 3))
  >>> variables = jax.jit(model.init, static_argnames="train")(
  ...     jax.random.key(0), x, train=False)
  >>> feats, z = jax.jit(model.apply, static_argnames="train")(variables, x, train=False)
  >>> feats.shape, z.shape
  ((2, 32), (2, 16))
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from slamjax.models import layers

ModuleDef = Any


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    # BN scale starts at 1, as torchvision's default (zero_init_residual=False).
    y = self.norm(name="bn2")(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides),
                           name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class ResNet18(nn.Module):
  """ResNet-18 trunk returning globally pooled features of size 8 * width."""
  width: int = 64
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    impl = layers.resolve_impl(self.impl)
    kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    if impl == "native":
      conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                               padding="SAME", kernel_init=kernel_init)
    else:
      conv = functools.partial(layers.Conv, dtype=self.dtype,
                               kernel_init=kernel_init, impl=impl)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = conv(self.width, (7, 7), (2, 2), name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    x = layers.max_pool(x, 3, 2, impl=impl)
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, strides, conv=conv, norm=norm,
                       name=f"stage{i + 1}_block{j + 1}")(x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


class ProjectionHead(nn.Module):
  """MLP head: Dense-ReLU-...-Dense (the reference uses 512-512).

  ``norm=True`` adds BatchNorm after every hidden Dense, as SimCLR's own
  head does; it keeps the head from mapping every cell to one point.
  """
  dims: Sequence[int] = (512, 512)
  norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i, d in enumerate(self.dims):
      x = nn.Dense(d, name=f"dense{i + 1}")(x)
      if i < len(self.dims) - 1:
        if self.norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, name=f"bn{i + 1}")(x)
        x = nn.relu(x)
    return x


# model.projection: one projection head for both tasks (the reference), or
# one per task on the shared backbone.
PROJECTIONS = ("shared", "per_task")
# The pretraining tasks and the head each one reads (per_task projections).
TASK_HEADS = {"simclr": "head", "similarity": "sim_head"}


class Encoder(nn.Module):
  """ResNet-18 + projection head(s); returns (pooled features, projection).

  ``impl`` is ``'auto'``, ``'native'`` or ``'cpu'`` (see the module doc).
  ``projection='shared'`` (the reference) has one head, ``head``, for both
  pretraining tasks. ``projection='per_task'`` adds a second head,
  ``sim_head``, for the similarity task on the same backbone, so the
  similarity loss can contract its own head without dragging the SimCLR
  head along; ``task`` picks the head (``'simclr'`` or ``'similarity'``).
  The default ``task='simclr'`` is the projection that embeddings use
  (``embed.output='projection'``) in both layouts.
  """
  width: int = 64
  proj_dims: Sequence[int] = (512, 512)
  impl: str = "auto"
  head_norm: bool = False
  projection: str = "shared"
  stage_sizes: Sequence[int] = (2, 2, 2, 2)  # blocks per stage (tests use fewer)

  def __post_init__(self):
    if self.impl not in layers.IMPLS:
      raise ValueError(f"Encoder impl={self.impl!r}; valid: {list(layers.IMPLS)}")
    if self.projection not in PROJECTIONS:
      raise ValueError(f"Encoder projection={self.projection!r}; valid: {list(PROJECTIONS)}")
    super().__post_init__()

  def setup(self):
    self.backbone = ResNet18(width=self.width, stage_sizes=tuple(self.stage_sizes),
                             impl=layers.resolve_impl(self.impl))
    self.head = ProjectionHead(self.proj_dims, norm=self.head_norm)
    if self.projection == "per_task":
      self.sim_head = ProjectionHead(self.proj_dims, norm=self.head_norm)

  def __call__(self, x, train: bool = True, task: str = "simclr"):
    feats = self.backbone(x, train)
    if self.projection == "per_task" and self.is_initializing():
      for other in TASK_HEADS:  # every head gets its parameters at init
        if other != task:
          self.project(feats, train, other)
    return feats, self.project(feats, train, task)

  def project(self, feats, train: bool = True, task: str = "simclr"):
    """The projection of pooled features by ``task``'s head."""
    if task not in TASK_HEADS:
      raise ValueError(f"task={task!r}; valid: {list(TASK_HEADS)}")
    if self.projection == "per_task" and task == "similarity":
      return self.sim_head(feats, train)
    return self.head(feats, train)


def get_model(model_cfg) -> Encoder:
  """Builds the encoder from ``config.model`` (name, width, proj_dims, impl,
  head_norm, projection)."""
  if model_cfg.name != "resnet18":
    raise ValueError(f"config.model.name={model_cfg.name!r}; valid: ['resnet18']")
  return Encoder(width=model_cfg.width, proj_dims=tuple(model_cfg.proj_dims),
                 impl=model_cfg.impl, head_norm=model_cfg.head_norm,
                 projection=model_cfg.projection)
