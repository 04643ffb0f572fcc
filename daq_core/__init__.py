"""daq_core: the framework-free numerics of Distance-aware Quantization (DAQ, ICCV 2021).

No torch.ao or Brevitas imports live here; ``daq_fx`` and ``daq_brevitas`` are thin
adapters over these functions.
"""

from .checks import (
    MAX_BITS,
    MAX_INT8_WEIGHT_BITS,
    MIN_BITS,
    check_bits,
    check_bounds,
    check_finite,
    check_floating,
    check_positive,
)
from .dasr import (
    DEFAULT_ACT_SIGMA,
    DEFAULT_GAMMA,
    DEFAULT_WEIGHT_SIGMA,
    assignment_offset,
    dasr,
    dasr_gradient,
    dasr_gradient_constant,
    soft_assignment,
)
from .quantizers import (
    ROUNDINGS,
    activation_integers,
    check_rounding,
    compiled_kernels_enabled,
    daq_fake_quantize,
    fake_quantize_activation,
    fake_quantize_weight,
    floor_weight_scale,
    init_activation_bounds,
    init_weight_scale,
    integer_aligned_lower_bound,
    normalize,
    num_levels,
    standardize,
    use_compiled_kernels,
    weight_integers,
)

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]

from .n2uq import n2uq_activation, n2uq_init_widths, n2uq_thresholds, n2uq_weight, n2uq_weight_alpha  # noqa: E402

__all__ += ["n2uq_activation", "n2uq_init_widths", "n2uq_thresholds", "n2uq_weight", "n2uq_weight_alpha"]

from .init import (  # noqa: E402
    MIN_ACTIVATION_RANGE,
    WEIGHT_BOUND_CANDIDATES,
    DAQInitWarning,
    check_init_method,
    fit_weight_scale,
    init_activation_quantizer,
    init_weight_quantizer,
    normalize_weight,
    output_scale_correction,
    widen_degenerate_range,
)

__all__ += ["MIN_ACTIVATION_RANGE", "DAQInitWarning", "widen_degenerate_range",
            "WEIGHT_BOUND_CANDIDATES", "check_init_method", "fit_weight_scale", "init_activation_quantizer",
            "init_weight_quantizer", "normalize_weight", "output_scale_correction"]

from .params import split_parameters  # noqa: E402

__all__ += ["split_parameters"]

from .family import ACTIVATION, WEIGHT, FamilyQuantizer, FamilyStateMixin, QuantizerFamily, family_modules  # noqa: E402
from . import cpq  # noqa: E402
from .cpq import CPQ, BitBudget, bit_regularizer, cpq_fake_quantize  # noqa: E402

__all__ += ["ACTIVATION", "WEIGHT", "FamilyQuantizer", "FamilyStateMixin", "QuantizerFamily", "family_modules",
            "cpq", "CPQ", "BitBudget", "bit_regularizer", "cpq_fake_quantize"]
