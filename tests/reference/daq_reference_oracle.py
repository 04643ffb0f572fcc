"""The DAQ authors' eval forward, computed from the equations of ``../shared/docs/DAQ-REFERENCE.md``.

Written from the spec's equations only (not from the authors' GPL code, and not from this
project's quantizers): the plugins' reproduction of the released checkpoints is checked against it.

    ŵ   = (W − mean W) / std W                  (unbiased std, whole tensor)
    t   = (clamp(ŵ, lW, uW) − lW) / ((uW − lW)/n)
    W_q = (2·round(t) − n) / n
    A_q = round(clamp(x, 0, uA) / (uA/n)) / n    (A1; A32: A_q = x)
    y   = |beta| · conv2d(A_q, W_q)
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F


def _bn(x: torch.Tensor, sd: Dict[str, torch.Tensor], key: str, eps: float = 1e-5) -> torch.Tensor:
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                        sd[key + ".bias"], training=False, eps=eps)


def _qconv(x: torch.Tensor, sd: Dict[str, torch.Tensor], key: str, stride: int, weight_bits: Optional[int],
           act_bits: Optional[int], stats: Optional[dict]) -> torch.Tensor:
    w = sd[key + ".weight"]
    if weight_bits is None:                       # the float model
        return F.conv2d(x, w, stride=stride, padding=1)
    n_w = 2 ** weight_bits - 1
    w_hat = (w - w.mean()) / w.std()              # torch's std is unbiased
    lw, uw = sd[key + ".lW"], sd[key + ".uW"]
    t = (torch.clamp(w_hat, lw, uw) - lw) / ((uw - lw) / n_w)
    w_q = (2 * torch.round(t) - n_w) / n_w
    if act_bits is not None:
        n_a = 2 ** act_bits - 1
        ua = sd[key + ".uA"]
        x = torch.round(torch.clamp(x, torch.zeros_like(ua), ua) / (ua / n_a)) / n_a
    acc = F.conv2d(x, w_q, stride=stride, padding=1)
    if stats is not None:
        stats[key] = max(stats.get(key, 0.0), float(acc.abs().max()))
    return sd[key + ".beta"].abs() * acc


def reference_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, weight_bits: Optional[int] = None,
                      act_bits: Optional[int] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """Logits of the authors' ResNet-20 for ImageNet-normalised 32x32 inputs ``x``.

    ``weight_bits=None``: the float model (``cifar10_fp.pth``). ``act_bits=None``: float
    activations (A32). ``stats`` (optional) collects each quantized conv's max ``|conv(A_q, W_q)|``.
    """
    out = F.relu(F.conv2d(x, sd["conv1.weight"], padding=1))     # bn1 is never applied
    in_planes = 16
    for layer, planes in ((1, 16), (2, 32), (3, 64)):
        for i in range(3):
            key = f"layer{layer}.block_{i}.0."
            stride = 2 if (i == 0 and layer > 1) else 1
            o = F.relu(_bn(_qconv(out, sd, key + "conv1", stride, weight_bits, act_bits, stats), sd, key + "bn1"))
            o = _bn(_qconv(o, sd, key + "conv2", 1, weight_bits, act_bits, stats), sd, key + "bn2")
            if stride != 1 or in_planes != planes:
                p = planes // 4
                shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, p, p))
            else:
                shortcut = out
            out = F.relu(o + shortcut)
            in_planes = planes
    feat = out.mean((2, 3))
    feat = _bn(feat, sd, "bn2")
    return F.linear(feat, sd["linear.weight"], sd["linear.bias"])
