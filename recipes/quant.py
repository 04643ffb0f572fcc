"""The recipes' thin adapter over the quantization back-ends.

Three ``framework`` values share one interface (prepare → train → convert/export):

* ``fx``: DAQ through :mod:`daq_fx` (torch.ao FX graph mode), converted to an x86 int8 model;
* ``brevitas``: DAQ through :mod:`daq_brevitas`, exported to QONNX;
* ``stock``: torch.ao's stock QAT (``FakeQuantize`` with moving-average min/max observers and
  the straight-through estimator), the baseline the DAQ numbers are compared with;
* ``lsq``: torch.ao's learnable fake-quant (LSQ), converted like ``stock``;
* ``brevitas-stock``: Brevitas's own STE quantizers, exported like ``brevitas``
  (see :mod:`recipes.baselines`).

``QuantSpec.rounding`` (fx only) selects the paper's ablations of DAQ: ``"ste"`` and
``"soft"`` with a fixed temperature ``beta``.

Everything framework-specific lives here; the trainer only sees a model, its quantizer
parameters (for the separate Adam group of DAQ-SPEC §6) and a converted model.
"""

from __future__ import annotations

import copy
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

FRAMEWORKS = ("fx", "brevitas", "stock", "lsq", "brevitas-stock")
#: frameworks that go through torch.ao FX (prepare_qat_fx / convert_fx to x86 int8)
FX_FRAMEWORKS = ("fx", "stock", "lsq")
#: DAQ's rounding and the paper's ablations (``daq_core.ROUNDINGS``); fx only
ROUNDINGS = ("dasr", "ste", "soft")
#: the quantizer family inside the fx / brevitas plugins: DAQ, N2UQ (issue 7; DAQ-SPEC §8), or CPQ
#: (issue 17; reconstructed from the abstract, CPQ-SPEC)
QUANTIZERS = ("daq", "n2uq", "cpq")


class QuantError(RuntimeError):
    """A quantization back-end is unavailable or rejected the model."""


def _import_plugin(name: str, entry_point: str):
    try:
        module = importlib.import_module(name)
    except Exception as e:  # pragma: no cover
        raise QuantError(f"{name} cannot be imported: {e}") from e
    if not hasattr(module, entry_point):
        raise QuantError(f"this checkout's {name} does not provide {entry_point} yet")
    return module


def _import_daq_fx():
    return _import_plugin("daq_fx", "prepare_qat_fx")


def _import_daq_brevitas():
    return _import_plugin("daq_brevitas", "quantize_model")


# --------------------------------------------------------------------------------------
# qconfig mappings (FX)
# --------------------------------------------------------------------------------------

def _daq_fx_qconfig_mapping(spec: "QuantSpec"):
    daq_fx = _import_daq_fx()
    kwargs = {}
    if spec.quantizer == "n2uq":
        return daq_fx.get_n2uq_qat_qconfig_mapping(backend=spec.backend, weight_bits=spec.weight_bits,
                                                   act_bits=8 if spec.act_bits >= 32 else spec.act_bits)
    if spec.quantizer == "cpq":
        return daq_fx.get_cpq_qat_qconfig_mapping(backend=spec.backend, weight_bits=spec.weight_bits,
                                                  act_bits=8 if spec.act_bits >= 32 else spec.act_bits,
                                                  learn_bits=spec.learn_bits, **_cpq_options(spec))
    if spec.rounding != "dasr":
        kwargs.update(rounding=spec.rounding, beta=spec.beta)
    if spec.intermediate_act_bits:
        kwargs.update(intermediate_act_bits=spec.intermediate_act_bits)
    return daq_fx.get_daq_qat_qconfig_mapping(backend=spec.backend, weight_bits=spec.weight_bits,
                                              act_bits=8 if spec.act_bits >= 32 else spec.act_bits, **kwargs)


def _cpq_options(spec: "QuantSpec") -> Dict:
    """CPQ's options the recipes expose beyond ``learn_bits`` (only those set)."""
    return {} if spec.drop_rate is None else {"drop_rate": spec.drop_rate}


def _fx_qconfig_mapping(spec: "QuantSpec"):
    from .baselines import lsq_qconfig_mapping, stock_qconfig_mapping

    act_bits = 8 if spec.act_bits >= 32 else spec.act_bits   # A32: activation fake-quants disabled later
    if spec.framework == "fx":
        return _daq_fx_qconfig_mapping(spec)
    if spec.framework == "lsq":
        return lsq_qconfig_mapping(spec.weight_bits, act_bits, spec.backend)
    return stock_qconfig_mapping(spec.weight_bits, act_bits, spec.backend)


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------

@dataclass
class QuantSpec:
    framework: str
    weight_bits: int
    act_bits: int
    float_layers: Sequence[str] = ()
    backend: str = "x86"
    rounding: str = "dasr"
    beta: Optional[float] = None
    quantizer: str = "daq"
    intermediate_act_bits: Optional[int] = None
    #: CPQ: learn each quantizer's bit-width (``weight_bits`` / ``act_bits`` are then the largest ones)
    learn_bits: bool = False
    #: CPQ: the regulariser weight λ (the initial one when a target is given)
    bit_regularization: float = 0.0
    #: CPQ: target average bit-widths (size-weighted), reached by adjusting λ
    target_weight_bits: Optional[float] = None
    target_act_bits: Optional[float] = None
    #: CPQ: DropBits's per-bit drop probability (fixed bit-widths; with learned ones the gates' initial
    #: drop probability); None: daq_core.cpq.DEFAULT_DROP_RATE
    drop_rate: Optional[float] = None
    extra: Dict = field(default_factory=dict)

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise QuantError(f"unknown --framework {self.framework!r}: choose one of {', '.join(FRAMEWORKS)}")
        if self.quantizer not in QUANTIZERS:
            raise QuantError(f"unknown --quantizer {self.quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
        self._check_learned_bits()
        if self.drop_rate is not None:
            if self.quantizer != "cpq":
                raise QuantError(f"--drop-rate sets CPQ's DropBits; it does not apply to --quantizer {self.quantizer}")
            if isinstance(self.drop_rate, bool) or not 0.0 <= float(self.drop_rate) < 1.0:
                raise QuantError(f"--drop-rate must be in [0, 1) (the probability of dropping each droppable bit;"
                                 f" 0 turns DropBits off), got {self.drop_rate!r}")
        if self.quantizer != "daq" and self.framework not in ("fx", "brevitas"):
            raise QuantError(f"--quantizer {self.quantizer} is wired for --framework fx and brevitas, not"
                             f" {self.framework!r} (a baseline with its own quantizer)")
        if self.quantizer != "daq" and self.rounding != "dasr":
            raise QuantError(f"--rounding selects DAQ's ablations; it does not apply to --quantizer {self.quantizer}")
        if self.intermediate_act_bits and (self.framework != "fx" or self.quantizer != "daq"):
            raise QuantError("--intermediate-act-bits is wired for --framework fx with the DAQ quantizer only")
        if self.rounding not in ROUNDINGS:
            raise QuantError(f"unknown --rounding {self.rounding!r}: choose one of {', '.join(ROUNDINGS)}")
        if self.rounding != "dasr" and self.framework != "fx":
            raise QuantError(f"--rounding {self.rounding} (a DAQ ablation) is wired for --framework fx only")
        if (self.rounding == "soft") != (self.beta is not None):
            raise QuantError("--rounding soft needs --beta (a fixed temperature, e.g. 4 or 24), and --beta"
                             " applies to --rounding soft only")
        if self.framework in ("stock", "lsq", "brevitas-stock") and self.weight_bits < 2:
            raise QuantError(f"--framework {self.framework} has no 1-bit weight grid (its signed range at 1 bit is"
                             f" {{-1, 0}}); use 2 bits or more, or --framework fx/brevitas (DAQ: ±1)")


    def _check_learned_bits(self):
        from daq_core import cpq

        try:
            self.bit_regularization = cpq.check_regularization(self.bit_regularization)
            targets = {"weight": cpq.check_target_bits(self.target_weight_bits, "--target-avg-bits (weights)"),
                       "activation": cpq.check_target_bits(self.target_act_bits, "--target-avg-bits (activations)")}
        except (TypeError, ValueError) as e:
            raise QuantError(str(e).replace("the bit-width regularizer weight", "--bit-regularization")) from e
        if not self.learn_bits:
            if any(t is not None for t in targets.values()) or self.bit_regularization:
                raise QuantError("--target-avg-bits and --bit-regularization steer learned bit-widths: add"
                                 " --learn-bits (with --quantizer cpq)")
            return
        if self.quantizer != "cpq":
            raise QuantError(f"--learn-bits needs --quantizer cpq (CPQ's DropBits gates learn the bit-widths);"
                             f" {self.quantizer} has fixed bit-widths")
        if self.framework not in ("fx", "brevitas"):
            raise QuantError(f"--framework {self.framework} cannot hold a learned bit-width (its quantizers have"
                             f" one fixed grid per layer); CPQ learned bit-widths are wired for --framework fx (x86"
                             f" int model, each layer at its own bit-width) and brevitas (per-layer QONNX bit-widths)")
        if self.act_bits >= 32 and targets["activation"] is not None:
            raise QuantError("a target activation bit-width needs quantized activations: --bits WxA32 keeps them"
                             " in float")
        floor = cpq.DEFAULT_MIN_LEARNED_BITS["weight"]
        if targets["weight"] is not None and targets["weight"] < floor:
            raise QuantError(f"--target-avg-bits asks {targets['weight']:g} weight bits on average, but learned weight"
                             f" bit-widths stop at {floor} (CPQ's signed 1-bit grid {{-1, 0}} has no positive weight);"
                             f" ask {floor} or more, or train 1-bit weights with fixed bits (--quantizer daq: ±1)")
        for role, maximum in (("weight", self.weight_bits), ("activation", self.act_bits)):
            if targets[role] is not None and targets[role] > maximum:
                raise QuantError(f"--target-avg-bits asks {targets[role]:g} {role} bits on average, above the"
                                 f" largest bit-width {maximum} of --bits: learned bit-widths only drop bits; raise"
                                 f" --bits (e.g. W8A8) or lower the target")


def prepare(model: nn.Module, spec: QuantSpec, example_inputs) -> nn.Module:
    """Insert the quantizers; the returned model is in train mode and ready for QAT."""
    from .models import unfuse_batchnorm_act

    if spec.framework in FX_FRAMEWORKS:
        try:  # the same model surgery for DAQ and the baselines (BatchNormAct2d split, ReLU6 -> ReLU)
            from daq_fx import prepare_timm_model
            model = prepare_timm_model(model, relu6_to_relu=True)
        except ImportError:
            model = unfuse_batchnorm_act(model, relu6_to_relu=True)
    else:
        model = unfuse_batchnorm_act(model)
    model.train()
    float_acts = spec.act_bits >= 32
    if float_acts and spec.framework not in FX_FRAMEWORKS:
        raise QuantError(f"float activations (A32) are not wired for --framework {spec.framework} in the recipes;"
                         " use --framework fx (weight-only DAQ, reported as QAT accuracy)")
    if spec.framework in FX_FRAMEWORKS:
        from torch.ao.quantization.quantize_fx import prepare_qat_fx as stock_prepare

        mapping = _fx_qconfig_mapping(spec)
        for name in spec.float_layers:
            mapping = mapping.set_module_name(name, None)
        if spec.framework == "fx":
            prepared = _import_daq_fx().prepare_qat_fx(model, mapping, example_inputs)
        else:
            prepared = stock_prepare(model, mapping, example_inputs)
        if float_acts:
            from torch.ao.quantization import FakeQuantizeBase

            for name, mod in prepared.named_modules():
                if isinstance(mod, FakeQuantizeBase) and not name.endswith("weight_fake_quant"):
                    mod.disable_fake_quant()
                    mod.disable_observer()
        return prepared
    daq_brevitas = _import_daq_brevitas()
    kwargs = {}
    if spec.quantizer in ("n2uq", "cpq"):
        kwargs["quantizer"] = spec.quantizer
    if spec.quantizer == "cpq" and (spec.learn_bits or spec.drop_rate is not None):
        kwargs["family_options"] = {"learn_bits": spec.learn_bits, **_cpq_options(spec)}
    if spec.framework == "brevitas-stock":
        from .baselines import brevitas_stock_quantizers

        kwargs = dict(zip(("weight_quant", "act_quant", "signed_act_quant"), brevitas_stock_quantizers()))
    # daq_brevitas keeps "the first and the last weight layer" in float (the recipes' float_layers)
    return daq_brevitas.quantize_model(model, weight_bit_width=spec.weight_bits, act_bit_width=spec.act_bits,
                                       keep_first_last_float=bool(spec.float_layers), **kwargs)


def calibrate(model: nn.Module, spec: QuantSpec, batch: torch.Tensor, correct_bias: bool = True) -> List[str]:
    """Data-driven output scales and bias correction after initialisation (fx DAQ; else a no-op).

    See :func:`daq_fx.calibrate_output_scales` (DAQ-SPEC §5); ``correct_bias`` only with frozen BN
    (the recipes pass ``--freeze-bn``). Returns the corrected layers.
    """
    if spec.quantizer == "n2uq" and correct_bias:
        reestimate_batchnorm(model, batch)
        return []
    if spec.framework != "fx" or spec.quantizer != "daq":
        return []
    return _import_daq_fx().calibrate_output_scales(getattr(model, "module", model), batch,
                                                    correct_bias=correct_bias)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batch: torch.Tensor) -> int:
    """BN running statistics re-estimated on ``batch`` through the quantized model; returns the BN count.

    N2UQ's weight quantizer (``alpha = (n / 2^(b-1)) mean|W|``, no learned output scale) clips and
    shrinks each conv: the projection of its weights on the float ones is ~0.83 at 4 bits and ~0.75
    at 2 bits on the trained CIFAR ResNet-20. With the float model's BN statistics kept (``--freeze-bn``)
    that loss compounds over the layers: right after prepare the model scored 17% (W4A4) and 10%
    (W2A2) on the test images. Re-estimated on the 128-image calibration batch: 79% and 42%. DAQ
    needs no such step: its output scale is calibrated instead (:func:`calibrate`).
    Quantizer state is not touched (initialised already; N2UQ's forward does not update it).
    """
    net = getattr(model, "module", model)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    modes = {m: m.training for m in net.modules()}
    momenta = {m: m.momentum for m in bns}
    net.eval()                     # dropout off; quantizers are initialised and frozen by their flags
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over what is run: here, the whole batch
        m.train()
    try:
        with torch.random.fork_rng(devices=[]):
            net(batch)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return len(bns)


def quantizer_parameters(model: nn.Module, spec: QuantSpec) -> List[nn.Parameter]:
    """The learned quantizer parameters (bounds, output scales): DAQ-SPEC §6's Adam group."""
    model = getattr(model, "module", model)
    lib = None
    if spec.framework == "fx":
        lib = _import_daq_fx()
    elif spec.framework == "brevitas":
        lib = _import_daq_brevitas()
    if lib is not None and hasattr(lib, "quantizer_parameters"):
        got = lib.quantizer_parameters(model)
        if isinstance(got, tuple) and len(got) == 2 and all(isinstance(g, (list, tuple)) for g in got):
            got = got[0]  # daq_fx returns (quantizer_params, other_params)
        return list(got)
    # generic fallback: parameters owned by fake-quant / quantizer modules
    from torch.ao.quantization import FakeQuantizeBase

    seen, out = set(), []
    for mod in model.modules():
        owned = isinstance(mod, FakeQuantizeBase) or "quant" in type(mod).__name__.lower() and not hasattr(mod, "weight")
        if owned:
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def convert(qat_model: nn.Module, spec: QuantSpec, out_dir: Optional[Path] = None, example_inputs=None):
    """Convert (fx/stock: x86 int8 model) or export (brevitas: QONNX) a trained QAT model.

    Returns ``(int_model, artifacts)``: ``int_model`` is a callable torch module on CPU
    (None where the back-end only exports a file), ``artifacts`` names written files.
    """
    model = copy.deepcopy(getattr(qat_model, "module", qat_model)).cpu().eval()
    artifacts: Dict[str, str] = {}
    if spec.act_bits >= 32:
        artifacts["note"] = ("float activations (A32): torch.ao has no x86 int8 kernel for weight-only convs,"
                             " so no int model is built; the QAT accuracy is the result")
        return None, artifacts
    if spec.quantizer == "cpq":
        artifacts["cpq"] = "CPQ (reconstructed from the abstract; CPQ-SPEC, docs/cpq.md)"
    if spec.quantizer == "n2uq":
        artifacts["note"] = ("N2UQ's learned non-uniform activation thresholds have no int8-kernel or QONNX"
                             " equivalent: daq_fx.convert_fx and the QONNX export refuse it rather than convert"
                             " with uniform thresholds; the QAT accuracy is the result")
        return None, artifacts
    if spec.framework in FX_FRAMEWORKS:
        torch.backends.quantized.engine = spec.backend if spec.backend in torch.backends.quantized.supported_engines \
            else torch.backends.quantized.engine
        if spec.framework == "fx":
            kwargs = {}
            if example_inputs is not None:  # CPU inputs (prepare may have seen CUDA ones)
                kwargs["example_inputs"] = tuple(x.cpu() for x in example_inputs)
            int_model = _import_daq_fx().convert_fx(model, **kwargs)
        else:
            from torch.ao.quantization.quantize_fx import convert_fx

            int_model = convert_fx(model)
        return int_model.eval(), artifacts
    _import_daq_brevitas()  # registers the DAQ QONNX handlers
    if out_dir is not None and example_inputs is not None:
        from brevitas.export import export_qonnx

        path = Path(out_dir) / "model.qonnx.onnx"
        try:
            export_qonnx(model, args=example_inputs[0].cpu(), export_path=str(path))
            artifacts["qonnx"] = str(path)
        except Exception as e:  # noqa: BLE001 - export problems are reported, not fatal
            artifacts["qonnx_error"] = f"{type(e).__name__}: {e}"
    return None, artifacts


class QONNXRunner(nn.Module):
    """Run an exported QONNX file with the ``qonnx`` executor (reference semantics, slow).

    Used to check the exported model against the Brevitas QAT model on a few images. The file
    must have been exported with the batch size it is called with.
    """

    def __init__(self, path: str):
        super().__init__()
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.infer_shapes import InferShapes

        self.model = ModelWrapper(path).transform(InferShapes())
        self.inp = self.model.graph.input[0].name
        self.out = self.model.graph.output[0].name

    def forward(self, x):
        from qonnx.core.onnx_exec import execute_onnx

        res = execute_onnx(self.model, {self.inp: x.detach().cpu().numpy()})
        return torch.from_numpy(res[self.out])


def model_size_bits(qat_model: nn.Module, spec: QuantSpec) -> Dict[str, int]:
    """Storage of the deployable model: quantized weights at ``weight_bits``, all else 32-bit.

    Counts every weight that has a weight quantizer at ``weight_bits`` per element and every
    other parameter and BN running statistic (biases, float layers, BN) at 32 bits; quantizer
    parameters are not counted (they become a few per-layer scales).
    """
    model = getattr(qat_model, "module", qat_model)
    qparams = {id(p) for p in quantizer_parameters(model, spec)}
    quant_weights = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and (hasattr(mod, "weight_fake_quant") or hasattr(mod, "weight_quant")):
            quant_weights[id(w)] = _learned_weight_bits(mod) or spec.weight_bits
    q_bits = f_bits = 0
    float_params = 0
    for p in model.parameters():
        if id(p) in qparams:
            continue
        if id(p) in quant_weights:
            q_bits += p.numel() * quant_weights[id(p)]
        else:
            f_bits += p.numel() * 32
            float_params += p.numel()
    for name, b in model.named_buffers():
        if name.endswith("running_mean") or name.endswith("running_var"):
            f_bits += b.numel() * 32
    return {"quantized_weight_bits": q_bits, "float_bits": f_bits, "total_bits": q_bits + f_bits,
            "float_params": float_params}


def _learned_weight_bits(module: nn.Module) -> Optional[int]:
    """The learned bit-width of a layer's CPQ weight quantizer (None for fixed-bit quantizers)."""
    from daq_core.family import FamilyStateMixin

    holder = getattr(module, "weight_fake_quant", None) or getattr(module, "weight_quant", None)
    if holder is None:
        return None
    for sub in holder.modules():
        if isinstance(sub, FamilyStateMixin) and sub.family.learns_bits:
            return int(sub.bit_width)
    return None


# --------------------------------------------------------------------------------------
# CPQ learned bit-widths (CPQ-SPEC §6)
# --------------------------------------------------------------------------------------

def bit_budget(spec: QuantSpec):
    """The regulariser and λ controller of a ``--learn-bits`` run (None otherwise)."""
    if not spec.learn_bits:
        return None
    from daq_core.cpq import BitBudget

    return BitBudget(spec.bit_regularization, spec.target_weight_bits, spec.target_act_bits)


def gate_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The bit gates (``gate_logits``) of every CPQ quantizer: trained with their own, faster Adam group."""
    from daq_core.family import family_modules

    return [m.gate_logits for m in family_modules(getattr(model, "module", model)).values()
            if getattr(m, "gate_logits", None) is not None]


def layer_bits(model: nn.Module, spec: QuantSpec) -> Dict[str, Dict[str, Optional[int]]]:
    """``{layer: {"weight": b, "activation": b}}`` of a CPQ model (empty for other quantizers)."""
    if spec.quantizer != "cpq":
        return {}
    model = getattr(model, "module", model)
    lib = _import_daq_fx() if spec.framework == "fx" else _import_daq_brevitas()
    return lib.layer_bit_widths(model)


@torch.no_grad()
def grid_distance(model: nn.Module, spec: QuantSpec) -> Optional[float]:
    """CPQ-SPEC §7's clustering measure: the mean distance of the full-precision weights to their nearest
    grid point, in units of the grid step (0: on the grid; 0.25: uniform between points).

    Over every weight of every layer with a torch.ao weight fake-quant whose grid is ``scale · k``
    (CPQ, the stock STE ``FakeQuantize``, LSQ), the weight as the fake-quant sees it (BN folded),
    elements inside the clipping range only. ``None`` for other quantizers (DAQ/N2UQ's grids
    standardise or use odd integers) and for Brevitas.
    """
    if spec.framework not in FX_FRAMEWORKS or spec.quantizer in ("daq", "n2uq") and spec.framework == "fx":
        return None
    from torch.ao.quantization import FakeQuantizeBase

    try:
        from daq_fx.prepare import folded_weight
    except ImportError:  # pragma: no cover
        return None
    total = count = 0.0
    for module in getattr(model, "module", model).modules():
        fq = getattr(module, "weight_fake_quant", None)
        if not isinstance(fq, FakeQuantizeBase) or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        scale, zero_point = fq.calculate_qparams()
        w = folded_weight(module).float()
        shape = [-1] + [1] * (w.dim() - 1) if scale.numel() > 1 else [1] * w.dim()
        t = w / scale.float().reshape(shape) + zero_point.float().reshape(shape)
        inside = (t >= fq.quant_min) & (t <= fq.quant_max)
        total += float((t - torch.round(t)).abs()[inside].sum())
        count += float(inside.sum())
    return total / count if count else None


def float_size_bits(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) * 32


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass (batch of ``example``), milliseconds, CPU."""
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]
