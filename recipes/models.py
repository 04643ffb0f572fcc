"""Model creation for the recipes: timm models, the CIFAR ResNet-20 (option A), checkpoints.

``resnet20_cifar`` is registered with timm's ``@register_model`` on import of this module, so
``timm.create_model("resnet20_cifar")`` works after ``import recipes.models``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(RuntimeError):
    """Unknown model, unusable pretrained weights or a checkpoint that does not fit."""


# --------------------------------------------------------------------------------------
# CIFAR ResNet-20 with option-A (zero-padding, parameter-free) shortcuts
# --------------------------------------------------------------------------------------

class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x):
        p = self.pad_channels
        # x[:, :, ::2, ::2] written as a 1x1 max-pool with stride 2: identical values, and a plain op
        # for every tracer (Brevitas' backport FX tracer mishandles multi-axis slicing)
        return F.pad(F.max_pool2d(x, kernel_size=1, stride=2), (0, 0, 0, 0, p, p))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = PadShortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, Sec. 4.2): 3 stages of ``n`` basic blocks, 16/32/64 channels.

    Module names match the widely used checkpoint layout (``conv1``, ``bn1``,
    ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``). ``conv1`` and ``linear`` are the
    first and last layers that DAQ's CIFAR setting keeps in float.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **_ignored):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self):
        return self.linear

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------
# The DAQ authors' ResNet-20 layout (their released CIFAR-10 checkpoints)
# --------------------------------------------------------------------------------------

class DAQReferenceBlock(nn.Module):
    """Basic block of the DAQ authors' ResNet-20 (``../shared/docs/DAQ-REFERENCE.md``).

    ``o = relu(bn1(qconv1(x)))``, ``o = bn2(qconv2(o))``, ``out = relu(o + shortcut(x))``. The
    convs are plain ``nn.Conv2d`` here; the plugins quantize them (their *inputs* and weights),
    and the shortcut carries the float ``x``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DAQReferenceStage(nn.Module):
    """``block_0 … block_{n-1}``, each a one-element ``nn.Sequential`` (the checkpoints' key layout
    ``layerL.block_i.0.conv1``)."""

    def __init__(self, in_planes: int, planes: int, stride: int, n: int):
        super().__init__()
        self.num_blocks = n
        for i in range(n):
            self.add_module(f"block_{i}", nn.Sequential(DAQReferenceBlock(in_planes, planes, stride if i == 0 else 1)))
            in_planes = planes

    def forward(self, x):
        for i in range(self.num_blocks):
            x = getattr(self, f"block_{i}")(x)
        return x


class DAQReferenceResNet(nn.Module):
    """The DAQ authors' CIFAR ResNet-20 (``DAQ-REFERENCE.md``), in their checkpoints' layout.

    It differs from :class:`CifarResNet` in three places: the stem is ``relu(conv1(x))`` — the
    checkpoints hold ``bn1`` but the authors' forward never applies it (kept here, unused, so their
    state dicts load strictly); the head is global average pool → ``bn2 = BatchNorm1d(64)`` →
    ``linear``; blocks are named ``layerL.block_i.0.*``. Inputs are normalised with the ImageNet
    mean/std (:data:`recipes.data.IMAGENET_MEAN`), 32x32, no resize or crop at test time.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **_ignored):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)    # in the checkpoints, never applied by the reference forward
        self.layer1 = DAQReferenceStage(16, 16, 1, n)
        self.layer2 = DAQReferenceStage(16, 32, 2, n)
        self.layer3 = DAQReferenceStage(32, 64, 2, n)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn2 = nn.BatchNorm1d(64)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def quantized_conv_names(self):
        """The convs the authors quantize: every conv inside the blocks (not ``conv1``, not ``linear``)."""
        return [name for name, m in self.named_modules() if isinstance(m, nn.Conv2d) and name.startswith("layer")]

    def get_classifier(self):
        return self.linear

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.bn2(torch.flatten(self.pool(x), 1)))


def _register():
    from timm.models import register_model
    from timm.models._registry import is_model

    if is_model("resnet20_cifar") and is_model("resnet20_daq_reference"):
        return

    @register_model
    def resnet20_cifar(pretrained: bool = False, **kwargs):
        """CIFAR ResNet-20, option-A shortcuts (0.27M parameters), as in the DAQ paper's Tables 5/6."""
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
            kwargs.pop(k, None)
        if pretrained:
            raise ModelError("resnet20_cifar has no downloadable pretrained weights: pass"
                             " --initial-checkpoint PATH (e.g. resnet20-cifar10-12fca82f.th) instead of --pretrained")
        kwargs.pop("drop_rate", None)
        kwargs.pop("drop_path_rate", None)
        return CifarResNet(20, **kwargs)

    @register_model
    def resnet20_daq_reference(pretrained: bool = False, **kwargs):
        """The DAQ authors' CIFAR-10 ResNet-20 layout (``DAQ-REFERENCE.md``): loads their released
        checkpoints with :func:`recipes.daq_reference.load_reference_float`."""
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
            kwargs.pop(k, None)
        if pretrained:
            raise ModelError("resnet20_daq_reference has no downloadable weights: load the authors' checkpoint"
                             " (cifar10_fp.pth, ...) with recipes.daq_reference.load_reference_float")
        kwargs.pop("drop_rate", None)
        kwargs.pop("drop_path_rate", None)
        return DAQReferenceResNet(20, **kwargs)


_register()

#: First and last layer names kept in float by the CIFAR recipe.
RESNET20_FLOAT_LAYERS = ("conv1", "linear")


# --------------------------------------------------------------------------------------
# Creation and checkpoints
# --------------------------------------------------------------------------------------

def create_model(name: str, num_classes: int, pretrained: bool = False,
                 initial_checkpoint: Optional[str] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with clear errors; optionally loads ``initial_checkpoint`` (float weights)."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise ModelError(f"unknown model name {name!r}.{hint}")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except ModelError:
        raise
    except Exception as e:
        if pretrained:
            raise ModelError(f"could not load timm's pretrained weights for {name} ({type(e).__name__}: {e})."
                             f" Offline, download them elsewhere and pass --initial-checkpoint PATH"
                             f" without --pretrained.") from e
        raise
    if initial_checkpoint:
        load_float_checkpoint(model, initial_checkpoint, name)
    return model


def _extract_state_dict(obj) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "daq_recipe" in obj:
        meta = obj["daq_recipe"]
        if obj.get("float_model") is not None:
            return obj["float_model"]
        raise ModelError(f"checkpoint is a DAQ recipe checkpoint ({meta.get('model')}, W{meta.get('weight_bits')}"
                         f"A{meta.get('act_bits')}) without float weights; continue it with --resume instead")
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ModelError("checkpoint holds no state dict (looked for 'state_dict', 'model' or a plain tensor dict)")


def load_float_checkpoint(model: nn.Module, path: str, model_name: str = "") -> None:
    """Load float weights (``module.`` prefixes stripped) and fail clearly when they do not fit."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"--initial-checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and "daq_recipe" in obj and model_name and obj["daq_recipe"].get("model") != model_name:
        raise ModelError(f"checkpoint {p} was written for model {obj['daq_recipe'].get('model')!r},"
                         f" not {model_name!r}")
    sd = _extract_state_dict(obj)
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    own = model.state_dict()
    quant_key = next((k for k in sd if k.rsplit(".", 1)[-1] in ("uW", "lW", "uA", "beta")), None)
    if quant_key is not None and quant_key not in own:
        raise ModelError(f"checkpoint {p} holds DAQ reference quantizer state ({quant_key!r}): it is one of the DAQ"
                         f" authors' quantized checkpoints, not float weights. Evaluate it with"
                         f" recipes.daq_reference.to_brevitas / to_daq_fx (or python -m benchmarks.reference)")
    if "layer1.block_0.0.conv1.weight" in sd and "layer1.block_0.0.conv1.weight" not in own:
        raise ModelError(f"checkpoint {p} is in the DAQ authors' ResNet-20 layout (key 'layer1.block_0.0.conv1.weight'),"
                         f" which {model_name or type(model).__name__} does not have: use --model"
                         f" resnet20_daq_reference (or recipes.daq_reference.load_reference_float)")
    # old checkpoints (e.g. torch<0.4.1) have no BN num_batches_tracked: keep the model's
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shape_bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shape_bad:
            k = shape_bad[0]
            parts.append(f"{len(shape_bad)} shape mismatches (e.g. {k}: checkpoint {tuple(sd[k].shape)}"
                         f" vs model {tuple(own[k].shape)})")
        raise ModelError(f"checkpoint {p} does not fit model {model_name or type(model).__name__}: "
                         + "; ".join(parts) + ". Is it from another model or another number of classes?")
    model.load_state_dict(sd, strict=False)


# --------------------------------------------------------------------------------------
# Graph-mode friendliness (INTEGRATION-NOTES: timm under FX)
# --------------------------------------------------------------------------------------

def unfuse_batchnorm_act(model: nn.Module, relu6_to_relu: bool = False) -> nn.Module:
    """Replace timm's ``BatchNormAct2d`` by ``Sequential(BatchNorm2d, act)`` in place.

    FX traces through ``BatchNormAct2d`` into ``F.batch_norm(training=True)`` (batch statistics
    in eval, no Conv+BN fusion); Brevitas' graph mode trips on it too. Parameters and running
    statistics are copied, so the float function is unchanged (except ``relu6_to_relu``).
    """
    from timm.layers import BatchNormAct2d

    def convert_act(act):
        if relu6_to_relu and isinstance(act, nn.ReLU6):
            return nn.ReLU(inplace=True)
        return act

    for name, child in list(model.named_children()):
        if isinstance(child, BatchNormAct2d):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                affine=child.affine, track_running_stats=child.track_running_stats)
            bn.load_state_dict(child.state_dict(), strict=False)
            bn.train(child.training)
            act = convert_act(child.act)
            drop = child.drop
            mods = [bn] + ([] if isinstance(drop, nn.Identity) else [drop]) + ([] if isinstance(act, nn.Identity) else [act])
            setattr(model, name, nn.Sequential(*mods) if len(mods) > 1 else bn)
        elif relu6_to_relu and isinstance(child, nn.ReLU6):
            setattr(model, name, nn.ReLU(inplace=True))
        else:
            unfuse_batchnorm_act(child, relu6_to_relu)
    return model
