"""Brevitas quant proxies for DAQ quantizers: Brevitas's own proxies plus an export guard.

QONNX (``brevitas.export.export_qonnx``) represents the DAQ grids exactly: a ``Quant`` node with
``zero_point = -0.5`` for the no-zero ``2^b``-level weight grid, ``BipolarQuant`` at 1 bit, a float
zero point ``-l/Δ`` for activations. QCDQ / QOp / TorchScript exports cast zero points to integers
and would silently mis-export those grids, so entering any non-QONNX export mode raises.
"""

from __future__ import annotations

from brevitas.common import ExportMixin
from brevitas.proxy import ActQuantProxyFromInjector, WeightQuantProxyFromInjector

__all__ = ["DAQWeightQuantProxy", "DAQActQuantProxy", "DAQExportError"]


class DAQExportError(RuntimeError):
    """Raised when a DAQ quantizer is exported in a format that cannot represent its grid."""


def _is_qonnx_handler(handler) -> bool:
    return type(handler).__module__.startswith("brevitas.export.onnx.qonnx")


def _guarded_export_mode_setter(kind: str):
    base_setter = ExportMixin.export_mode.fset

    def setter(self, value):
        if value and self.export_handler is not None and self.is_quant_enabled:
            if not _is_qonnx_handler(self.export_handler):
                raise DAQExportError(
                    f"DAQ {kind} quantizers cannot be exported with {type(self.export_handler).__name__}: "
                    f"that format casts zero points to integers, but DAQ's weight grid (2^b levels, no zero) "
                    f"needs zero_point=-0.5 and DAQ activations a real-valued zero point -l/Δ, so the "
                    f"exported model would silently differ. Export with brevitas.export.export_qonnx "
                    f"(exact) instead.")
            if kind == "activation" and int(self.bit_width()) == 1:
                raise DAQExportError(
                    "1-bit DAQ activations cannot be exported to QONNX: Brevitas exports every 1-bit "
                    "quantizer as BipolarQuant (±scale), but DAQ's 1-bit activation levels are {l, u}. "
                    "Use act bit_width >= 2 for export.")
        base_setter(self, value)

    return setter


class DAQWeightQuantProxy(WeightQuantProxyFromInjector):
    """``WeightQuantProxyFromInjector`` that refuses non-QONNX exports (see module docstring)."""

    export_mode = property(ExportMixin.export_mode.fget, _guarded_export_mode_setter("weight"))


class DAQActQuantProxy(ActQuantProxyFromInjector):
    """``ActQuantProxyFromInjector`` that refuses non-QONNX exports and 1-bit activation export."""

    export_mode = property(ExportMixin.export_mode.fget, _guarded_export_mode_setter("activation"))
