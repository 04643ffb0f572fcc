"""daq_brevitas: Distance-aware Quantization (DAQ, ICCV 2021) as Brevitas quantizers.

A thin adapter over :mod:`daq_core`: Brevitas injectors whose ``tensor_quant`` rounds with DASR.
"""

from .core import (DAQActScaling, DAQActTensorQuant, DAQWeightScaling, DAQWeightTensorQuant, DASRActIntQuant,
                   DASRWeightIntQuant)
from .proxy import DAQActQuantProxy, DAQExportError, DAQWeightQuantProxy
from .export import DAQActQuantProxyHandler, DAQWeightQuantProxyHandler, register_qonnx_handlers
from .graph import check_zero_bn_gamma, daq_layer_maps, quantize_model, quantizer_parameters, replace_batchnorm_act
from .quantizers import DAQActPerTensor, DAQSignedActPerTensor, DAQWeightPerChannel, DAQWeightPerTensor, is_daq_quantizer

__all__ = [name for name in dir() if not name.startswith("_")]
