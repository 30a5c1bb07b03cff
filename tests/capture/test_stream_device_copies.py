"""A streamed ``record`` block's device path, run on the CPU: torch's backend told that every
tensor is on a device whose copies are still in flight when the hook returns (they land only when
the wait ``copy_ready`` gave is called). The CUDA tests in test_record_reuse.py check the real
thing where a device is; these keep the hand-over checked where none is (CI)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import reprod  # noqa: E402
from reprod import ReprodLogger  # noqa: E402
from reprod.capture import _torch, record  # noqa: E402


class _InFlight:
    """host_copy leaves the host array unwritten (NaN) until the wait of its copy is called."""

    def __init__(self, monkeypatch) -> None:
        self.waits: list[str] = []  # the thread each wait ran on
        self.copies = 0
        backend = _torch.BACKEND
        real_copy = backend.host_copy
        self._late: list[tuple[np.ndarray, np.ndarray]] = []

        def host_copy(tensor, key, buffers):
            conv, _ = real_copy(tensor, key, buffers)
            self._late.append((conv.array, conv.array.copy()))
            conv.array[...] = np.nan  # not there yet
            self.copies += 1
            return conv, True

        def copy_ready(tensor):
            upto = len(self._late)  # this copy and every one before it on the stream

            def wait() -> None:
                self.waits.append(threading.current_thread().name)
                for arr, value in self._late[:upto]:
                    if np.isnan(arr).all() and not np.isnan(value).all():
                        arr[...] = value
            return wait

        monkeypatch.setattr(backend, "on_device", lambda tensor: True)
        monkeypatch.setattr(backend, "host_copy", host_copy)
        monkeypatch.setattr(backend, "copy_ready", copy_ready)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(inplace=True), nn.Linear(64, 8)).eval()


@pytest.mark.parametrize("queue", [0, 1 << 10])
def test_each_copy_is_written_after_its_wait_on_the_writer_thread(tmp_path, monkeypatch, queue):
    m = _model()
    x = torch.randn(4, 16)
    with torch.no_grad(), record(m) as ref:  # in memory: the values, as copied now
        m(x)
    fake = _InFlight(monkeypatch)
    path = tmp_path / "run.npz"
    with torch.no_grad(), ReprodLogger(stream_to=path, stream_queue_bytes=queue) as log, \
            record(m, log):
        m(x)
        assert log._background is not None  # started for the device's copies, queue or not
    assert fake.copies > 0 and len(fake.waits) == fake.copies
    assert all(name.startswith("reprod stream") for name in fake.waits)
    dump = reprod.load(path, verify=True)
    assert list(dump) == list(ref.data)
    for key, value in ref.data.items():
        np.testing.assert_array_equal(dump[key], value, err_msg=key)


def test_a_failed_wait_abandons_the_dump_and_names_the_key(tmp_path, monkeypatch,
                                                           assert_one_line_error):
    _InFlight(monkeypatch)

    def copy_ready(tensor):
        def wait() -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return wait

    monkeypatch.setattr(_torch.BACKEND, "copy_ready", copy_ready)
    path = tmp_path / "run.npz"
    path.write_bytes(b"the earlier dump")
    m = _model()
    with pytest.raises(reprod.errors.StreamWriteError) as info:
        with torch.no_grad(), ReprodLogger(stream_to=path) as log, record(m, log):
            m(torch.randn(4, 16))
    assert_one_line_error(info.value, path)
    assert "illegal memory access" in str(info.value) and "key '" in str(info.value)
    assert path.read_bytes() == b"the earlier dump"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]
