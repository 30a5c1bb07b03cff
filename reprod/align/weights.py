"""The old home of the conversion rules, by-order pairing and weight-file I/O, kept so that existing
``from reprod.align.weights import ...`` lines still work. New code imports from ``reprod.align``
(or ``reprod.align.rules``/``by_order``/``conversion``) and ``reprod.storage.framework_files``.
"""

from __future__ import annotations

from ..storage.framework_files import (
    PADDLE_SUFFIXES,
    TORCH_SUFFIXES,
    load_weights_as_dump,
    read_pdparams,
    read_torch_state_dict,
    write_pdparams,
)
from .by_order import by_order_rules, pair_by_order, pair_weights_by_order
from .conversion import (
    Conversion,
    HeuristicLinearWarning,
    check_fits,
    convert,
    load_into_paddle,
    torch_to_paddle,
)
from .rules import (
    ConversionRules,
    KeyPlan,
    guess_linear_weight,
    linear_weight_names,
    plan_conversion,
)

__all__ = [
    "ConversionRules",
    "KeyPlan",
    "pair_weights_by_order",
    "pair_by_order",
    "by_order_rules",
    "Conversion",
    "HeuristicLinearWarning",
    "TORCH_SUFFIXES",
    "PADDLE_SUFFIXES",
    "convert",
    "torch_to_paddle",
    "plan_conversion",
    "linear_weight_names",
    "guess_linear_weight",
    "read_torch_state_dict",
    "read_pdparams",
    "write_pdparams",
    "load_weights_as_dump",
    "check_fits",
    "load_into_paddle",
]
