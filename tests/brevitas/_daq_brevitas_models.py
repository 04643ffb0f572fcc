"""Small Brevitas models shared by the daq_brevitas tests."""

import torch
from torch import nn

import brevitas.nn as qnn
from brevitas.quant import Int32Bias

from daq_brevitas import DAQActPerTensor, DAQSignedActPerTensor, DAQWeightPerChannel, DAQWeightPerTensor


class TinyDAQNet(nn.Module):
    """Signed input quantizer → conv (per-channel) → ReLU → conv (per-tensor) → ReLU → pool → linear."""

    def __init__(self, weight_bits=4, act_bits=4, weight_quant=DAQWeightPerChannel,
                 weight_quant2=DAQWeightPerTensor, bias=True):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=DAQSignedActPerTensor, bit_width=act_bits, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=weight_quant, weight_bit_width=weight_bits,
                                     bias=bias, bias_quant=Int32Bias, return_quant_tensor=False)
        self.relu1 = qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=act_bits, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_quant=weight_quant2, weight_bit_width=weight_bits,
                                     bias=bias, bias_quant=Int32Bias, return_quant_tensor=False)
        self.relu2 = qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=act_bits, return_quant_tensor=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc_in = qnn.QuantIdentity(act_quant=DAQActPerTensor, bit_width=act_bits, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(8, 5, weight_quant=weight_quant, weight_bit_width=weight_bits, bias=bias,
                                  bias_quant=Int32Bias, return_quant_tensor=False)

    def forward(self, x):
        x = self.relu1(self.conv1(self.inp(x)))
        x = self.relu2(self.conv2(x))
        x = self.flat(self.pool(x.value))
        return self.fc(self.fc_in(x))


def weight_scalings(model):
    from daq_brevitas import DAQWeightScaling
    return [m for m in model.modules() if isinstance(m, DAQWeightScaling)]


def act_scalings(model):
    from daq_brevitas import DAQActScaling
    return [m for m in model.modules() if isinstance(m, DAQActScaling)]
