"""reprod.adapters: every numeric value becomes a numpy copy with the same values; the rest is refused.

References: numpy itself, ``torch.Tensor.float()`` / ``paddle.Tensor.astype("float32")`` for the
bfloat16 values, and the frameworks' own ``.numpy()`` for everything else.
"""

from __future__ import annotations

import numpy as np
import pytest

from reprod import ReprodError, UnsupportedValueError
from reprod.adapters import (
    BFLOAT16,
    Converted,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    to_numpy,
    to_tree,
)

NUMERIC_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]  # fmt: skip


def _sample(dtype: type, shape: tuple[int, ...] = (3, 4)) -> np.ndarray:
    rng = np.random.default_rng(0)
    raw = rng.normal(scale=50, size=shape)
    if np.dtype(dtype).kind == "c":
        raw = raw + 1j * rng.normal(size=shape)
    if np.dtype(dtype).kind in "bu":
        raw = np.abs(raw)
    return raw.astype(dtype)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------
# numpy and Python values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_array_is_copied_with_same_dtype_and_values(dtype: type) -> None:
    a = _sample(dtype)
    conv = to_numpy(a, key="x")
    assert isinstance(conv, Converted)
    assert conv.source_dtype is None
    assert _bits_equal(conv.array, a)
    assert not np.shares_memory(conv.array, a)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_scalar_becomes_0d_array_of_its_dtype(dtype: type) -> None:
    s = _sample(dtype, (1,))[0]
    assert isinstance(s, np.generic)
    conv = to_numpy(s)
    assert conv.array.shape == ()
    assert conv.array.dtype == np.dtype(dtype)
    assert conv.array[()] == s


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.T,
        lambda a: a[::2, ::-1],
        lambda a: np.asfortranarray(a),
        lambda a: a.astype(a.dtype.newbyteorder(">")),
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["transposed", "strided", "fortran", "big-endian", "broadcast"],
)
def test_numpy_layouts_keep_values(make) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    a = make(base)
    got = to_numpy(a).array
    assert got.flags.c_contiguous
    assert got.dtype == a.dtype
    np.testing.assert_array_equal(got, a)
    got[...] = -1  # a broadcast view is read-only; the copy must not be
    assert not np.any(a == -1)


@pytest.mark.parametrize(
    "value, dtype",
    [
        (True, np.bool_),
        (3, np.int64),
        (-(2**63), np.int64),
        (2**63, np.uint64),
        (2.5, np.float64),
        (1 - 2j, np.complex128),
    ],
)
def test_python_scalars(value: object, dtype: type) -> None:
    got = to_numpy(value).array
    assert got.shape == ()
    assert got.dtype == dtype
    assert got[()] == value


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**30])
def test_python_int_beyond_64_bits_is_refused(value: int) -> None:
    with pytest.raises(UnsupportedValueError, match="'big'"):
        to_numpy(value, key="big")


@pytest.mark.parametrize(
    "value",
    [[1, 2, 3], (1.5, 2.5), [[1, 2], [3, 4]], [True, False], [np.float32(1), np.float32(2)],
     [np.arange(3), np.arange(3)], [1, 2.5, 3j]],
    ids=["ints", "tuple", "nested", "bools", "np-scalars", "arrays", "mixed"],
)  # fmt: skip
def test_lists_and_tuples_match_np_array(value: object) -> None:
    want = np.array(value)
    assert _bits_equal(to_numpy(value).array, want)


def test_empty_list_is_an_empty_float_array() -> None:
    got = to_numpy([]).array
    assert got.shape == (0,)
    assert got.dtype.kind == "f"


def test_list_of_tensors(torch) -> None:
    got = to_numpy([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]).array
    np.testing.assert_array_equal(got, [[1.0, 2.0], [3.0, 4.0]])
    assert got.dtype == np.float32


@pytest.mark.parametrize(
    "value, type_name",
    [
        ("text", "str"),
        (None, "NoneType"),
        (b"raw", "bytes"),
        (object(), "object"),
        ({1, 2}, "set"),
        (np.array(["a", "b"]), "<U1"),
        (np.array([1, None], dtype=object), "object"),
        (np.array([1], dtype="M8[s]"), "datetime64"),
        (np.datetime64("2020-01-01"), "datetime64"),
        (np.str_("x"), "<U1"),
        (np.zeros(2, dtype=[("a", "f4")]), "[('a', '<f4')]"),
        (["a", "b"], "str"),
        ([1, None], "NoneType"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_non_numeric_values_raise_naming_key_and_type(value: object, type_name: str) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        to_numpy(value, key="layer.out")
    msg = str(info.value)
    assert "'layer.out'" in msg and type_name in msg
    assert "\n" not in msg
    assert isinstance(info.value, ReprodError) and isinstance(info.value, TypeError)


def test_ragged_list_is_refused() -> None:
    with pytest.raises(UnsupportedValueError, match="'r'"):
        to_numpy([[1, 2], [3]], key="r")


# ---------------------------------------------------------------------------------------------
# bfloat16 bit helpers, checked over every one of the 65536 bit patterns against torch
# ---------------------------------------------------------------------------------------------


def test_bf16_bits_to_float32_matches_torch_on_all_patterns(torch) -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    got = bf16_bits_to_float32(bits)
    assert got.dtype == np.float32
    finite = np.isfinite(want)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite]))  # -0.0 stays -0.0


def test_float32_to_bf16_bits_inverts_exactly() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    assert np.array_equal(float32_to_bf16_bits(bf16_bits_to_float32(bits)), bits)


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------

TORCH_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                "float64", "complex64", "complex128"]  # fmt: skip


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_torch_dtypes_match_tensor_numpy(torch, name: str) -> None:
    t = torch.from_numpy(_sample(np.dtype(name).type)).to(getattr(torch, name))
    conv = to_numpy(t, key="t")
    assert conv.source_dtype is None
    assert _bits_equal(conv.array, t.numpy())


def test_torch_requires_grad_non_contiguous_and_parameter(torch) -> None:
    w = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))
    y = (w * 2).T  # requires grad, non-contiguous
    assert y.requires_grad and not y.is_contiguous()
    got = to_numpy(y).array
    np.testing.assert_array_equal(got, (np.arange(12.0).reshape(3, 4) * 2).T)
    assert got.flags.c_contiguous and got.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(w).array, np.arange(12.0).reshape(3, 4))


def test_torch_half_and_scalar(torch) -> None:
    t = torch.tensor([[0.1, -2.5], [65504.0, 6e-8]], dtype=torch.float16)[:, ::1].T
    assert _bits_equal(to_numpy(t).array, t.numpy())
    s = to_numpy(torch.tensor(3.25)).array
    assert s.shape == () and s == 3.25


def test_torch_bfloat16_is_exact_float32_with_source_dtype(torch) -> None:
    vals = torch.tensor([[1.0, -2.25, 3.0e38], [1e-40, float("inf"), -0.0]], dtype=torch.bfloat16)
    for t in (vals, vals.T, vals.clone().requires_grad_(True)):
        conv = to_numpy(t, key="bf")
        assert conv.source_dtype == BFLOAT16 == "bfloat16"
        assert _bits_equal(conv.array, t.detach().float().numpy())


def test_torch_conj_and_neg_views_are_resolved(torch) -> None:
    c = torch.tensor([1 + 2j, -3j], dtype=torch.complex64).conj()
    assert c.is_conj()
    np.testing.assert_array_equal(to_numpy(c).array, np.array([1 - 2j, 3j], dtype=np.complex64))
    n = torch.tensor([1.0, -2.0])._neg_view()
    np.testing.assert_array_equal(to_numpy(n).array, [-1.0, 2.0])


def test_torch_value_copied_at_conversion(torch) -> None:
    t = torch.zeros(4)
    got = to_numpy(t).array
    t.add_(1)
    np.testing.assert_array_equal(got, np.zeros(4))


@pytest.mark.parametrize(
    "make",
    [
        lambda torch: torch.tensor([1.0, 2.0, -0.5]).to(torch.float8_e4m3fn),
        lambda torch: torch.eye(3).to_sparse(),
        lambda torch: torch.empty(2, device="meta"),
    ],
    ids=["float8", "sparse", "meta"],
)
def test_torch_tensors_numpy_cannot_hold_are_converted_or_refused_cleanly(torch, make) -> None:
    """Either the exact float32 values or an UnsupportedValueError naming the key: never a bare
    TypeError/NotImplementedError from torch's ``.numpy()``."""
    t = make(torch)
    try:
        got = to_numpy(t, key="odd").array
    except UnsupportedValueError as exc:
        assert "'odd'" in str(exc)
        return
    if t.is_sparse:
        t = t.to_dense()
    np.testing.assert_array_equal(got, t.float().numpy())


# ---------------------------------------------------------------------------------------------
# paddle
# ---------------------------------------------------------------------------------------------

PADDLE_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                 "float64", "complex64", "complex128"]  # fmt: skip


@pytest.mark.parametrize("name", PADDLE_DTYPES)
def test_paddle_dtypes_match_tensor_numpy(paddle, name: str) -> None:
    t = paddle.to_tensor(_sample(np.dtype(name).type))
    conv = to_numpy(t, key="p")
    assert conv.source_dtype is None
    assert _bits_equal(conv.array, t.numpy())
    assert conv.array.dtype == np.dtype(name)


def test_paddle_grad_non_contiguous_half(paddle) -> None:
    x = paddle.to_tensor(np.arange(12, dtype=np.float32).reshape(3, 4), stop_gradient=False)
    y = (x * 2).t()
    assert not y.stop_gradient
    got = to_numpy(y).array
    np.testing.assert_array_equal(got, (np.arange(12, dtype=np.float32).reshape(3, 4) * 2).T)
    assert got.flags.c_contiguous
    h = paddle.to_tensor([[0.1, -2.5], [65504.0, 6e-8]], dtype="float16").t()
    assert _bits_equal(to_numpy(h).array, h.numpy())
    assert to_numpy(paddle.to_tensor(2.5)).array.shape == ()


def test_paddle_bfloat16_is_exact_float32_with_source_dtype(paddle) -> None:
    t = paddle.to_tensor([[1.0, -2.25, 3.0e38], [1e-40, float("inf"), -0.0]], dtype="bfloat16")
    for v in (t, t.t()):
        conv = to_numpy(v, key="bf")
        assert conv.source_dtype == "bfloat16"
        assert _bits_equal(conv.array, v.astype("float32").numpy())


def test_paddle_value_copied_at_conversion(paddle) -> None:
    t = paddle.zeros([4])
    got = to_numpy(t).array
    t.add_(paddle.ones([4]))
    np.testing.assert_array_equal(got, np.zeros(4))


def test_paddle_float8_is_not_silently_read_as_its_bit_pattern(paddle) -> None:
    """paddle's ``.numpy()`` hands float8 out as raw int8 bits; logging those as the values would
    turn 1.0 into 56. Either the exact float32 values or a clean refusal."""
    if not hasattr(paddle, "float8_e4m3fn"):
        pytest.skip("this paddle has no float8")
    t = paddle.to_tensor([1.0, 2.0, -0.5]).astype("float8_e4m3fn")
    try:
        got = to_numpy(t, key="f8").array
    except UnsupportedValueError as exc:
        assert "'f8'" in str(exc)
        return
    np.testing.assert_array_equal(got, [1.0, 2.0, -0.5])


# ---------------------------------------------------------------------------------------------
# to_tree
# ---------------------------------------------------------------------------------------------


def test_to_tree_keeps_nesting_and_order(assert_same_tree) -> None:
    value = {"z": 1.0, "a": {"y": [1, 2], "b": {"c": np.arange(3, dtype=np.int8)}}, "m": True}
    tree, dtypes = to_tree(value, key="root")
    assert dtypes is None
    assert_same_tree(
        tree,
        {"z": np.array(1.0), "a": {"y": np.array([1, 2]), "b": {"c": np.arange(3, dtype=np.int8)}},
         "m": np.array(True)},
    )  # fmt: skip


def test_to_tree_collects_bfloat16_source_dtypes_by_path(torch) -> None:
    bf = torch.tensor([1.5], dtype=torch.bfloat16)
    tree, dtypes = to_tree({"a": {"b": bf, "c": torch.ones(1)}, "d": bf})
    assert dtypes == {"a": {"b": "bfloat16"}, "d": "bfloat16"}
    assert tree["a"]["b"].dtype == np.float32 and tree["a"]["b"][0] == 1.5
    leaf, dt = to_tree(bf)
    assert dt == "bfloat16" and leaf.dtype == np.float32


def test_to_tree_errors_name_the_full_path() -> None:
    with pytest.raises(UnsupportedValueError, match=r"'out/inner'.*str"):
        to_tree({"inner": "oops"}, key="out")
    with pytest.raises(UnsupportedValueError, match=r"^key 'out': nested key 3\.0 is a float"):
        to_tree({3.0: np.ones(1)}, key="out")
    assert list(to_tree({3: np.ones(1)}, key="out")[0]) == ["3"]  # an int: its str


@pytest.mark.parametrize("shape", [(3,), (2048, 1024), (1, 1536, 1024)])
def test_fresh_copy_large_and_small(shape) -> None:
    """Copies of 4 MiB and more come from pre-faulted memory: same values, dtype and shape, C order,
    writable, and independent of the source."""
    from reprod.adapters import fresh_copy

    src = np.asfortranarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    out = fresh_copy(src)
    np.testing.assert_array_equal(out, src)
    assert out.dtype == src.dtype and out.shape == src.shape
    assert out.flags.c_contiguous and out.flags.writeable and not np.shares_memory(out, src)
    src[...] = 0
    assert out.any()


def test_large_torch_tensor_copied_at_conversion(torch) -> None:
    t = torch.ones(2048, 1024)  # 8 MiB: the pre-faulted path
    conv = to_numpy(t, key="big")
    t.add_(1)
    assert conv.array.dtype == np.float32 and float(conv.array.max()) == 1.0


def test_paddle_value_independent_of_tensor(paddle) -> None:
    """paddle's .numpy() already copies; the converted array must still not follow the tensor."""
    t = paddle.to_tensor(np.arange(6, dtype=np.float32))
    conv = to_numpy(t, key="p")
    t.add_(paddle.ones([6], dtype="float32"))
    np.testing.assert_array_equal(conv.array, np.arange(6, dtype=np.float32))
    assert conv.array.flags.c_contiguous and conv.array.flags.writeable
