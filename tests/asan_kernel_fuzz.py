"""Mutated legacy dumps and random batch rows for the compiled kernel under AddressSanitizer.

Not a pytest file (it needs a sanitizer build); see docs/fuzzing.md for the build and the run:

    python tests/asan_kernel_fuzz.py TREE SEED N

TREE is a copy of the repository whose reprod/_kernel*.so was built with -fsanitize=address.
"""

import os
import sys

import numpy as np

TREE, SEED, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, TREE)

import reprod  # noqa: E402
from reprod import _native  # noqa: E402
from reprod.diff import metrics  # noqa: E402
from reprod.errors import DumpFormatError  # noqa: E402

_kernel = _native.kernel()
assert _kernel is not None and _kernel.__file__.startswith(os.path.abspath(TREE))
rng = np.random.default_rng(SEED)
tree = {}
for i in range(40):
    dt = [np.float32, np.float64, np.int64, np.float16, ">f4"][i % 5]
    shape = [(), (5,), (70,), (3, 100), (2, 3, 50)][(i // 5) % 5]
    tree[f"k{i}" if i % 3 else "ü" * (i % 7) + str(i)] = (rng.standard_normal(shape) * 10).astype(dt)
src = os.path.join(TREE, f"src{SEED}.npy")
np.save(src, tree, allow_pickle=True)
data = open(src, "rb").read()
mut = os.path.join(TREE, f"m{SEED}.npy")
ok = err = 0
for t in range(N):
    b = bytearray(data)
    k = int(rng.integers(1, 4))
    for _ in range(k):
        pos = int(rng.integers(100, len(b)))
        b[pos] = int(rng.integers(0, 256))
    if t % 7 == 0:
        b = b[: int(rng.integers(100, len(b)))]
    open(mut, "wb").write(bytes(b))
    try:
        d = reprod.load(mut)
        for key in d:
            try:
                d[key]
            except DumpFormatError:
                pass
        ok += 1
    except DumpFormatError:
        err += 1
# batch kernel + crc with random jobs near bounds
buf = bytes(rng.integers(0, 256, 4096, dtype=np.uint8))
for _ in range(20000):
    job = [int(rng.integers(-2, 4100)), int(rng.integers(-2, 4100)), int(rng.integers(-1, 600)),
           int(rng.integers(-1, 5)), 1, int(rng.integers(-2, 4100)), int(rng.integers(-2, 300)), 0,
           0, -1, 0]
    out = np.empty((1, len(metrics.ROW_COLUMNS)))
    try:
        _kernel.stats_many(buf, buf, np.array(job, np.int64), np.zeros((1, 2)), out, 64, False)
    except ValueError:
        pass
for _ in range(2000):
    off = int(rng.integers(0, 4096))
    ln = int(rng.integers(0, 4096 - off + 1))
    _kernel.crc32(memoryview(buf)[off : off + ln])
# stats3 (issue 23): random lengths, kinds and blocks over slices of one buffer, its statistics
# checked against two stats() calls (bit-identical fields; see tests/diff/test_stats3.py)
values = np.frombuffer(buf, np.uint8).astype(np.float64) - 128.0
fbuf, dbuf = values.astype(np.float32).tobytes(), values.tobytes()
bad3 = 0
for _ in range(5000):
    kinds = [("f", "d")[int(rng.integers(0, 2))] for _ in range(3)]
    lens = [int(rng.integers(0, 520)) for _ in range(3)]
    if rng.integers(0, 4):
        lens[1] = lens[2] = lens[0]
    offs = [int(rng.integers(0, 8)) for _ in range(3)]
    views = [memoryview(fbuf if k == "f" else dbuf)[o * (4 if k == "f" else 8):][: n * (4 if k == "f" else 8)]
             for k, n, o in zip(kinds, lens, offs)]
    block = int(rng.integers(-1, 70))
    args = (block, bool(rng.integers(0, 2)), 1e-3, 1e-3, bool(rng.integers(0, 2)))
    try:
        first, second = _kernel.stats3(views[0], kinds[0], views[1], kinds[1], views[2], kinds[2], *args)
    except ValueError:
        bad3 += 1
        continue
    assert first == _kernel.stats(views[0], kinds[0], views[1], kinds[1], *args)
    alone = _kernel.stats(views[2], kinds[2], views[0], kinds[0], block, False, 0.0, 0.0, False)
    assert [second[i] for i in (0, 1, 4, 17, 18)] == [alone[i] for i in (0, 1, 4, 17, 18)]
# the SIGBUS guard: a mapped file truncated under stats3, stats_many and crc32 raises, each time
import mmap  # noqa: E402

trunc = os.path.join(TREE, f"t{SEED}.bin")
for _ in range(20):
    np.zeros(1 << 16, np.float64).tofile(trunc)
    with open(trunc, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.truncate(trunc, int(rng.integers(0, 4)) * 4096)
    h = np.frombuffer(mm, np.float64)
    job = np.array([0, 0, 1 << 16, 3, 0, 0, -1, 0, 0, -1, 0], np.int64)
    calls = ((_kernel.stats3, (h, "d", h, "d", h, "d", 64, True, 0.0, 0.0, False)),
             (_kernel.crc32, (mm,)),
             (_kernel.stats_many, (mm, mm, job, np.zeros((1, 2)), np.empty((1, len(metrics.ROW_COLUMNS))),
                                   64, False)))
    for fn, fn_args in calls:
        try:
            fn(*fn_args)
            raise AssertionError("no MappedReadError")
        except _native.MappedReadError:
            pass
    del h, calls
    mm.close()
print("seed", SEED, "loaded", ok, "errors", err, "stats3 refused", bad3)
