"""Brevitas quant proxies for DAQ quantizers: Brevitas's own proxies plus an export guard.

QONNX (``brevitas.export.export_qonnx``) represents the DAQ grids exactly: a ``Quant`` node with
``zero_point = -0.5`` for the no-zero ``2^b``-level weight grid, ``BipolarQuant`` at 1 bit, a float
zero point ``-l/Δ`` for activations. QCDQ / QOp / TorchScript exports cast zero points to integers
and would silently mis-export those grids, so entering any non-QONNX export mode raises
:class:`DAQExportError`. The QONNX handlers for these proxies live in :mod:`daq_brevitas.export`.
"""

from __future__ import annotations

from brevitas.common import ExportMixin
from brevitas.proxy import ActQuantProxyFromInjector, WeightQuantProxyFromInjector

__all__ = ["DAQWeightQuantProxy", "DAQActQuantProxy", "DAQExportError"]


class DAQExportError(RuntimeError):
    """Raised when a DAQ quantizer is exported in a format that cannot represent its grid, or uninitialised."""


UNINITIALISED_EXPORT_MESSAGE = (
    "a DAQ activation quantizer has not seen data yet (its bounds are still placeholders): run at least one "
    "forward pass with representative inputs before exporting, otherwise the bounds would be set from the "
    "export's example input")


def _guarded_export_mode_setter(kind: str):
    base_setter = ExportMixin.export_mode.fset

    def setter(self, value):
        if value and self.is_quant_enabled and not getattr(self.export_handler, "daq_handler", False):
            fmt = type(self.export_handler).__name__ if self.export_handler is not None else "this export format"
            raise DAQExportError(
                f"DAQ {kind} quantizers cannot be exported with {fmt}: only QONNX "
                f"(brevitas.export.export_qonnx) represents DAQ grids exactly. QCDQ/QOp formats cast zero "
                f"points to integers, but DAQ's weight grid (2^b levels, no zero) needs zero_point=-0.5 and DAQ "
                f"activations a real-valued zero point -l/Δ, so the exported model would silently differ.")
        base_setter(self, value)

    return setter


class DAQWeightQuantProxy(WeightQuantProxyFromInjector):
    """``WeightQuantProxyFromInjector`` that refuses non-QONNX exports (see module docstring)."""

    export_mode = property(ExportMixin.export_mode.fget, _guarded_export_mode_setter("weight"))


class DAQActQuantProxy(ActQuantProxyFromInjector):
    """``ActQuantProxyFromInjector`` that refuses non-QONNX exports (see module docstring)."""

    export_mode = property(ExportMixin.export_mode.fget, _guarded_export_mode_setter("activation"))

    def forward(self, x):
        # Brevitas's exporters attach handlers, then run one forward with the example input before
        # entering export mode: an uninitialised quantizer would silently take its bounds from that input.
        if self.export_handler is not None and not self.export_mode and self.is_quant_enabled:
            scaling = self.fused_activation_quant_proxy.tensor_quant.scaling_impl
            if not bool(scaling.initialized):
                raise DAQExportError(UNINITIALISED_EXPORT_MESSAGE)
        return super().forward(x)
