"""Data-driven output scales and bias correction for a prepared DAQ model (DAQ-SPEC §5, Eq. 3).

The weight quantizer's output scale ``s`` is first fitted to the weight alone (least squares,
:func:`daq_core.fit_weight_scale`). The paper initialises its layer scale from *data* instead:
``s = mean|conv(x, W)| / mean|conv(a_q, w_q)|`` on the first batch. :func:`calibrate_output_scales`
does that per output channel, in least squares, layer by layer in execution order (each layer
sees the already corrected layers before it), and moves the mean of the error into the layer's
bias (the BN running mean of a fused ConvBn module). Everything it changes — ``s``, a bias, a
running mean — is ordinary state that the int8 conversion reads, so conversion stays exact.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantizeBase

import daq_core

from .fake_quantize import DAQFakeQuantize
from .prepare import folded_weight, weight_fold_factor

__all__ = ["calibrate_output_scales"]


def _targets(model: nn.Module) -> Dict[str, nn.Module]:
    out = {}
    for name, module in model.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if not isinstance(fq, DAQFakeQuantize) or fq.fake_quant_enabled[0] == 0 or fq.initialized[0] == 0:
            continue
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue   # per-tensor weights on axis 1: left as initialised
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            out[name] = module
    return out


def _raw_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output without bias: ``conv(x, weight)`` or ``x weightᵀ``."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


@torch.no_grad()
def calibrate_output_scales(model: nn.Module, *inputs, max_ratio: float = 4.0, correct_bias: bool = True) -> List[str]:
    """Fit every DAQ weight quantizer's output scale ``s`` and the layer bias to one batch.

    Per layer and output channel: ``ratio, offset = daq_core.output_scale_correction(conv(x, W),
    conv(a_q, w_q))`` where ``x`` is the layer's input in the float network (every fake-quant
    disabled) and ``a_q`` its input in the quantized network; then ``s ← ratio · s`` and
    ``offset`` is added to the output (fused ConvBn: ``running_mean ← running_mean - offset / f``
    with the fold factor ``f = γ / sqrt(var + eps)``; conv/linear with a bias: ``bias ← bias +
    offset``; without a bias only the scale is corrected). Layers are corrected in execution order.

    Call it once, after the quantizers are initialised (``daq_fx.prepare_qat_fx`` + one batch),
    before training, with a representative batch (e.g. 256 training images); a second call is
    refused (the bias correction is relative to the float network, which the first call changed). Eval-mode arithmetic is used
    (BN running statistics), which is what frozen-BN training and the converted model compute.

    Args:
        model: a prepared model (``daq_fx.prepare_qat_fx``) with DAQ weight quantizers.
        *inputs: the model's inputs (one batch).
        max_ratio: per-channel ratios are clamped to ``[1/max_ratio, max_ratio]``.
        correct_bias: also move the mean error into the bias / BN running mean (default). With BN
            training on batch statistics (not frozen) the running mean is not what the training
            forward uses, so the correction is only seen in eval; ``False`` fits the scales alone.

    Returns:
        The names of the corrected layers, in execution order.
    """
    if getattr(model, "meta", {}).get("daq_output_scales_calibrated"):
        raise ValueError("calibrate_output_scales was already applied to this model: it corrects biases relative to"
                         " the float network, which the first call changed; call it once, right after prepare")
    if not inputs:
        raise ValueError("calibrate_output_scales needs a batch: pass the model's inputs, e.g."
                         " calibrate_output_scales(model, images)")
    targets = _targets(model)
    if not targets:
        return []
    fake_quants = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    flags = [(m, m.fake_quant_enabled.clone(), m.observer_enabled.clone()) for m in fake_quants]
    was_training = model.training
    float_inputs: Dict[str, torch.Tensor] = {}
    done: List[str] = []

    def record(name):
        def hook(module, args):
            float_inputs[name] = args[0].detach()
        return hook

    def correct(name):
        def hook(module, args):
            x_q = args[0]
            fq = module.weight_fake_quant
            w_float = folded_weight(module)
            reference = _raw_output(module, float_inputs[name], w_float)
            quantized = _raw_output(module, x_q, fq(w_float))
            if fq.output_scale.numel() == 1:
                ratio = daq_core.output_scale_correction(reference.transpose(0, 1).reshape(1, -1),
                                                         quantized.transpose(0, 1).reshape(1, -1), 0,
                                                         max_ratio)[0]
                dims = [d for d in range(reference.dim()) if d != 1]
                offset = reference.mean(dim=dims) - ratio * quantized.mean(dim=dims)
            else:
                ratio, offset = daq_core.output_scale_correction(reference, quantized, 1, max_ratio)
            fq.output_scale.mul_(ratio.to(fq.output_scale.dtype))
            if correct_bias:
                factor = weight_fold_factor(module)
                if factor is not None:
                    module.bn.running_mean.sub_(offset / factor)
                elif module.bias is not None:
                    module.bias.add_(offset.to(module.bias.dtype))
            done.append(name)
        return hook

    model.eval()
    try:
        for m in fake_quants:
            m.disable_observer()
            m.disable_fake_quant()
        handles = [module.register_forward_pre_hook(record(name)) for name, module in targets.items()]
        try:
            model(*inputs)
        finally:
            for h in handles:
                h.remove()
        for m, fq_flag, _ in flags:
            m.fake_quant_enabled.copy_(fq_flag)
        handles = [module.register_forward_pre_hook(correct(name)) for name, module in targets.items()]
        try:
            model(*inputs)
        finally:
            for h in handles:
                h.remove()
    finally:
        for m, fq_flag, obs_flag in flags:
            m.fake_quant_enabled.copy_(fq_flag)
            m.observer_enabled.copy_(obs_flag)
        model.train(was_training)
    if isinstance(getattr(model, "meta", None), dict):
        model.meta["daq_output_scales_calibrated"] = True
    return done
