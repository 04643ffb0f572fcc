"""daq_brevitas: Distance-aware Quantization (DAQ, ICCV 2021) as Brevitas quantizers.

A thin adapter over :mod:`daq_core`: Brevitas injectors whose ``tensor_quant`` rounds with DASR,
the N2UQ comparison family (:mod:`daq_brevitas.n2uq`; ``quantize_model(..., quantizer="n2uq")``) and CPQ
(:mod:`daq_brevitas.cpq`; ``quantize_model(..., quantizer="cpq", family_options={"learn_bits": True})``),
all through the shared ``WeightTensorQuant`` / ``ActTensorQuant`` (:mod:`daq_brevitas.family` hosts any
:class:`daq_core.family.QuantizerFamily`).
"""

from .core import (DAQActScaling, DAQActTensorQuant, DAQWeightScaling, DAQWeightTensorQuant, DASRActIntQuant,
                   DASRWeightIntQuant)
from .proxy import DAQActQuantProxy, DAQExportError, DAQWeightQuantProxy
from .export import DAQActQuantProxyHandler, DAQWeightQuantProxyHandler, register_qonnx_handlers
from .n2uq import (N2UQActIntQuant, N2UQActPerTensor, N2UQActQuantProxy, N2UQActScaling, N2UQActTensorQuant,
                   N2UQSignedActPerTensor, N2UQWeightIntQuant, N2UQWeightPerChannel, N2UQWeightPerTensor,
                   N2UQWeightScaling, N2UQWeightTensorQuant, is_n2uq_quantizer)
from .graph import check_zero_bn_gamma, daq_layer_maps, quantize_model, quantizer_parameters, replace_batchnorm_act
from .quantizers import (DAQActPerTensor, DAQSignedActPerTensor, DAQWeightPerChannel, DAQWeightPerTensor,
                         FamilyActQuant, FamilyWeightQuant, is_daq_quantizer)
from .core import ActTensorQuant, WeightTensorQuant
from .family import FamilyIntQuant, FamilyScaling
from .cpq import (CPQActPerTensor, CPQSignedActPerTensor, CPQWeightPerChannel, CPQWeightPerTensor, is_cpq_quantizer,
                  layer_bit_widths)

__all__ = [name for name in dir() if not name.startswith("_")]
