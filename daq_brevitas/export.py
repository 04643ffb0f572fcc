"""QONNX export of DAQ quantizers (``brevitas.export.export_qonnx``), exact for the DAQ grids.

Brevitas looks proxy handlers up by exact type, so the DAQ proxies get their own QONNX handlers,
registered with Brevitas's QONNX managers (TorchScript and dynamo) when ``daq_brevitas`` is imported:

* weights, ``b >= 2``: ``Quant(w_q, scale=2|s|/n, zeropt=-0.5, bitwidth=b, signed=1, narrow=0)``;
  the exported tensor is the DAQ-quantized weight, so re-quantization is exact;
* weights, ``b = 1``: ``BipolarQuant(w_q, |s|)`` (Brevitas's binary convention);
* activations: ``Quant(x, scale=Δ, zeropt=-l/Δ [- 2^(b-1) if signed], bitwidth=b)``, which computes
  ``l + Δ clamp(round((x - l)/Δ), 0, n)`` — the DAQ forward (DASR's forward is exact rounding). At
  ``b = 1`` an unsigned ``Quant`` node with ``bitwidth=1`` is emitted (Brevitas would emit
  ``BipolarQuant`` and qonnx runs signed 1-bit ``Quant`` as bipolar; neither has DAQ's levels ``{l, u}``).

Example:
    >>> from brevitas.export import export_qonnx
    >>> export_qonnx(qmodel.eval(), args=torch.randn(1, 3, 32, 32), export_path="daq.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

from brevitas.export.onnx.qonnx.function import BrevitasQuantOp
from brevitas.export.onnx.qonnx.handler import BrevitasActQuantProxyHandler, BrevitasWeightQuantProxyHandler
from brevitas.export.onnx.qonnx.manager import QONNXManager

from .proxy import UNINITIALISED_EXPORT_MESSAGE, DAQActQuantProxy, DAQExportError, DAQWeightQuantProxy

__all__ = ["DAQWeightQuantProxyHandler", "DAQActQuantProxyHandler", "register_qonnx_handlers"]


class DAQWeightQuantProxyHandler(BrevitasWeightQuantProxyHandler):
    """QONNX handler for :class:`DAQWeightQuantProxy` (``Quant`` with zero point -0.5; ``BipolarQuant`` at 1 bit)."""

    handled_layer = DAQWeightQuantProxy
    daq_handler = True

    def prepare_for_export(self, module):
        super().prepare_for_export(module)  # also computes ``quant_weight_values`` (the DAQ-quantized weights)
        if module.is_quant_enabled:
            self.quant_weight_values = {k: v.detach() for k, v in self.quant_weight_values.items()}

    def symbolic_execution(self, x):
        # Brevitas's handler would re-quantize the float weight with round(w/scale + zp): not DAQ's mapping
        # (standardise, clip to [l, u]). Feed the DAQ-quantized weight instead; on the grid that is exact.
        values = self.quant_weight_values
        if len(values) == 1:
            x = next(iter(values.values()))
        else:  # a proxy shared by several layers: match by storage
            x = values[x.data_ptr()]
        return super().symbolic_execution(x)


class DAQActQuantProxyHandler(BrevitasActQuantProxyHandler):
    """QONNX handler for :class:`DAQActQuantProxy`: always a ``Quant`` node, also at 1 bit."""

    handled_layer = DAQActQuantProxy
    daq_handler = True

    def validate(self, module):  # DAQ activations are per tensor; a 1-bit zero point is legitimate
        pass

    def prepare_for_export(self, module):
        if module.is_quant_enabled:
            scaling = module.fused_activation_quant_proxy.tensor_quant.scaling_impl
            if not bool(scaling.initialized):
                raise DAQExportError(UNINITIALISED_EXPORT_MESSAGE)
        super().prepare_for_export(module)
        if module.is_quant_enabled:
            self.quant_op = BrevitasQuantOp
            kw = self.symbolic_kwargs
            if int(kw["bit_width"]) == 1 and kw["signed"]:
                # qonnx executes every signed 1-bit Quant as bipolar (±1): export the same two levels
                # {l, u} as unsigned integers {0, 1} with zero point -l/Δ instead of {-1, 0}, -l/Δ - 1
                kw["signed"] = False
                kw["zero_point"] = kw["zero_point"] + 1.0


def register_qonnx_handlers() -> None:
    """Add the DAQ handlers to Brevitas's QONNX managers (idempotent; done on import)."""
    for handler in (DAQWeightQuantProxyHandler, DAQActQuantProxyHandler):
        if handler not in QONNXManager.handlers:
            QONNXManager.handlers.insert(0, handler)


register_qonnx_handlers()
