"""record() into a streaming logger with its writer thread (issue 23): the hooks hand copies from
a bounded pool to the thread; the dump is the one written inside the hooks, byte for byte, and
holds what the layers computed; the thread's failures reach the caller; no thread, hook or
tensor outlives the block and the logger."""

from __future__ import annotations

import errno
import gc
import os
import threading
import warnings
import weakref
import zipfile

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger
from reprod.capture import record, release_buffers
from reprod.capture.recorder import StreamBuffers
from reprod.errors import StreamWriteError
from reprod.storage import npz_writer

Q = 64 << 20  # a writer thread, its queue as large as the benchmark's


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("reprod stream")]


def _same_dump(got, want) -> None:
    """Same members with the same bytes, same metadata; what numpy.load and reprod read agree."""
    with zipfile.ZipFile(got) as a, zipfile.ZipFile(want) as b:
        assert a.namelist() == b.namelist()
        assert a.read("__reprod__.json") == b.read("__reprod__.json")
        assert a.testzip() is None
        for name in b.namelist():
            assert a.read(name) == b.read(name), name
    x, y = np.load(got), np.load(want)
    for name in y.files:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    assert list(reprod.load(got, verify=True)) == list(reprod.load(want, verify=True))


def _same_values(dump, log: ReprodLogger) -> None:
    assert list(dump) == log.keys()
    for key in log.keys():
        np.testing.assert_array_equal(dump[key], log.data[key], err_msg=key)


# --- torch ------------------------------------------------------------------------------------


@pytest.fixture
def tnet(torch):
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # 256 KiB activations at batch 4: pooled copies; the head's are small ones
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(inplace=True))
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Hardswish())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

        def forward(self, x):
            h = self.stem(x)
            return self.head(h + self.block(h))

    torch.manual_seed(0)
    return Net().eval()


def _tstep(torch, m, logger, seed: int, **kw) -> ReprodLogger:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((4, 3, 32, 32)).astype(np.float32))
    with record(m, logger, backward=True, **kw) as log:
        m(x).sum().backward()
    m.zero_grad(set_to_none=True)
    return log


@pytest.mark.parametrize("queue_bytes", [64 << 20, 1 << 20, 1])
def test_torch_stream_is_the_in_hook_stream_and_the_layers_values(torch, tnet, tmp_path,
                                                                 queue_bytes) -> None:
    for seed in (1, 2):  # the second step takes the first one's pooled memory
        sync = ReprodLogger(stream_to=tmp_path / "sync.npz", stream_queue_bytes=0)
        _tstep(torch, tnet, sync, seed)
        assert _threads() == []
        sync.close()
        thread = ReprodLogger(stream_to=tmp_path / "thread.npz", stream_queue_bytes=queue_bytes)
        _tstep(torch, tnet, thread, seed)
        thread.close()
        assert _threads() == []
        _same_dump(tmp_path / "thread.npz", tmp_path / "sync.npz")
        _same_values(reprod.load(tmp_path / "thread.npz"), _tstep(torch, tnet, None, seed))


def test_torch_pooled_copies_are_reused_and_bounded(torch, tnet, tmp_path) -> None:
    release_buffers(tnet)
    for seed in (1, 2, 3):
        # a pool bound (4 x 4 MiB) above a step's copies (~4 MiB): nothing is given up
        with ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=4 << 20) as lg:
            _tstep(torch, tnet, lg, seed)
        from reprod.capture import recorder

        pool = recorder._STREAM_BUFFERS[tnet]
        assert 0 < pool._bytes <= 16 << 20
        buffers = {id(b) for bufs in pool._flat.values() for b in bufs}
        if seed == 1:
            first = buffers
        else:  # the step's first copy of a size at least takes a buffer of the first step
            # (how many more it needs depends on how far the thread lags behind the hooks)
            assert buffers & first
    _same_values(reprod.load(tmp_path / "run.npz"), _tstep(torch, tnet, None, 3))
    release_buffers(tnet)
    assert tnet not in recorder._STREAM_BUFFERS


def test_torch_error_in_the_thread_surfaces_from_the_model(torch, tnet, tmp_path,
                                                            monkeypatch) -> None:
    path = tmp_path / "run.npz"
    reprod.save(path, {"earlier": np.ones(2)})
    before = path.read_bytes()
    real = npz_writer.NpzWriter._write_member
    failing = threading.Event()

    def write_member(self, member_path, *args, **kwargs):
        if member_path[0] == "stem.0.out":
            failing.set()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, member_path, *args, **kwargs)

    monkeypatch.setattr(npz_writer.NpzWriter, "_write_member", write_member)
    lg = ReprodLogger(stream_to=path, stream_queue_bytes=Q)
    x = torch.ones(4, 3, 32, 32)
    with pytest.raises(StreamWriteError) as info:
        with record(tnet, lg, backward=True):
            for _ in range(1000):  # the thread fails while hooks hand it more
                tnet(x).sum().backward()
    msg = str(info.value)
    assert str(path) in msg and "'stem.0.out'" in msg and "No space left" in msg
    assert failing.is_set() and info.value.errno == errno.ENOSPC
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tnet.modules())
    with pytest.raises(StreamWriteError, match="stem.0.out"):
        lg.close()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["run.npz"]
    assert _threads() == []


def test_torch_error_in_the_thread_surfaces_from_backward(torch, tnet, tmp_path,
                                                          monkeypatch) -> None:
    """A hook of the backward pass raises it too, out of backward()."""
    real = npz_writer.NpzWriter._write_member

    def write_member(self, member_path, *args, **kwargs):
        if member_path[0] == "head.2.grad_out":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, member_path, *args, **kwargs)

    monkeypatch.setattr(npz_writer.NpzWriter, "_write_member", write_member)
    lg = ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=1)  # one at a time
    with record(tnet, lg, backward=True):
        out = tnet(torch.ones(4, 3, 32, 32)).sum()
        with pytest.raises(StreamWriteError, match="head.2.grad_out"):
            out.backward()
    with pytest.raises(StreamWriteError):
        lg.close()
    assert os.listdir(tmp_path) == [] and _threads() == []


def test_torch_exception_in_the_block_leaves_no_file_thread_or_hook(torch, tnet, tmp_path) -> None:
    path = tmp_path / "run.npz"
    reprod.save(path, {"earlier": np.ones(2)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with ReprodLogger(stream_to=path, stream_queue_bytes=Q) as lg, \
                record(tnet, lg, backward=True):
            tnet(torch.ones(4, 3, 32, 32)).sum().backward()
            assert len(_threads()) == 1
            raise RuntimeError("boom")
    assert _threads() == [] and path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["run.npz"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tnet.modules())


def test_torch_stream_holds_no_tensor(torch, tnet, tmp_path) -> None:
    """The copies handed to the thread are the pool's; the recorder's window of recent tensors
    holds weak references: dropping a step's outputs frees them."""
    with ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=Q) as lg, \
            record(tnet, lg, backward=True):
        refs = []
        probe = tnet.stem.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
        try:
            out = tnet(torch.ones(4, 3, 32, 32))
            out.sum().backward()
            del out
            gc.collect()
        finally:
            probe.remove()
        assert refs and all(r() is None for r in refs)


def test_add_after_a_block_is_written_after_the_blocks_keys(torch, tnet, tmp_path) -> None:
    with ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=Q) as lg:
        log = _tstep(torch, tnet, lg, 1)
        value = np.arange(3.0)
        lg.add("loss", value)
        value[:] = 0  # after add: not what is written
        keys = lg.keys()
    d = reprod.load(tmp_path / "run.npz")
    assert list(d) == keys and keys[-1] == "loss"
    np.testing.assert_array_equal(d["loss"], np.arange(3.0))
    assert log is lg


# --- paddle -----------------------------------------------------------------------------------


@pytest.fixture
def pnet(paddle):
    nn = paddle.nn

    class Net(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2D(3, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2D(16, 16, 3, padding=1), nn.Hardswish())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(16, 5))

        def forward(self, x):
            h = self.stem(x)
            return self.head(h + self.block(h))

    paddle.seed(0)
    net = Net()
    net.eval()
    return net


def _pstep(paddle, m, logger, seed: int, **kw) -> ReprodLogger:
    x = paddle.to_tensor(np.random.default_rng(seed).standard_normal((4, 3, 32, 32)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with record(m, logger, backward=True, **kw) as log:
            m(x).sum().backward()
        m.clear_gradients()
    return log


@pytest.mark.parametrize("queue_bytes", [64 << 20, 1])
def test_paddle_stream_is_the_in_hook_stream_and_the_layers_values(paddle, pnet, tmp_path,
                                                                   queue_bytes) -> None:
    for seed in (1, 2):
        sync = ReprodLogger(stream_to=tmp_path / "sync.npz", stream_queue_bytes=0)
        _pstep(paddle, pnet, sync, seed)
        sync.close()
        thread = ReprodLogger(stream_to=tmp_path / "thread.npz", stream_queue_bytes=queue_bytes)
        _pstep(paddle, pnet, thread, seed)
        thread.close()
        assert _threads() == []
        _same_dump(tmp_path / "thread.npz", tmp_path / "sync.npz")
        _same_values(reprod.load(tmp_path / "thread.npz"), _pstep(paddle, pnet, None, seed))


def test_paddle_error_in_the_thread_surfaces_from_the_model(paddle, pnet, tmp_path,
                                                             monkeypatch) -> None:
    real = npz_writer.NpzWriter._write_member

    def write_member(self, member_path, *args, **kwargs):
        if member_path[0] == "stem.0.out":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, member_path, *args, **kwargs)

    monkeypatch.setattr(npz_writer.NpzWriter, "_write_member", write_member)
    lg = ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=Q)
    x = paddle.ones([4, 3, 32, 32])
    with pytest.raises(StreamWriteError, match="stem.0.out"):
        with paddle.no_grad(), record(pnet, lg):
            for _ in range(1000):
                pnet(x)
    with pytest.raises(StreamWriteError):
        lg.close()
    assert os.listdir(tmp_path) == [] and _threads() == []


# --- the pool ---------------------------------------------------------------------------------


def test_stream_buffers_hand_out_only_unheld_memory_within_their_limit() -> None:
    pool = StreamBuffers(limit=1 << 20)
    a = pool.take((256, 256), np.float32)  # 256 KiB: pooled
    assert a is not None and a.shape == (256, 256) and a.dtype == np.float32
    b = pool.take((256, 256), np.float32)
    assert not np.shares_memory(a, b)  # ``a`` is held
    base = id(a.base)
    a_address = a.__array_interface__["data"][0]
    del a
    c = pool.take((128, 512), np.float32)  # same size class, another shape: a's memory
    assert id(c.base) == base and c.__array_interface__["data"][0] == a_address
    small = pool.take((10,), np.float64)
    assert small is None  # from malloc's heap, not pooled
    held = [pool.take((256, 256), np.float32) for _ in range(6)]  # past the limit
    assert all(h is not None for h in held) and pool._bytes <= 1 << 20
    assert len({h.__array_interface__["data"][0] for h in held + [b, c]}) == 8
    del held, b, c
    big = pool.take((512, 512), np.float32)  # 1 MiB: the unheld buffers make room for it
    assert big is not None and pool._bytes == 1 << 20
    pinned = np.zeros((4, 4), np.float32)
    pool.keep(pinned, pinned=True)  # no room left while ``big`` is held: not kept
    assert pool.take((4, 4), np.float32, pinned=True) is None
    del big
    pool.keep(pinned, pinned=True)
    got = pool.take((4, 4), np.float32, pinned=True)
    assert got is None  # held here
    del pinned, got
    assert pool.take((4, 4), np.float32, pinned=True) is not None
