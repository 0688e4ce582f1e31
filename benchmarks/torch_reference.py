"""PyTorch implementation of one SLAM-AGS pretraining step, for benchmarks.

Written for ``benchmarks/pretrain_step.py``: the same step as
``slamjax.pretrain.make_train_step`` with the default config (ResNet-18 +
512-512 projection head; SimCLR NT-Xent on two augmented views of the
positive-bag cells, the similarity loss on a centre-crop and an augmented
view of the negative-bag cells; one per-task gradient each; adaptive PCGrad;
SGD with momentum 0.9 and weight decay 1e-4), following the reference code
(github.com/Ace95/SLAM-AGS, ``SLAM-AGS.py`` / ``utils.py``): per-task
``backward()`` calls, flat gradients, projection, rescaling, ``.grad`` write
back and ``optimizer.step()``. The augmentations run on the batch tensors
(crop, flip, colour jitter, 90-degree rotation), as slamjax does on device.

``layout='reference'`` forwards the four views separately, as the reference
script does (per-view BatchNorm statistics); the default ``'per_task'``
forwards each task's two views together, as slamjax does.

torch is an optional benchmark dependency (``pip install torch==2.13.0``);
nothing in ``slamjax`` imports this file.

Example:
  >>> step = make_step(image_size=32, batch_size=8, width=8, proj_dims=(16, 16))
  >>> pos, neg = random_batch(8, 32)
  >>> sorted(step(pos, neg))
  ['loss_sim', 'loss_simclr']
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class Encoder(nn.Module):
  """torchvision's ResNet-18 topology (fc removed) + MLP projection head."""

  def __init__(self, width: int = 64, proj_dims: Sequence[int] = (512, 512)):
    super().__init__()
    self.stem = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.stem_bn = nn.BatchNorm2d(width)
    blocks, cin = [], width
    for i in range(4):
      for j in range(2):
        cout = width * 2**i
        blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    head, d_in = [], cin
    for k, d in enumerate(proj_dims):
      head.append(nn.Linear(d_in, d))
      if k < len(proj_dims) - 1:
        head.append(nn.ReLU())
      d_in = d
    self.head = nn.Sequential(*head)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.stem_bn(self.stem(x))), 3, 2, 1)
    feats = self.blocks(x).mean((2, 3))
    return feats, self.head(feats)


def nt_xent_loss(z_i, z_j, temperature: float = 0.07):
  """Reference ``utils.nt_xent_loss`` (no labels)."""
  b = z_i.shape[0]
  f = F.normalize(torch.stack([z_i, z_j], 1).view(2 * b, -1), dim=1)
  mask = torch.eye(b).repeat_interleave(2, 0).repeat_interleave(2, 1)
  logits_mask = 1.0 - torch.eye(2 * b)
  mask = mask * logits_mask
  sim = f @ f.T / temperature
  logits = sim - sim.max(1, keepdim=True).values.detach()
  log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
  return -((mask * log_prob).sum(1) / (mask.sum(1) + 1e-8)).mean()


def similarity_loss(z_1, z_2, temperature: float = 0.07, base_temperature: float = 0.07):
  """Reference ``utils.similarity_loss`` (all views are positives)."""
  f = F.normalize(torch.cat([z_1, z_2], 0), dim=-1)
  m = f.shape[0]
  logits = f @ f.T / temperature
  logits = logits - logits.max(1, keepdim=True).values.detach()
  mask = 1.0 - torch.eye(m)
  mean_pos = (mask * logits).sum(1) / mask.sum(1)
  return -(temperature / base_temperature) * mean_pos.mean()


_GRAY = torch.tensor([0.299, 0.587, 0.114])
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114],
                         [0.596, -0.274, -0.322],
                         [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _u(b, s):
  return (torch.rand(b, 1, 1, 1) * 2 - 1) * s + 1


def augment(x_u8: torch.Tensor, crop: int, strength: float = 0.1, p_jitter: float = 0.8,
            p_rot: float = 0.8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> torch.Tensor:
  """Batched random crop, flip, colour jitter and rot90 of uint8 NHWC -> NCHW."""
  b, h, w, _ = x_u8.shape
  x = x_u8.float().div_(255.0)
  if h > crop or w > crop:
    tops = torch.randint(0, h - crop + 1, (b,)).tolist()
    lefts = torch.randint(0, w - crop + 1, (b,)).tolist()
    x = torch.stack([x[i, t:t + crop, l:l + crop] for i, (t, l) in enumerate(zip(tops, lefts))])
  x = torch.where(torch.rand(b, 1, 1, 1) < 0.5, x.flip(2), x)
  j = x * _u(b, strength)
  gray = j @ _GRAY
  gm = gray.mean((1, 2)).view(b, 1, 1, 1)
  j = (j - gm) * _u(b, strength) + gm
  gray = (j @ _GRAY)[..., None]
  j = (j - gray) * _u(b, strength) + gray
  theta = (2 * math.pi * strength) * (torch.rand(b, 1, 1) * 2 - 1)
  yiq = j @ _RGB2YIQ.T
  c, s = torch.cos(theta), torch.sin(theta)
  i, q = yiq[..., 1], yiq[..., 2]
  yiq = torch.stack([yiq[..., 0], c * i - s * q, s * i + c * q], -1)
  j = (yiq @ _YIQ2RGB.T).clamp_(0.0, 1.0)
  x = torch.where(torch.rand(b, 1, 1, 1) < p_jitter, j, x)
  k = torch.where(torch.rand(b) < p_rot, torch.randint(1, 4, (b,)), torch.zeros(b, dtype=torch.long))
  rots = torch.stack([torch.rot90(x, r, (1, 2)) for r in range(4)], 1)
  x = rots[torch.arange(b), k]
  x = (x - torch.tensor(mean)) / torch.tensor(std)
  return x.permute(0, 3, 1, 2)


def center_view(x_u8: torch.Tensor, crop: int, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
  h, w = x_u8.shape[1:3]
  t, l = (h - crop) // 2, (w - crop) // 2
  x = x_u8[:, t:t + crop, l:l + crop].float() / 255.0
  return ((x - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)


def adaptive_pcgrad(g1: torch.Tensor, g2: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
  """The reference's projection + rescaling on flat gradients."""
  grads = [g1, g2]
  g_pc = [g1.clone(), g2.clone()]
  order = [0, 1]
  random.shuffle(order)
  pre_norm = (g1 + g2).norm()
  for i in order:
    for j in order:
      if i == j:
        continue
      gj_norm2 = (grads[j] * grads[j]).sum()
      if gj_norm2.item() == 0:
        continue
      dot = (g_pc[i] * grads[j]).sum()
      if dot < 0:
        g_pc[i] = g_pc[i] - (dot / (gj_norm2 + eps)) * grads[j]
  g = g_pc[0] + g_pc[1]
  post_norm = g.norm()
  if post_norm.item() > 0:
    g = g * (pre_norm / (post_norm + eps))
  return g


def make_step(image_size: int, batch_size: int = 128, width: int = 64,
              proj_dims: Sequence[int] = (512, 512), crop_size: int | None = None,
              lr: float = 0.05, channels_last: bool = False, layout: str = "per_task",
              seed: int = 0):
  """Returns ``step(pos_u8, neg_u8) -> {'loss_simclr', 'loss_sim'}``.

  ``pos_u8``/``neg_u8`` are uint8 NHWC tensors of batch_size // 2 cells each.
  """
  if layout not in ("per_task", "reference"):
    raise ValueError(f"layout={layout!r}; valid: ['per_task', 'reference']")
  torch.manual_seed(seed)
  random.seed(seed)
  crop = crop_size or image_size
  model = Encoder(width, proj_dims)
  mf = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=mf)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)

  def flat_grads():
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])

  def fwd(x):
    return model(x.contiguous(memory_format=mf))[1]

  def step(pos_u8, neg_u8):
    pos_views = [augment(pos_u8, crop), augment(pos_u8, crop)]
    neg_views = [center_view(neg_u8, crop), augment(neg_u8, crop)]
    bp, bn = pos_u8.shape[0], neg_u8.shape[0]
    if layout == "per_task":
      z = fwd(torch.cat(pos_views))
      zp = (z[:bp], z[bp:])
      z = fwd(torch.cat(neg_views))
      zn = (z[:bn], z[bn:])
    else:
      zp = (fwd(pos_views[0]), fwd(pos_views[1]))
      zn = (fwd(neg_views[0]), fwd(neg_views[1]))
    l1 = nt_xent_loss(*zp)
    l2 = similarity_loss(*zn)
    opt.zero_grad(set_to_none=False)
    l1.backward()
    g1 = flat_grads()
    opt.zero_grad(set_to_none=False)
    l2.backward()
    g2 = flat_grads()
    g = adaptive_pcgrad(g1, g2)
    i = 0
    for p in params:
      n = p.numel()
      p.grad.copy_(g[i:i + n].view_as(p))
      i += n
    opt.step()
    return {"loss_simclr": l1.item(), "loss_sim": l2.item()}

  step.model = model
  return step


def random_batch(batch_size: int, image_size: int, seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  shape = (batch_size // 2, image_size, image_size, 3)
  return (torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
          torch.randint(0, 256, shape, dtype=torch.uint8, generator=g))
