"""record()'s cheap copies (issue 23): one copy per unchanged tensor, host arrays reused from the
model's previous block only where nobody holds them, streamed values written from the tensor.

Every value is checked against the framework's own computation, run without hooks."""

from __future__ import annotations

import gc
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import reprod  # noqa: E402
from reprod import ReprodLogger  # noqa: E402
from reprod.capture import record, release_buffers  # noqa: E402
from reprod.capture.recorder import Buffers  # noqa: E402


class Transpose(nn.Module):
    def forward(self, x):
        return x.t()  # a non-contiguous output


def model() -> nn.Module:
    # sizes chosen so that copies go through every path: np.copyto (small), torch's copy_
    # (from 128 KiB) and pre-faulted memory (from 4 MiB, the first Linear's output at batch 8)
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 1 << 17), nn.ReLU(inplace=True), nn.Linear(1 << 17, 48),
        nn.Sequential(nn.Linear(48, 48), nn.Hardswish()), Transpose(), nn.Tanh(),
    ).eval()


def expected(m: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Layer outputs computed by torch, step by step, without hooks, on the model's device
    (a CUDA matrix product sums in another order than the CPU's)."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        h = m[0](x)
        out["0.out"] = h.cpu().numpy().copy()
        h = torch.relu(h)
        out["1.out"] = h.cpu().numpy().copy()
        h = m[2](h)
        out["2.out"] = h.cpu().numpy().copy()
        h = m[3](h)
        out["3.out"] = h.cpu().numpy().copy()
        h = h.t()
        out["4.out"] = h.cpu().numpy().copy()
        out["5.out"] = torch.tanh(h).cpu().numpy().copy()
    return out


def step(m: nn.Module, x: torch.Tensor, logger=None, **kw) -> ReprodLogger:
    with torch.no_grad(), record(m, logger, **kw) as log:
        m(x)
    return log


def check(log: ReprodLogger, ref: dict[str, np.ndarray]) -> None:
    for key, value in ref.items():
        np.testing.assert_array_equal(log.data[key], value, err_msg=key)
    np.testing.assert_array_equal(log.data["0.in"], log.data["<model>.in"])


def addresses(log: ReprodLogger) -> set[int]:
    return {v.__array_interface__["data"][0] for v in log.data.values()}


def owners(log: ReprodLogger) -> list[weakref.ref]:
    # a shared key's value is a read-only view: its base is the array that holds the memory
    return [weakref.ref(v if v.flags.writeable else v.base) for v in log.data.values()]


def inputs(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(8, 64, generator=gen) for _ in range(n)]


def test_a_held_log_keeps_its_values_while_later_steps_run():
    m = model()
    x1, x2, x3 = inputs(3)
    first = step(m, x1)
    step(m, x2)
    step(m, x3)
    check(first, expected(m, x1))


def test_arrays_nobody_holds_are_reused_by_the_next_step():
    m = model()
    x1, x2 = inputs(2)
    log = step(m, x1)
    refs = owners(log)
    del log
    gc.collect()
    log = step(m, x2)
    again = {id(r()) for r in owners(log)}
    assert sum(id(r()) in again for r in refs if r() is not None) >= len(again) // 2
    check(log, expected(m, x2))


def test_one_array_kept_from_a_dropped_log_is_not_overwritten():
    m = model()
    x1, x2 = inputs(2)
    log = step(m, x1)
    kept_view = log.data["2.out"][1:]  # a view holds its array, not the log
    kept_whole = log.data["0.out"]
    del log
    gc.collect()
    log2 = step(m, x2)
    ref1 = expected(m, x1)
    np.testing.assert_array_equal(kept_view, ref1["2.out"][1:])
    np.testing.assert_array_equal(kept_whole, ref1["0.out"])
    check(log2, expected(m, x2))


def test_one_logger_for_every_step_holds_the_last_step():
    m = model()
    logger = ReprodLogger()
    xs = inputs(4)
    held = []
    for x in xs:
        step(m, x, logger)
        held.append(logger.data["5.out"])  # kept by the user after the logger moved on
    check(logger, expected(m, xs[-1]))
    for x, arr in zip(xs, held):
        np.testing.assert_array_equal(arr, expected(m, x)["5.out"])


def test_reuse_off_keeps_nothing():
    m = model()
    log = step(m, inputs(1)[0], reuse=False)
    refs = owners(log)
    del log
    gc.collect()
    assert all(r() is None for r in refs)


def test_release_buffers_drops_what_the_model_kept():
    m = model()
    log = step(m, inputs(1)[0])
    refs = owners(log)
    del log
    gc.collect()
    assert any(r() is not None for r in refs)  # kept for the next step
    release_buffers(m)
    gc.collect()
    assert all(r() is None for r in refs)


def test_the_model_keeps_its_buffers_no_longer_than_it_lives():
    m = model()
    log = step(m, inputs(1)[0])
    refs = owners(log)
    del log, m
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_record_inside_another_of_the_same_model():
    m = model()
    x1, x2 = inputs(2)
    with torch.no_grad(), record(m) as outer:
        m(x1)
        with record(m) as inner:
            m(x2)
    check(inner, expected(m, x2))
    ref1, ref2 = expected(m, x1), expected(m, x2)
    np.testing.assert_array_equal(outer.data["5.out"], ref1["5.out"])
    np.testing.assert_array_equal(outer.data["5#2.out"], ref2["5.out"])


def test_an_unchanged_tensor_is_copied_once_and_its_keys_are_read_only():
    m = model()
    (x,) = inputs(1)
    log = step(m, x)
    d = log.data
    # 2.out is 3.in, 3.0.in and 3.0.out's successor's input: one copy
    for key in ("3.in", "3.0.in"):
        assert np.shares_memory(d["2.out"], d[key]), key
        assert not d[key].flags.writeable
    with pytest.raises(ValueError):
        d["3.in"][0, 0] = 1.0
    # the in-place ReLU changed its input after 0.out was taken: separate copies
    assert not np.shares_memory(d["0.out"], d["1.out"])
    assert (d["0.out"] < 0).any() and not (d["1.out"] < 0).any()
    check(log, expected(m, x))


def test_gradients_across_steps_with_the_first_log_held():
    m = model().train()
    x1, x2 = inputs(2)
    logs = []
    grads = []
    for x in (x1, x2):
        m.zero_grad(set_to_none=True)
        with record(m, backward=True) as log:
            m(x).sum().backward()
        logs.append(log)
        grads.append({n: p.grad.numpy().copy() for n, p in m.named_parameters()})
    for log, g in zip(logs, grads):
        for name, value in g.items():
            np.testing.assert_array_equal(log.data[f"param.{name}.grad"], value, err_msg=name)


def test_streaming_writes_what_the_layers_computed(tmp_path):
    m = model()
    x1, x2 = inputs(2)
    step(m, x1)  # buffers kept by the model must not leak into a stream
    path = tmp_path / "run.npz"
    with ReprodLogger(stream_to=path) as logger:
        step(m, x2, logger)
        keys = logger.keys()
    dump = reprod.load(path)
    assert list(dump) == keys
    for key, value in expected(m, x2).items():
        np.testing.assert_array_equal(dump[key], value, err_msg=key)


def test_bfloat16_goes_through_the_general_path():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU()).to(torch.bfloat16).eval()
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    log = step(m, x)
    with torch.no_grad():
        ref = m[0](x).float().numpy()
    np.testing.assert_array_equal(log.data["0.out"], ref)
    assert log.source_dtypes["0.out"] == "bfloat16"


def test_buffers_hand_out_only_unheld_arrays():
    buffers = Buffers()
    held = np.zeros(4, np.float32)
    free = np.zeros(4, np.float32)
    buffers.keep(held)
    buffers.keep(free)
    free_id = id(free)
    del free
    buffers.end_block()
    user_ref = held  # noqa: F841  (held by someone else)
    del held
    got = buffers.take((4,), np.float32)
    assert got is not None and id(got) == free_id
    assert buffers.take((4,), np.float32) is None
    assert buffers.take((4,), np.float32, pinned=True) is None


def test_paddle_held_log_keeps_its_values():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paddle = pytest.importorskip("paddle")
    paddle.seed(0)
    m = paddle.nn.Sequential(paddle.nn.Linear(16, 32), paddle.nn.ReLU(), paddle.nn.Linear(32, 4))
    m.eval()
    gen = np.random.default_rng(3)
    xs = [paddle.to_tensor(gen.standard_normal((8, 16)).astype(np.float32)) for _ in range(3)]
    logs = []
    for x in xs:
        with paddle.no_grad(), record(m) as log:
            m(x)
        logs.append(log)
    for x, log in zip(xs, logs):
        with paddle.no_grad():
            h = m[0](x)
            np.testing.assert_array_equal(log.data["0.out"], h.numpy())
            np.testing.assert_array_equal(log.data["2.out"], m[2](paddle.nn.functional.relu(h)).numpy())
        np.testing.assert_array_equal(log.data["0.in"], x.numpy())


def test_paddle_in_place_and_streamed_values(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paddle = pytest.importorskip("paddle")

    class AddInPlace(paddle.nn.Layer):
        def forward(self, x):
            x.add_(paddle.ones_like(x))  # changes the tensor the previous layer returned
            return x

    paddle.seed(0)
    m = paddle.nn.Sequential(paddle.nn.Linear(16, 32), AddInPlace(), paddle.nn.Linear(32, 4))
    m.eval()
    x = paddle.to_tensor(np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32))
    with paddle.no_grad():
        h = m[0](x).numpy()
        ref = m[2](paddle.to_tensor(h + 1)).numpy()
    path = tmp_path / "run.npz"
    with paddle.no_grad():
        with record(m) as log:
            m(x)
        with ReprodLogger(stream_to=path) as streaming, record(m, streaming):
            m(x)
    dump = reprod.load(path)
    for values in (log.data, dump):
        np.testing.assert_array_equal(values["0.out"], h)  # taken before the in-place add
        np.testing.assert_array_equal(values["1.in"], h)
        np.testing.assert_array_equal(values["1.out"], h + 1)
        np.testing.assert_allclose(values["2.out"], ref, rtol=1e-6)
    assert list(dump) == log.keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_are_complete_when_the_block_ends():
    m = model().cuda()
    x1, x2 = (x.cuda() for x in inputs(2))
    first = step(m, x1)
    second = step(m, x2)
    for log, x in ((first, x1), (second, x2)):
        check(log, expected(m, x))
        assert all(type(v) is np.ndarray for v in log.data.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("queue", [0, 1 << 20])
def test_cuda_streamed_copies_are_written_once_complete(tmp_path, queue):
    # a device tensor's copy goes to the writer thread still in flight (whatever the queue
    # bound; 1 MiB here is less than the first layer's 4 MiB output), which waits for it
    m = model().cuda()
    xs = [x.cuda() for x in inputs(3)]
    for i, x in enumerate(xs):
        path = tmp_path / f"run{i}.npz"
        with ReprodLogger(stream_to=path, stream_queue_bytes=queue) as log:
            step(m, x, log)
            assert log._background is not None
        dump = reprod.load(path, verify=True)
        for key, value in expected(m, x).items():
            np.testing.assert_array_equal(dump[key], value, err_msg=key)
        np.testing.assert_array_equal(dump["0.in"], x.cpu().numpy())


def test_gradient_buffers_survive_an_evaluation_step_between_two_training_steps():
    m = model().train()
    x1, x2, x3 = inputs(3)
    with record(m, backward=True) as log:
        m(x1).sum().backward()
    grad_owners = [weakref.ref(v if v.flags.writeable else v.base)
                   for k, v in log.data.items() if k.startswith("param.")]
    del log
    gc.collect()
    step(m, x2)  # forward only: the gradients' arrays are not needed here
    m.zero_grad(set_to_none=True)
    with record(m, backward=True) as log:
        m(x3).sum().backward()
    again = {id(r()) for r in owners(log)}
    assert any(r() is not None and id(r()) in again for r in grad_owners)
    for name, p in m.named_parameters():
        np.testing.assert_array_equal(log.data[f"param.{name}.grad"], p.grad.numpy(), err_msg=name)


def test_what_a_dropped_log_lent_out_keeps_its_values(tmp_path):
    m = model()
    x1, x2, x3 = inputs(3)
    log = step(m, x1)
    as_tensor = torch.from_numpy(log.data["0.out"])  # holds the array, as any view does
    as_memory = memoryview(log.data["5.out"])
    path = tmp_path / "step1.npz"
    first = log
    del log
    step(m, x2)
    step(m, x3)
    first.save(path)  # saved after two later steps reused every free array
    del first
    gc.collect()
    step(m, x2)
    ref = expected(m, x1)
    np.testing.assert_array_equal(as_tensor.numpy(), ref["0.out"])
    np.testing.assert_array_equal(np.asarray(as_memory), ref["5.out"])
    dump = reprod.load(path)
    for key, value in ref.items():
        np.testing.assert_array_equal(dump[key], value, err_msg=key)


class _AddConst(nn.Module):
    def forward(self, q):
        return q + 1.0


class _TwoPaths(nn.Module):
    """q goes through ``add`` and also straight to the sum: autograd adds the second path's
    gradient into the very tensor it handed to the hook on add's output, before q's hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.add = _AddConst()

    def forward(self, x):
        q = self.lin(x)
        return self.add(q) * 1.0 + q * 3.0


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_a_gradient_summed_into_between_two_hooks_is_copied_again(framework):
    if framework == "torch":
        torch.manual_seed(0)
        m = _TwoPaths()
        x = torch.randn(2, 4)
        with record(m, backward=True) as log:
            m(x).sum().backward()
        # autograd's own answer, without hooks
        q = m.lin(x)
        q.retain_grad()
        s = m.add(q)
        s.retain_grad()
        (s * 1.0 + q * 3.0).sum().backward()
        grad_q, grad_s = q.grad.numpy(), s.grad.numpy()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paddle = pytest.importorskip("paddle")

        class AddConst(paddle.nn.Layer):
            def forward(self, q):
                return q + 1.0

        class TwoPaths(paddle.nn.Layer):
            def __init__(self) -> None:
                super().__init__()
                self.lin = paddle.nn.Linear(4, 4)
                self.add = AddConst()

            def forward(self, x):
                q = self.lin(x)
                return self.add(q) * 1.0 + q * 3.0

        paddle.seed(0)
        m = TwoPaths()
        x = paddle.randn([2, 4])
        with record(m, backward=True) as log:
            m(x).sum().backward()
        grad_s = np.ones((2, 4), np.float32)
        grad_q = np.full((2, 4), 4.0, np.float32)
    d = log.data
    np.testing.assert_array_equal(d["add.grad_out"], grad_s)
    # q's gradient, both paths summed: the tensor add.grad_out's hook was handed, summed into
    np.testing.assert_array_equal(d["add.grad_in"], grad_q)
    np.testing.assert_array_equal(d["lin.grad_out"], grad_q)
    assert not np.array_equal(d["lin.grad_out"], d["add.grad_out"])
