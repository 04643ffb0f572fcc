"""DAQ quantizers as Brevitas injectors (declaration style).

Use them like any Brevitas quantizer; set the bit-width the Brevitas way and override the DAQ
hyperparameters (γ of Eq. 7, σ of the Gaussian kernel) as class attributes:

Example:
    >>> import brevitas.nn as qnn
    >>> from brevitas.quant import Int32Bias
    >>> conv = qnn.QuantConv2d(3, 8, 3, weight_quant=DAQWeightPerChannel, weight_bit_width=4,
    ...                        bias_quant=Int32Bias, return_quant_tensor=False)
    >>> class MyDAQWeight(DAQWeightPerTensor):
    ...     bit_width = 2
    ...     sigma = 0.5
    >>> relu = qnn.QuantReLU(act_quant=DAQActPerTensor, bit_width=4, return_quant_tensor=True)
"""

from __future__ import annotations

from brevitas.core.bit_width import BitWidthImplType
from brevitas.core.function_wrapper import Identity
from brevitas.core.scaling import IntScaling, ScalingPerOutputType
from brevitas.inject.enum import FloatToIntImplType
from brevitas.inject import ExtendedInjector, value
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver

import daq_core

from .core import (ActTensorQuant, DAQActScaling, DAQActTensorQuant, DAQWeightScaling, DAQWeightTensorQuant,
                   DASRActIntQuant, DASRWeightIntQuant, WeightTensorQuant)
from .proxy import DAQActQuantProxy, DAQWeightQuantProxy

__all__ = ["DAQWeightPerTensor", "DAQWeightPerChannel", "DAQActPerTensor", "DAQSignedActPerTensor",
           "is_daq_quantizer", "FamilyQuant", "FamilyWeightQuant", "FamilyActQuant", "per_output_channel",
           "is_family_quantizer"]


class FamilyQuant(ExtendedInjector):
    """What every family's weight and activation injectors declare (DAQ, N2UQ, CPQ add their
    ``scaling_impl``, ``int_quant`` and hyperparameters): constant bit-width, rounding, per-tensor state."""

    int_scaling_impl = IntScaling
    input_view_impl = Identity
    bit_width_impl_type = BitWidthImplType.CONST
    float_to_int_impl_type = FloatToIntImplType.ROUND
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    narrow_range = False
    bit_width = 4


class FamilyWeightQuant(FamilyQuant, WeightQuantSolver):
    """A family's weight injector: the shared :class:`daq_brevitas.core.WeightTensorQuant`, the QONNX-only
    proxy, signed integers, state per tensor or per output channel (``ch_axis``)."""

    proxy_class = DAQWeightQuantProxy
    tensor_quant = WeightTensorQuant
    signed = True
    num_channels = 1

    @value
    def ch_axis(output_channel_dim):
        return output_channel_dim


class FamilyActQuant(FamilyQuant, ActQuantSolver):
    """A family's activation injector: the shared :class:`daq_brevitas.core.ActTensorQuant`, the QONNX-only
    proxy, unsigned integers unless ``signed``."""

    proxy_class = DAQActQuantProxy
    tensor_quant = ActTensorQuant
    signed = False


def is_family_quantizer(quant, bases) -> bool:
    """Whether ``quant`` (an injector class) is a subclass of one of ``bases``."""
    try:
        return issubclass(quant, bases)
    except TypeError:
        return False


@value
def per_output_channel(tracked_parameter_list, output_channel_dim):
    """``num_channels`` of a per-channel weight injector: the tracked weight's output channels."""
    return int(tracked_parameter_list[0].shape[output_channel_dim])


class DAQWeightPerTensor(FamilyWeightQuant):
    """DAQ weights (DAQ-SPEC §3): standardised per tensor, learned ``l, u`` (init ±3), learned output
    scale ``s`` (Eq. 3), the ``2^b`` symmetric levels with no zero (Eq. 2), DASR rounding (Eqs. 4-11).

    Brevitas view: signed ``b``-bit integers with ``zero_point = -0.5`` (``b >= 2``); binary
    ``(±s, s, 0, 1)`` at ``b = 1``.
    """

    tensor_quant = DAQWeightTensorQuant
    scaling_impl = DAQWeightScaling
    int_quant = DASRWeightIntQuant
    gamma = daq_core.DEFAULT_GAMMA
    sigma = daq_core.DEFAULT_WEIGHT_SIGMA
    init_bound = 3.0  # l, u = -3, 3 on the standardised weight (DAQ-SPEC §3)
    init = "mse"      # "std": the paper's ±init_bound; "mse": least-error bound per channel (as daq_fx)
    center = None     # None: (W - mean)/std per tensor (the paper), W / rms per channel (as daq_fx)


class DAQWeightPerChannel(DAQWeightPerTensor):
    """:class:`DAQWeightPerTensor` with standardisation, bounds and scale per output channel."""

    scaling_per_output_type = ScalingPerOutputType.CHANNEL
    num_channels = per_output_channel


class DAQActPerTensor(FamilyActQuant):
    """Unsigned DAQ activations for ReLU-like inputs (DAQ-SPEC §4): ``l = 0`` fixed, ``u`` learned
    (init ``3 std`` of the first batch), levels ``Δ Q``, ``Q`` in ``[0, 2^b - 1]``, DASR rounding.
    """

    tensor_quant = DAQActTensorQuant
    scaling_impl = DAQActScaling
    int_quant = DASRActIntQuant
    learn_lower_bound = False
    gamma = daq_core.DEFAULT_GAMMA
    sigma = daq_core.DEFAULT_ACT_SIGMA
    init_num_std = 3.0  # first-batch bounds: 3 std (DAQ-SPEC §4)
    init = "mse"        # "std": exactly those; "mse": least-error bounds among them and fractions of the range

    @value
    def quantizer(learn_lower_bound):
        return "DAQSignedActPerTensor" if learn_lower_bound else "DAQActPerTensor"


class DAQSignedActPerTensor(DAQActPerTensor):
    """Signed DAQ activations (DAQ-SPEC §4): both bounds learned (init ``±3 std`` of the first batch),
    levels ``l + Δ Q``; Brevitas view: signed ints ``Q - 2^(b-1)``, zero point ``-l/Δ - 2^(b-1)``.
    """

    signed = True
    learn_lower_bound = True


def is_daq_quantizer(quant) -> bool:
    """Whether ``quant`` (an injector class) is one of the DAQ quantizers or a subclass."""
    return is_family_quantizer(quant, (DAQWeightPerTensor, DAQActPerTensor))
