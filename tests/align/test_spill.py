"""``align_train``'s records past a memory budget, in an unlinked file mapped into memory
(``reprod.align.spill``).

The file must change where the records live and nothing else: the same values, dtypes and
shapes, writable arrays, the same verdicts and dumps as in memory; no file left behind; a disk
that refuses the space leaves the records in memory and says so.
"""

from __future__ import annotations

import errno
import gc
import os
import tracemalloc

import numpy as np
import pytest

from reprod.align import spill
from reprod.align.spill import SpillArena, SpillingLogger, budget_of
from reprod.errors import ReprodError

RNG = np.random.default_rng(7)


def _arrays() -> list[np.ndarray]:
    big = RNG.standard_normal((300, 200))
    return [
        big.astype(np.float32),
        big,  # float64
        big.astype(np.float32).T,  # not C-contiguous: copied C-ordered, values as they read
        big[::3, ::2].astype(np.float16),
        (big > 0),
        RNG.integers(-5, 5, (70, 1000)).astype(np.int64),
        (big[:100] + 1j * big[100:200]).astype(np.complex64),
        np.float32(3.5) * np.ones((), np.float32),
    ]


def test_within_budget_the_array_itself_is_kept():
    arena = SpillArena(1 << 30)
    a = RNG.standard_normal((512, 512))
    assert arena.keep(a) is a
    assert arena.in_memory == a.nbytes and arena.spilled == 0


def test_no_budget_keeps_everything_in_memory():
    arena = SpillArena(None, min_bytes=0)
    a = RNG.standard_normal((512, 512))
    assert arena.keep(a) is a and not arena.wants(1 << 40)


def test_past_budget_each_array_is_an_equal_writable_copy_in_the_file(tmp_path):
    arena = SpillArena(0, tmp_path, min_bytes=0)
    for a in _arrays():
        out = arena.keep(a)
        assert out is not a
        assert out.dtype == a.dtype and out.shape == a.shape
        np.testing.assert_array_equal(out, a)
        assert out.flags.c_contiguous and out.flags.writeable
        assert arena._owned(out)
        out[...] = 0  # a write reaches the mapping, not the original
        assert not np.any(out) and (a.size == 0 or np.any(a))
    assert arena.spilled == sum(a.nbytes for a in _arrays())


def test_small_arrays_stay_in_memory():
    arena = SpillArena(0, min_bytes=1 << 16)
    small = np.ones(100, np.float32)
    assert arena.keep(small) is small


def test_an_array_already_in_the_file_is_not_copied_again(tmp_path):
    arena = SpillArena(0, tmp_path, min_bytes=0)
    out = arena.keep(RNG.standard_normal((100, 100)))
    view = out[10:20]
    view.flags.writeable = False
    spilled = arena.spilled
    assert arena.keep(view) is view and arena.keep(out) is out
    assert arena.spilled == spilled


def test_many_chunks_keep_every_value(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "CHUNK", 1 << 20)
    arena = SpillArena(0, tmp_path, min_bytes=0)
    originals = [RNG.standard_normal(int(n)) for n in RNG.integers(1, 300_000, 40)]
    originals.append(RNG.standard_normal(1_000_000))  # larger than a chunk: a chunk of its own
    kept = [arena.keep(a) for a in originals]
    assert len(arena._maps) > 5
    for a, k in zip(originals, kept):
        np.testing.assert_array_equal(a, k)


def test_the_file_is_gone_at_once_and_the_arrays_outlive_the_arena(tmp_path):
    arena = SpillArena(0, tmp_path, min_bytes=0)
    a = RNG.standard_normal((1000, 100))
    out = arena.keep(a)
    assert os.listdir(tmp_path) == []  # unlinked: nothing is left behind, however we end
    arena.close()
    del arena
    gc.collect()
    np.testing.assert_array_equal(out, a)
    out += 1
    np.testing.assert_array_equal(out, a + 1)


def test_a_full_disk_leaves_the_records_in_memory_and_says_so(tmp_path, monkeypatch):
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    arena = SpillArena(0, tmp_path, min_bytes=0)
    a, b = RNG.standard_normal(1000), RNG.standard_normal(1000)
    assert arena.keep(a) is a and arena.keep(b) is b
    assert len(calls) == 1  # not asked again for every array
    assert arena.spilled == 0 and arena.in_memory == a.nbytes + b.nbytes
    assert str(tmp_path) in arena.reason and os.strerror(errno.ENOSPC) in arena.reason
    assert arena.summary()["reason"] == arena.reason


def test_a_directory_that_does_not_exist_is_said(tmp_path):
    arena = SpillArena(0, tmp_path / "missing", min_bytes=0)
    a = RNG.standard_normal(1000)
    assert arena.keep(a) is a
    assert "missing" in arena.reason


def test_without_posix_fallocate_nothing_is_spilled(monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    arena = SpillArena(0, min_bytes=0)
    a = RNG.standard_normal(1000)
    assert arena.keep(a) is a and "posix_fallocate" in arena.reason


def test_budget_of():
    assert budget_of(None) is None
    assert budget_of(0) == 0 and budget_of(2.5e9) == 2_500_000_000
    auto = budget_of("auto")
    assert auto is None or auto > 0
    for bad in (-1, "lots", True, float("nan"), [1]):
        with pytest.raises(ReprodError, match="memory_budget"):
            budget_of(bad)


def test_available_memory_is_at_most_the_machine(monkeypatch):
    free = spill.available_memory()
    if free is None:
        pytest.skip("this system says nothing of its memory")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < free <= total


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_limit_bounds_the_room(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/job\n")
        here = tmp_path / "fs" / "job"
        here.mkdir(parents=True)
        (here / "memory.max").write_text("1000000\n")
        (here / "memory.current").write_text("250000\n")
    else:
        proc.write_text("4:memory:/job\n3:cpuset:/\n")
        here = tmp_path / "fs" / "memory" / "job"
        here.mkdir(parents=True)
        (here / "memory.limit_in_bytes").write_text("1000000\n")
        (here / "memory.usage_in_bytes").write_text("250000\n")
    assert spill._cgroup_room(str(proc), str(tmp_path / "fs")) == 750_000


def test_an_unlimited_cgroup_gives_no_bound(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/job\n0::/job\n")
    (tmp_path / "fs" / "job").mkdir(parents=True)
    (tmp_path / "fs" / "job" / "memory.max").write_text("max\n")
    (tmp_path / "fs" / "memory" / "job").mkdir(parents=True)
    (tmp_path / "fs" / "memory" / "job" / "memory.limit_in_bytes").write_text(
        "9223372036854771712\n")
    assert spill._cgroup_room(str(proc), str(tmp_path / "fs")) is None
    assert spill._cgroup_room(str(tmp_path / "nothing"), str(tmp_path / "fs")) is None


# --- the logger ---------------------------------------------------------------------------------


def test_the_logger_saves_what_an_in_memory_logger_saves(tmp_path):
    from reprod import ReprodLogger, load

    plain, spilled = ReprodLogger(), SpillingLogger(SpillArena(0, tmp_path, min_bytes=1024))
    values = {"w": RNG.standard_normal((64, 64)).astype(np.float32),
              "wt": RNG.standard_normal((64, 64)).astype(np.float32).T,
              "small": np.arange(5), "nested": {"a": RNG.standard_normal((40, 40))},
              "scalar": 2.5, 7: RNG.standard_normal(2000)}
    for key, value in values.items():
        plain.add(key, value)
        spilled.add(key, value)
    assert spilled._arena.spilled == 2 * 64 * 64 * 4 + 2000 * 8 + 40 * 40 * 8
    assert spilled._arena._owned(spilled.data["nested"]["a"])
    assert spilled.data["w"] is not values["w"]  # a copy, as add always makes
    hand = spilled._empty((100, 30), np.float64)
    assert spilled._arena._owned(hand)
    hand[...] = 1.0
    spilled._put("hand", hand)
    plain._put("hand", np.ones((100, 30)))
    a, b = plain.save(tmp_path / "plain.npz"), spilled.save(tmp_path / "spilled.npz")
    da, db = load(a), load(b)
    assert list(da) == list(db)
    for key in da:
        np.testing.assert_array_equal(np.asarray(da[key]), np.asarray(db[key]), err_msg=key)


def test_record_reuses_its_buffer_once_the_logger_has_its_own_copy(tmp_path):
    """Without handing the buffer back, every capture of a ``record`` block stayed in memory
    beside its copy in the file (resnet18's kink layers: 37 MiB a step)."""
    torch = pytest.importorskip("torch")
    from reprod import ReprodLogger
    from reprod.capture import record

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
    xs = [torch.randn(2, 3, 32, 32) for _ in range(12)]  # 128 KiB per capture

    def run(log):
        with torch.no_grad(), record(model, log, forward=True, inputs=True, reuse=False):
            tracemalloc.start()
            for i, x in enumerate(xs):
                model(x)
                if i == 0:
                    one = tracemalloc.get_traced_memory()[0]
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return one, peak

    plain = ReprodLogger()
    one, peak_plain = run(plain)
    spilled = SpillingLogger(SpillArena(0, tmp_path, min_bytes=0))
    _, peak = run(spilled)
    assert peak_plain > 8 * one  # in memory, every pass's captures stay (the reference)
    assert peak < 3 * one  # spilled, a pass's buffers are taken again by the next
    assert list(spilled.data) == list(plain.data)
    for key, value in plain.data.items():
        np.testing.assert_array_equal(spilled.data[key], value, err_msg=key)
        assert spilled._arena._owned(spilled.data[key]), key


# --- align_train ------------------------------------------------------------------------------


def _pair():
    torch = pytest.importorskip("torch")
    paddle = pytest.importorskip("paddle")
    from reprod.align import load_into_paddle

    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(16)
            self.relu = torch.nn.ReLU()
            self.pool = torch.nn.MaxPool2d(4)
            self.fc = torch.nn.Linear(16 * 8 * 8, 64)  # a 256 KiB weight
            self.head = torch.nn.Linear(64, 5)

        def forward(self, x):
            h = self.pool(self.relu(self.bn(self.conv(x))))
            return self.head(self.relu(self.fc(h.flatten(1))))

    class P(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 16, 3, padding=1)
            self.bn = paddle.nn.BatchNorm2D(16)
            self.relu = paddle.nn.ReLU()
            self.pool = paddle.nn.MaxPool2D(4)
            self.fc = paddle.nn.Linear(16 * 8 * 8, 64)
            self.head = paddle.nn.Linear(64, 5)

        def forward(self, x):
            h = self.pool(self.relu(self.bn(self.conv(x))))
            return self.head(self.relu(self.fc(h.flatten(1))))

    torch.manual_seed(0)
    tm, pm = T(), P()
    load_into_paddle(pm, tm)
    return torch, paddle, tm, pm


def _align(budget, out_dir, **kw):
    torch, paddle, tm, pm = _pair()
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 3, 32, 32)).astype(np.float32),
                rng.integers(0, 5, 4)) for _ in range(3)]
    return align_train_call(torch, paddle, tm, pm, batches, budget, out_dir, **kw)


def align_train_call(torch, paddle, tm, pm, batches, budget, out_dir, **kw):
    from reprod.align import align_train

    return align_train(
        tm, pm, batches, torch_loss_fn=torch.nn.CrossEntropyLoss(),
        paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9),
        paddle_optimizer=paddle.optimizer.Momentum(0.1, 0.9, parameters=pm.parameters()),
        calibrate=True, out_dir=out_dir, memory_budget=budget, **kw)


def test_align_train_spilled_gives_what_it_gives_in_memory(tmp_path):
    mem = _align(None, tmp_path / "mem")
    spilled = _align(0, tmp_path / "spilled")
    assert "memory" not in mem.options
    info = spilled.options["memory"]
    assert info["budget"] == 0 and info["spilled"] > 3 * 3 * 256 * 1024  # fc: 3 runs, 3 steps
    assert len(mem.results) > 50
    for a, b in zip(mem.results, spilled.results, strict=True):
        assert repr(a) == repr(b)  # every statistic, NaN as NaN
    assert repr({k: v for k, v in mem.options.items() if k != "memory"}) == \
        repr({k: v for k, v in spilled.options.items() if k != "memory"})
    for name in ("train_torch.npy", "train_paddle.npy", "train_torch64.npy"):
        da = np.load(tmp_path / "mem" / name, allow_pickle=True).item()
        db = np.load(tmp_path / "spilled" / name, allow_pickle=True).item()
        assert list(da) == list(db)
        for key in da:
            np.testing.assert_array_equal(da[key], db[key], err_msg=f"{name} {key}")
    assert os.listdir(tmp_path / "spilled") == os.listdir(tmp_path / "mem")  # no file left


def test_align_train_says_where_records_could_not_go(tmp_path):
    r = _align(0, None, spill_dir=tmp_path / "nowhere")
    assert "nowhere" in r.options["memory"]["reason"]
    assert r.options["memory"]["spilled"] == 0


def test_align_train_refuses_a_bad_budget():
    with pytest.raises(ReprodError, match="memory_budget"):
        _align(-5, None)


def test_a_file_in_memory_is_said(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\ntmpfs {tmp_path} tmpfs rw 0 0\n"
                      f"/dev/vdb {tmp_path}/disk ext4 rw 0 0\n")
    assert spill.in_memory_filesystem(tmp_path / "a" / "b", str(mounts)) == "tmpfs"
    assert spill.in_memory_filesystem(tmp_path / "disk" / "x", str(mounts)) is None
    assert spill.in_memory_filesystem("/elsewhere", str(mounts)) is None
    assert spill.in_memory_filesystem("/x", str(tmp_path / "none")) is None


def test_an_arena_on_a_tmpfs_says_its_records_take_memory(monkeypatch):
    if spill.in_memory_filesystem("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    monkeypatch.setattr(spill, "CHUNK", 1 << 20)
    arena = SpillArena(0, "/dev/shm", min_bytes=0)
    a = RNG.standard_normal(1000)
    np.testing.assert_array_equal(arena.keep(a), a)
    assert "tmpfs" in arena.summary()["note"]


def test_the_forced_step_s_records_kept_for_localisation_go_through_the_arena(tmp_path,
                                                                              monkeypatch):
    """A later step's failure is judged again from the reference's state, and that step's two
    logs (about 8x the parameters) are held until localisation reads them: past the budget,
    in the file as every other record."""
    import mmap

    from reprod.align import steps

    torch, paddle, tm, pm = _pair()
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 3, 32, 32)).astype(np.float32),
                rng.integers(0, 5, 4)) for _ in range(3)]
    seen = {}
    real = steps._train_localised

    def spy(*a, **k):
        seen.update(k["forced_logs"] or {})
        return real(*a, **k)

    monkeypatch.setattr(steps, "_train_localised", spy)
    from reprod.align import align_train

    # Adam's beta1 0.8 for 0.9: step 0's update is the same, step 1's parts, its gradients
    # aligned: judged again from the reference's state, whose logs localisation reads
    r = align_train(tm, pm, batches, torch_loss_fn=torch.nn.CrossEntropyLoss(),
                    paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                    torch_optimizer=torch.optim.Adam(tm.parameters(), lr=1e-3),
                    paddle_optimizer=paddle.optimizer.Adam(1e-3, beta1=0.8,
                                                           parameters=pm.parameters()),
                    calibrate=True, memory_budget=0, check_settings=False,
                    optimizer_state=False)
    assert not r.passed and seen, r.summary_line()

    def in_file(a):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return isinstance(a, mmap.mmap) or isinstance(a, memoryview) and \
            isinstance(a.obj, mmap.mmap)

    for _, t_data, p_data in seen.values():
        big = [v for d in (t_data, p_data) for v in d.values()
               if isinstance(v, np.ndarray) and v.nbytes >= 1 << 16]
        assert big and all(in_file(v) for v in big)
