"""A 1x1 convolution against a Linear (diffusers' ``proj_in`` as a 1x1 ``Conv2d`` against a port
built with ``use_linear_projection=True``, and the other way round): the kernel [out, in, 1, 1]
and Paddle's Linear weight [in, out] hold the same values transposed. A square one was loaded
as a reshape, silently wrong, and ``compare_structure`` said "ok"."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import compare_structure, load_into_paddle  # noqa: E402
from reprod.align.rules import as_target_layout, kernel_against_matrix  # noqa: E402

C = 8


class TorchConvProj(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.proj(x)


class TorchLinearProj(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(C, C)

    def forward(self, x):
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PaddleLinearProj(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.proj = paddle.nn.Linear(C, C)

    def forward(self, x):
        return self.proj(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])


class PaddleConvProj(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.proj = paddle.nn.Conv2D(C, C, 1)

    def forward(self, x):
        return self.proj(x)


def test_the_two_layouts_are_read_transposed():
    assert kernel_against_matrix((4, 3, 1, 1), (3, 4))
    assert kernel_against_matrix((3, 4), (4, 3, 1, 1))
    assert kernel_against_matrix((5, 5, 1), (5, 5))
    assert not kernel_against_matrix((4, 3, 1, 1), (4, 3))  # not a Linear's [in, out]
    assert not kernel_against_matrix((1, 1, 64), (1, 64))
    kernel = np.arange(12.0).reshape(4, 3, 1, 1)
    np.testing.assert_array_equal(as_target_layout(kernel, (3, 4)), kernel[:, :, 0, 0].T)
    np.testing.assert_array_equal(as_target_layout(kernel[:, :, 0, 0].T, (4, 3, 1, 1)), kernel)


@pytest.mark.parametrize("sides", [(TorchConvProj, PaddleLinearProj),
                                   (TorchLinearProj, PaddleConvProj)],
                         ids=["conv_to_linear", "linear_to_conv"])
@pytest.mark.parametrize("by_order", [False, True])
def test_a_square_projection_loads_transposed_and_computes_the_same(sides, by_order):
    torch.manual_seed(0)
    tm, pm = sides[0]().eval(), sides[1]()
    pm.eval()
    report = compare_structure(tm, pm, by_order=by_order)
    assert report.ok, report.to_table(only_problems=True)
    row = next(r for r in report.rows if r.torch_name == "proj.weight")
    assert "reshaped and transposed on load" in row.note
    load_into_paddle(pm, tm, by_order=by_order)
    x = np.random.default_rng(0).standard_normal((2, C, 3, 3)).astype("float32")
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(pm(paddle.to_tensor(x)).numpy(), want, rtol=1e-5, atol=1e-5)
