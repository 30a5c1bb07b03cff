"""What a localisation adds to the layer it names, on captures compared as ``first_divergence``
reads them (framework-free): no diagnosis where the layer's input already differs (BlenderbotSmall's
port dropping the decoder's embedding scale fit as the next LayerNorm's epsilon, 6.4e-4 for 1e-5,
though both are 1e-5), and, uncalibrated, a layer whose output differs no more than its
"aligned" input is said to carry rounding on (MobileBERT's correct port failed at 1e-5, named
at a Linear 1.2e-4 off in, 1.0e-4 out). tests/realworld runs neither pair (porters' repros)."""

from __future__ import annotations

import numpy as np

import reprod
from reprod.align.localise import _carried_rounding, _hint_of
from reprod.capture import first_divergence

ROWS = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8)


def _div(in_max: float, out_off: float, threshold: float = 1e-5):
    """The input off on a few elements by ``in_max`` (its mean under the threshold: aligned),
    the output off by ``out_off`` on every element, as a Linear spreads its input's rounding."""
    ref = {"a.in": ROWS, "a.out": ROWS * 2, "b.in": ROWS * 2, "b.out": ROWS * 3}
    other = dict(ref)
    other["b.in"] = ref["b.in"].copy()
    other["b.in"].flat[::16] += in_max  # 4 of 64 elements
    other["b.out"] = ref["b.out"] + np.float32(out_off)
    result = reprod.compare(ref, other, method="mean", threshold=threshold)
    return first_divergence(result), result


def test_rounding_carried_on_is_said_where_the_output_differs_no_more_than_the_input() -> None:
    # MobileBERT's: input 1.2e-4 off at most (its mean under 1e-5), output 1.0e-4 off
    div, _ = _div(1.2e-4, 1e-4)
    assert div.layer == "b" and div.input_aligned
    hint = _carried_rounding(div)
    assert hint.startswith("its output differs no more than its input (max 0.00012 in, "
                           "0.0001 out): likely float32 rounding carried on"), hint
    assert hint.endswith("calibrate=True judges each key against the reference's own rounding")


def test_an_output_that_grows_is_no_rounding_carried_on() -> None:
    div, _ = _div(1.2e-4, 5e-4)
    assert div.layer == "b" and div.input_aligned and div.output.max_abs > div.input.max_abs
    assert _carried_rounding(div) is None


def test_no_diagnosis_where_the_input_already_differs() -> None:
    div, result = _div(1e-2, 1e-2)
    assert div.input_aligned is False
    # a note diagnose would add to the output: not passed on as the layer's hint
    noted = {k.key: k for k in result.results}
    plain = dict(noted)
    import dataclasses

    out = dataclasses.replace(div.output, note="LayerNorm epsilon: port uses ~6.4e-4, reference 1e-5")
    div = dataclasses.replace(div, output=out, outputs=(out,))
    assert _hint_of(div, plain) is None
    assert _hint_of(dataclasses.replace(div, inputs=()), plain) is not None  # no input: said
