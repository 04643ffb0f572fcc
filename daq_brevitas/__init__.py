"""daq_brevitas: Distance-aware Quantization (DAQ, ICCV 2021) as Brevitas quantizers.

A thin adapter over :mod:`daq_core`: Brevitas injectors whose ``tensor_quant`` rounds with DASR.
"""

from .core import (DAQActScaling, DAQActTensorQuant, DAQWeightScaling, DAQWeightTensorQuant, DASRActIntQuant,
                   DASRWeightIntQuant)
from .proxy import DAQActQuantProxy, DAQExportError, DAQWeightQuantProxy
from .quantizers import DAQActPerTensor, DAQSignedActPerTensor, DAQWeightPerChannel, DAQWeightPerTensor, is_daq_quantizer

__all__ = [name for name in dir() if not name.startswith("_")]
