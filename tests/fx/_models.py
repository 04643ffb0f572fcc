"""Small models and helpers shared by the FX tests."""

import torch
from torch import nn

import daq_fx


class TinyNet(nn.Module):
    """Conv-BN-ReLU, depthwise Conv-BN, residual add, dropout, pool, flatten, linear."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = x + self.bn2(self.conv2(x))
        x = self.drop(x)
        return self.fc(self.pool(x).flatten(1))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, make_input, batches: int = 2) -> nn.Module:
    """Set BN running statistics to the data's (cumulative average over a few batches).

    Randomly initialised networks evaluated with BN's initial running statistics (mean 0,
    var 1) can have vanishing or exploding activations (efficientnet_b0 outputs ~1e-6);
    calibrating makes eval-mode activations match the train-mode ones the quantizers saw.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    was_training = model.training
    model.train()
    for _ in range(batches):
        model(make_input())
    for m in bns:
        m.momentum = 0.1
    model.train(was_training)
    return model


def agreement(a: torch.Tensor, b: torch.Tensor):
    """(top-1 agreement, cosine similarity of the flattened outputs)."""
    r = daq_fx.output_agreement(a, b)
    return r["top1"], r["cosine"]


def bit_exact_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of samples (rows) whose outputs agree to 1e-4 everywhere."""
    return daq_fx.output_agreement(a, b)["bit_exact_samples"]


class TracedLinear(nn.Linear):
    """A ``Linear`` defined outside ``torch.nn`` (like ``timm.layers.Linear``): FX traces through it,
    so the weight reaches ``F.linear`` as a ``get_attr`` node with its own weight quantizer."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class TinySE(nn.Module):
    """Conv-BN-ReLU, squeeze-excite (mean, 1x1 convs, sigmoid gate, multiply), a residual add and a
    classifier that FX traces into ``F.linear`` (timm's MobileNetV3 / EfficientNet / RegNetY pattern)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.conv_reduce = nn.Conv2d(16, 8, 1)
        self.se_act = nn.ReLU()
        self.conv_expand = nn.Conv2d(8, 16, 1)
        self.gate = nn.Sigmoid()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = TracedLinear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        gate = self.gate(self.conv_expand(self.se_act(self.conv_reduce(x.mean((2, 3), keepdim=True)))))
        x = x * gate
        x = x + self.bn2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))
