"""record() into a streaming logger: the keys of one unchanged tensor write the same bytes, and
their CRC is computed once; an in-place op in between makes it a new value, CRC'd again. The
dump's CRCs are checked by zipfile and by reprod's verifying reader."""

from __future__ import annotations

import warnings
import zipfile

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger
from reprod.capture import record
from reprod.storage import npz_writer


@pytest.fixture
def big_crcs(monkeypatch) -> list[int]:
    """The sizes of the member data (>= 64 KiB) whose CRC the writer computes."""
    real = npz_writer.crc32
    sizes: list[int] = []

    def crc32(data, value=0):
        n = memoryview(data).nbytes
        if n >= 64 << 10:
            sizes.append(n)
        return real(data, value)

    monkeypatch.setattr(npz_writer, "crc32", crc32)
    return sizes


def _check(path, in_memory: ReprodLogger) -> None:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every member's CRC
    dump = reprod.load(path, verify=True)
    assert list(dump) == in_memory.keys()
    for key in in_memory.keys():
        np.testing.assert_array_equal(dump[key], in_memory.data[key], err_msg=key)


def test_torch_keys_of_one_tensor_share_its_crc(torch, tmp_path, big_crcs) -> None:
    from torch import nn

    torch.manual_seed(0)
    # 0.out is 1.in (256 KiB); ReLU(inplace) changes it: 1.out is 2.in and <model>.out's input
    m = nn.Sequential(nn.Linear(64, 8192), nn.ReLU(inplace=True), nn.Linear(8192, 8)).eval()
    x = torch.randn(8, 64)
    with torch.no_grad():
        with record(m, ReprodLogger(stream_to=tmp_path / "run.npz")) as log:
            m(x)
        log.close()
        with record(m) as in_memory:
            m(x)
    # 0.out and 1.out computed, 1.in and 2.in taken: 2 CRCs of 256 KiB, not 4
    assert big_crcs == [8 * 8192 * 4] * 2
    _check(tmp_path / "run.npz", in_memory)


def test_torch_gradients_share_too(torch, tmp_path, big_crcs) -> None:
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 8192), nn.Tanh(), nn.Linear(8192, 8)).eval()
    x = torch.randn(8, 64)
    with record(m, ReprodLogger(stream_to=tmp_path / "run.npz"), backward=True) as log:
        m(x).sum().backward()
    log.close()
    computed = len(big_crcs)
    m.zero_grad(set_to_none=True)
    with record(m, backward=True) as in_memory:
        m(x).sum().backward()
    keys = [k for k in in_memory.keys() if in_memory.data[k].nbytes >= 64 << 10]
    assert computed < len(keys)  # grad_out of 0 is grad_in of 1, and so on
    _check(tmp_path / "run.npz", in_memory)


def test_paddle_keys_of_one_tensor_share_its_crc(paddle, tmp_path, big_crcs) -> None:
    nn = paddle.nn
    paddle.seed(0)
    m = nn.Sequential(nn.Linear(64, 8192), nn.Tanh(), nn.Linear(8192, 8))
    m.eval()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with paddle.no_grad():
            with record(m, ReprodLogger(stream_to=tmp_path / "run.npz")) as log:
                m(x)
            log.close()
            with record(m) as in_memory:
                m(x)
    # 0.out (= 1.in) and 1.out (= 2.in): 2 CRCs of 256 KiB, not 4
    assert big_crcs == [8 * 8192 * 4] * 2
    _check(tmp_path / "run.npz", in_memory)
