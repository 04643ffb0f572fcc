"""daq_fx: Distance-aware Quantization (DAQ, ICCV 2021) for torch.ao FX graph-mode QAT.

Typical use::

    import timm, torch, daq_fx
    model = timm.create_model("mobilenetv2_100", pretrained=True)
    example = (torch.randn(1, 3, 224, 224),)
    qat = daq_fx.prepare_qat_fx(model, daq_fx.get_daq_qat_qconfig_mapping("x86", 4, 4), example)
    ...  # train qat (quantizer parameters: daq_fx.quantizer_parameters(qat))
    int8 = daq_fx.convert_fx(qat.eval())
"""

from .convert import (
    ExactQuantizedConv,
    activation_grids,
    bake_daq_weights,
    bake_weight,
    convert_fx,
    exact_saturating_layers,
    insert_activation_clamps,
    output_agreement,
    quantized_zero_padding,
)
from .fake_quantize import ACTIVATION, WEIGHT, AveragedActivation, DAQFakeQuantize, FamilyFakeQuantize
from .n2uq import (
    N2UQConvertError,
    N2UQFakeQuantize,
    get_n2uq_qat_qconfig_mapping,
    get_n2uq_qconfig,
    n2uq_activation_quantizers,
)
from .cpq import CPQBackendError, CPQFakeQuantize, get_cpq_qat_qconfig_mapping, get_cpq_qconfig, layer_bit_widths
from .params import quantizer_parameters
from .prepare import (
    DAQPrepareError,
    check_batchnorm,
    dropout_follows_training,
    initialize_weight_quantizers,
    prepare_qat_fx,
    prepare_timm_model,
    static_same_padding,
    static_shape_modules,
    weight_fold_factor,
    widen_intermediate_activations,
)
from .qconfig import (
    BACKENDS,
    family_qat_qconfig_mapping,
    family_qconfig,
    first_and_last_layer_names,
    get_daq_backend_config,
    get_daq_qat_qconfig_mapping,
    get_daq_qconfig,
)

__all__ = [name for name in dir() if not name.startswith("_")]

from .calibrate import calibrate_output_scales  # noqa: E402

__all__ += ["calibrate_output_scales"]


def __getattr__(name):
    """``daq_fx.pt2e`` (torchao's pt2e flow) and ``daq_fx.export_onnx`` (ONNX Runtime) are imported on first
    use: torchao and onnx / onnxruntime are optional (extras ``pt2e`` and ``export``)."""
    if name in ("pt2e", "export_onnx"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
