"""The porting workflow, torch -> Paddle: check the structure, convert the weights, then align the
forward pass and training steps.

>>> from reprod.align import compare_structure, load_into_paddle, align_forward, align_train
>>> print(compare_structure(torch_model, paddle_model).to_table(only_problems=True))
>>> load_into_paddle(paddle_model, torch_model)            # or torch_to_paddle(...) / reprod-convert
>>> load_into_paddle(paddle_model, torch_model, by_order=True)   # names differ: pair by order
>>> align_forward(torch_model, paddle_model, {"x": x}, out_dir="result").passed
>>> align_forward(torch_model, paddle_model, {"x": x}, calibrate=True).passed  # vs float32 noise
>>> align_onnx(torch_model, "model.onnx", x).passed        # a torch model against its ONNX export

Modules: ``rules`` (the torch -> Paddle name and layout rules, planned per key), ``by_order``
(pairing state dicts by definition order), ``conversion`` (convert, check, load), ``structure``,
``steps``. The weight files themselves are read and written by ``reprod.storage.framework_files``
(re-exported here).

Importing this package imports neither torch nor paddle; each function imports what it is handed.
"""

from __future__ import annotations

from ..storage.framework_files import (
    load_weights_as_dump,
    read_pdparams,
    read_torch_state_dict,
    write_pdparams,
)
from .by_order import by_order_rules, pair_by_order, pair_weights_by_order
from .calls import OpEvent, SettingsTrace, trace_settings
from .conversion import (
    Conversion,
    HeuristicLinearWarning,
    check_fits,
    convert,
    load_into_paddle,
    torch_to_paddle,
)
from .fold import fold_conv_biases
from .onnx_export import align_onnx
from .rules import ConversionRules, KeyPlan, linear_weight_names, plan_conversion
from .settings import SettingDiff, SettingsReport, compare_settings, layer_settings, save_settings
from .steps import KNOWN_DIFFERENCES, align_forward, align_train, noise_multiples
from .structure import LayerCount, StructureReport, StructureRow, compare_structure

__all__ = [
    "compare_structure",
    "compare_settings",
    "layer_settings",
    "save_settings",
    "trace_settings",
    "SettingsTrace",
    "OpEvent",
    "SettingsReport",
    "SettingDiff",
    "StructureReport",
    "StructureRow",
    "LayerCount",
    "torch_to_paddle",
    "convert",
    "Conversion",
    "ConversionRules",
    "KeyPlan",
    "plan_conversion",
    "pair_weights_by_order",
    "pair_by_order",  # deprecated: pair_weights_by_order
    "by_order_rules",
    "linear_weight_names",
    "HeuristicLinearWarning",
    "read_torch_state_dict",
    "read_pdparams",
    "write_pdparams",
    "load_weights_as_dump",
    "check_fits",
    "load_into_paddle",
    "fold_conv_biases",
    "align_forward",
    "align_train",
    "align_onnx",
    "noise_multiples",
    "KNOWN_DIFFERENCES",
]
