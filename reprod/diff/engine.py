"""``reprod.compare``: pair the keys, compute the statistics, apply the pass rule, return data."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from .. import _native
from .. import messages as msg
from .._gc import gc_paused
from ..errors import DumpChangedError, ReprodError
from ..logger import ReprodLogger
from ..storage.lazy import Dump, NonNumericValue
from .batch import compare_batch, unravel
from .columns_batch import ColumnPairs, column_pairs, compare_columns, sides_of
from .criteria import Criteria, MethodArg, PerKey, build_criteria
from .noise import (
    DEFAULT_NOISE_FACTOR,
    calibrated_stats,
    carried_precision,
    judge_precision,
    leaf_at,
    port_rounding,
)
from .pairing import DerivedNoise, Pair, Side, leaf_array, open_side, walk_pairs
from .progress import Progress, progress_enabled
from .result import DiffResult, KeyResult
from .verdict import judged

__all__ = ["compare"]


def compare(
    ref: Any,
    other: Any,
    *,
    method: MethodArg = "mean",
    threshold: Optional[float] = 1e-6,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_key: PerKey = None,
    keys: Optional[Union[str, Sequence[str]]] = None,
    equal_nan: bool = False,
    strict_shape: bool = False,
    noise: Any = None,
    noise_factor: Optional[float] = None,
    other_noise: Any = None,
    pair: Optional[Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]]] = None,
    criteria: Optional[Criteria] = None,
    progress: Optional[bool] = None,
) -> DiffResult:
    """Compare two dumps key by key; ``ref`` is the reference (relative errors divide by |ref|).

    ``ref``/``other``: paths (``.npy``/``.npz``), mappings (nested allowed) of arrays or tensors, or
    single arrays. ``method``: reprod_log's ``diff_method`` (``"mean"``, ``"max"``, ``"min"``,
    ``"all"``, ``"mean_rel"``, ``"max_rel"`` or a list); a check passes when the statistic is <=
    its threshold. ``threshold=None`` turns the statistic checks off. ``atol``/``rtol`` add the
    element-wise rule |other - ref| <= atol + rtol*|ref|. ``per_key`` maps names or globs to a
    threshold or a {method: threshold} dict, where ``"atol"``/``"rtol"`` entries set that key's
    element-wise rule. ``keys``: globs selecting which keys to compare. ``criteria``: a
    :class:`reprod.Criteria` holding all of these at once (keyword arguments given beside it
    override its fields).

    ``noise``: the same computation as ``ref`` run at higher precision (a dump, path or mapping
    with the same keys, e.g. the torch side in float64). Each key found there is calibrated: it
    passes when its difference is at most ``noise_factor`` (default 20) times the reference's own
    noise (how far ``ref`` is from ``noise``), whatever the plain thresholds say; the result
    carries ``noise_multiple``, ``noise_l2`` and ``noise_max``. Keys not found there are judged by
    the plain thresholds, with a note.

    ``other_noise`` (with ``noise``): the port's same computation at higher precision (the Paddle
    side in float64). A calibrated key that fails passes as ``"known"`` where it is both sides'
    rounding: the two higher-precision runs agree within the reference's own noise
    (``reprod.diff.noise.port_rounding``: a porting bug is another function in float64 too, while
    Paddle's kernels may round hundreds of times more than torch's in float32).
    ``result.options["port_rounding"]`` counts the keys so explained.

    ``pair``: a function ``(ref_tree, other_tree) -> other_tree`` that renames the other side's keys
    to the reference's before pairing (``reprod.capture.rename_by_order`` for captures whose layer
    names differ, ``functools.partial(reprod.capture.rename, rules=...)``, or
    ``reprod.diff.pairing.rename_leaves_by_order`` for any two dumps written in the same order),
    or ``-> (ref_tree, other_tree)`` where it also leaves reference keys out
    (``reprod.capture.match_by_order``: containers that pair with nothing).
    ``progress``: a progress bar on stderr when the comparison takes more than a second (``None``:
    only when stderr is a terminal; ``False``: never).

    >>> r = compare({"x": np.ones(3)}, {"x": np.ones(3) + 1e-7}, method="max", threshold=1e-6)
    >>> r.passed
    True
    """
    ref, other, noise, other_noise = (_logged(x) for x in (ref, other, noise, other_noise))
    given = {"methods": method, "threshold": threshold, "atol": atol, "rtol": rtol,
             "per_key": per_key, "equal_nan": equal_nan, "strict_shape": strict_shape,
             "noise_factor": noise_factor}
    if criteria is not None:  # the shortcuts left at their defaults do not override criteria
        given = {k: v for k, v in given.items() if v != _DEFAULTS[k]}
    crit = build_criteria(criteria, **given)
    if other_noise is not None and noise is None:
        raise ReprodError("other_noise= (the port run in float64) needs noise= (the reference run "
                          "in float64): a port's rounding is judged against the reference's")
    if other_noise is not None and pair is not None:
        raise ReprodError("other_noise= does not work with pair=: give dumps under the same keys")
    with gc_paused():
        result = _compare(ref, other, crit, keys=keys, progress=progress, noise=noise, pair=pair)
        if other_noise is not None:
            result = _rounding_explained(result, ref, other, noise, other_noise)
    return result


def _logged(value: Any) -> Any:
    """A ``ReprodLogger`` (what ``record`` yields) as the values it holds; a streaming one, which
    holds none, as the file it writes."""
    if not isinstance(value, ReprodLogger):
        return value
    stream = getattr(value, "_stream_path", None)
    if stream is not None:
        raise ReprodError(f"compare: a streaming ReprodLogger holds no values; close() it and "
                          f"compare the file it writes, {stream}")
    return value.data


def _leaf(tree: Any, path: tuple[str, ...], shape: Optional[tuple[int, ...]]) -> Optional[np.ndarray]:
    """The array at ``path`` in ``tree``, in ``shape`` where it holds the same elements; None
    where it is not there."""
    found = leaf_at(tree, path)
    if found is None:
        return None
    a = found[0]
    if shape is not None and a.shape != shape and a.size == int(np.prod(shape)):
        a = a.reshape(shape)
    return a


def _rounding_explained(result: DiffResult, ref: Any, other: Any, noise: Any,
                        other_noise: Any) -> DiffResult:
    """``compare``'s ``other_noise``: its failing calibrated keys that both sides' rounding
    makes, relabelled ``"known"`` (read again from the four dumps, those keys only)."""
    a, b = open_side(ref, "ref"), open_side(other, "other")
    hi, ohi = open_side(noise, "noise"), open_side(other_noise, "other_noise")
    trees = [a.tree] + [_as_ref_key(a.tree, s.tree) for s in (b, hi, ohi)]
    out, known = [], 0
    for kr in result.results:
        if kr.passed or kr.status not in ("failed", "mismatch") or kr.noise_multiple is None:
            out.append(kr)
            continue
        arrays = [_leaf(t, kr.path or (kr.key,), kr.ref_shape) for t in trees]
        found = None if any(x is None for x in arrays) else port_rounding(
            *arrays, dtypes=(kr.ref_dtype, kr.other_dtype))
        if found is None:
            out.append(kr)
            continue
        known += 1
        out.append(dataclasses.replace(kr, passed=True, status="known",
                                       reason=f"{found.reason()}; {kr.reason}"))
    options = dict(result.options, port_rounding={"known": known, "other_noise": ohi.name})
    return dataclasses.replace(result, results=tuple(out), options=options)


_DEFAULTS: dict[str, Any] = {"methods": "mean", "threshold": 1e-6, "atol": None, "rtol": None,
                             "per_key": None, "equal_nan": False, "strict_shape": False,
                             "noise_factor": None}


def _compare(ref: Any, other: Any, policy: Criteria, *,
             keys: Optional[Union[str, Sequence[str]]], progress: Optional[bool],
             noise: Any = None, pair: Any = None) -> DiffResult:
    a = open_side(ref, "ref")
    b = open_side(other, "other")
    left_out: dict[str, int] = {}
    if pair is not None:
        try:
            paired = pair(a.tree, b.tree)
        except _native.MappedReadError:  # SIGBUS in the kernel while pairing: one line, not a crash
            raise _shrunk((a, b)) from None
        if isinstance(paired, tuple):  # (ref, other): keys with no counterpart left out
            n_ref, n_other = len(a.tree), len(b.tree)
            a.tree, b.tree = paired
            # said in the summary: nothing is left out unsaid
            if len(a.tree) < n_ref:
                left_out["ref"] = n_ref - len(a.tree)
            if len(b.tree) < n_other:
                left_out["other"] = n_other - len(b.tree)
        else:
            b.tree = paired
    hi = None if noise is None else open_side(noise, "noise")
    b.tree = _as_ref_key(a.tree, b.tree)
    derived = getattr(a.tree, "derived", None)  # reference values derived by the pairing
    if hi is not None:
        hi.tree = _as_ref_key(a.tree, hi.tree)
        if derived:
            hi.tree = DerivedNoise(hi.tree, derived)
    walk = walk_pairs(a.tree, b.tree, keys=keys)
    # the mapped files of the dumps opened here: their specs go once a window is compared
    owned = _owned_files((a, b)) if pair is None else ()
    bar = None
    if progress_enabled(progress):  # the bar's totals need every pair first
        pairs = list(walk)
        bar = _progress_bar(pairs)
        walk = iter(pairs)
    results: list[KeyResult] = []
    coarse: list[str] = []
    windows = 0
    cp = column_pairs(a.tree, b.tree) if hi is None and pair is None and not keys and bar is None \
        and not derived else None
    if cp is not None:  # two flat column dumps with the same keys: no Pair per key
        _compare_columns(cp, policy, owned, results, (a.name, b.name))
        walk = iter(())
    with bar if bar is not None else contextlib.nullcontext():
        # a window of pairs at a time: a million keys never hold a million Pairs at once
        for window in iter(lambda: list(itertools.islice(walk, _WINDOW)), []):
            # calibrated keys read a third array: the per-key path
            try:
                batched = compare_batch(window, policy, bar=bar) if hi is None else [None] * len(window)
            except _native.MappedReadError:  # a dump truncated meanwhile: the per-key path names it
                batched = [None] * len(window)
            for p, kr in zip(window, batched):
                if kr is None:
                    try:
                        kr = _compare_pair(p, policy, bar=bar, noise=None if hi is None else hi.tree,
                                           coarse=coarse)
                    except _native.MappedReadError as exc:  # SIGBUS in the kernel: one line, not a crash
                        files = (a.name, b.name, None if hi is None else hi.name)
                        raise DumpChangedError.sigbus(p.key, files, getattr(exc, "argument", -1)) from None
                if hi is None and kr.status == "failed":  # read only where a key fails
                    kr = _with_half_side(kr, p)
                results.append(kr)
                if bar is not None:
                    bar.key_done()
            if owned:
                _release(window, owned)
                windows += 1
                if windows % _DROP_EVERY == 0:  # a large dump's pages, read through, go
                    for mf in owned:
                        mf.drop_pages()
    if derived:  # a derived reference value is said, on its key
        results = [_derived_note(kr, derived[kr.key]) if kr.key in derived else kr
                   for kr in results]
    if not results:  # comparing nothing proves nothing: never an all-clear
        results.append(KeyResult(key="(nothing compared)", passed=False, status="nothing",
                                 reason=msg.reason_nothing(a.name, b.name, bool(keys))))
    options = policy.options()
    if hi is not None:
        options["noise"] = hi.name
        options.setdefault("noise_factor", DEFAULT_NOISE_FACTOR)
    if keys:
        options["keys"] = [keys] if isinstance(keys, str) else list(keys)
    if left_out:
        options["left_out"] = left_out
    if coarse:  # said in the summary: a verdict the noise could not give is never silent
        options["not_calibrated"] = {"keys": len(coarse), "why": coarse[0]}
    return DiffResult(
        results=tuple(results),
        ref_name=a.name,
        other_name=b.name,
        options=options,
        created=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )


def _compare_columns(cp: ColumnPairs, policy: Criteria, owned: tuple[Any, ...],
                     results: list[KeyResult], names: tuple[str, str]) -> None:
    """``_compare``'s loop for two column dumps (``columns_batch``): the same windows, releases
    and page drops, the same per-key path for what the kernel does not take."""
    def slow(p: Pair) -> KeyResult:
        try:
            return _compare_pair(p, policy)
        except _native.MappedReadError as exc:  # SIGBUS in the kernel: one line, not a crash
            raise DumpChangedError.sigbus(p.key, names + (None,), getattr(exc, "argument", -1)) from None

    sides = sides_of(cp)
    release = [d._tree for d in (cp.ref, cp.other) if d.mapped_file in owned]
    windows = 0
    for start in range(0, cp.n, _WINDOW):
        keys = cp.window(_WINDOW)
        try:
            got = compare_columns(cp, policy, start, keys, slow, sides)
        except _native.MappedReadError:  # a dump truncated meanwhile: the per-key path names it
            got = [slow(Pair((k,), "leaf", cp.ref, cp.other, k)) for k in keys]
        results += [_with_half_side(kr, Pair((kr.key,), "leaf", cp.ref, cp.other, kr.key))
                    if kr.status == "failed" else kr for kr in got]
        if release:
            gone = dict.fromkeys(keys)  # ColumnTree.release of each, in one update
            for t in release:
                t._rows.update(gone)
            windows += 1
            if windows % _DROP_EVERY == 0:
                for mf in owned:
                    mf.drop_pages()


def _shrunk(sides: Sequence[Side]) -> DumpChangedError:
    """The error for a read that faulted outside any one key's comparison (the pairing by call
    order reads many keys): the file found shorter than when it was mapped, and its first key
    past the new end; every mapped file where none is (an I/O error under the mapping)."""
    files = []
    for s in sides:
        mf = getattr(s.tree, "mapped_file", None)
        if type(s.tree) is not Dump or mf is None:
            continue
        files.append(s.name)
        try:
            size = os.stat(mf.path).st_size
        except OSError:
            size = 0
        if size < mf.size:
            key = s.tree.key_past(size)
            where = s.name if key is None else f"{s.name}: key {key!r}"
            return DumpChangedError(f"{where}: the file was truncated while being read (SIGBUS)")
    where = " or ".join(dict.fromkeys(files))
    return DumpChangedError(f"{where}: a file could not be read while pairing its keys (SIGBUS)")


def _owned_files(sides: Sequence[Side]) -> tuple[Any, ...]:
    """The mapped files of the sides this comparison opened from paths (their dumps are nobody
    else's): nested dumps share their root's file, so the file tells a dump of theirs."""
    return tuple(mf for s in sides if s.owned and type(s.tree) is Dump
                 and (mf := s.tree.mapped_file) is not None)


def _release(window: Sequence[Pair], owned: tuple[Any, ...]) -> None:
    """Drop the specs of a compared window's leaves from the dumps opened here: results keep
    what they need (the batch's shapes and dtypes), and a million keys a side no longer hold a
    million specs until the end."""
    for p in window:
        if p.kind != "leaf":
            continue
        leaf = p.path[-1]
        for t in (p.ref_tree, p.other_tree):
            if type(t) is Dump and t.mapped_file in owned:
                t._release(leaf)


def _non_numeric(p: Pair, leaf: str) -> Optional[str]:
    """The reason for a pair where a side holds a value that is not numeric data, else None."""
    sides = []
    for name, tree in (("ref", p.ref_tree), ("other", p.other_tree)):
        if tree is None or p.kind == "type":
            continue
        # a Dump's spec says what the leaf is without reading it (the read follows, once)
        spec = getattr(tree, "spec", None)
        value = spec(leaf) if callable(spec) else tree[leaf]
        if isinstance(value, NonNumericValue):
            sides.append(f"{name} holds {value.what}")
    return msg.reason_non_numeric(sides) if sides else None


def _plain_array_key(tree: Any) -> Optional[str]:
    """The key of a dump that is one plain ``.npy`` array (named after its file), else None."""
    if getattr(tree, "format", None) == "npy-array" and len(tree) == 1:
        return next(iter(tree))
    return None


def _derived_note(kr: KeyResult, op: str) -> KeyResult:
    note = msg.note_derived(op)
    return dataclasses.replace(kr, note=note if not kr.note else f"{kr.note}; {note}")


def _as_ref_key(ref_tree: Any, tree: Any) -> Any:
    """Two plain-array files (``np.save(a)``, ``np.save(b)``) hold one array each, keyed by their
    file stems: compare them as one key, under the reference's name."""
    rk, ok = _plain_array_key(ref_tree), _plain_array_key(tree)
    if rk is None or ok is None or rk == ok:
        return tree
    return {rk: tree[ok]}


def _same_elements(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Shapes that hold the same elements in the same order: equal once size-1 axes are dropped
    ((1,) vs (), (90, 1) vs (90,), reprod_log's lr lists), unless one is the other reversed
    ((3, 1) vs (1, 3) is a transpose, which numpy would broadcast into a 3x3 cross product)."""
    if tuple(s for s in a if s != 1) != tuple(s for s in b if s != 1):
        return False
    return not (len(a) == len(b) >= 2 and b == a[::-1])


def _pair_nbytes(p: Pair) -> int:
    """Bytes a pair will read, from the dumps' structure (no array is read); 0 when unknown."""
    if p.kind != "leaf":
        return 0
    total = 0
    for tree in (p.ref_tree, p.other_tree):
        spec = getattr(tree, "spec", None)
        try:
            node = spec(p.path[-1]) if callable(spec) else tree[p.path[-1]]  # type: ignore[index]
            total += int(getattr(node, "nbytes", 0))
        except Exception:  # a value the adapters convert later; only the bar's total is off
            pass
    return total


def _with_half_side(kr: KeyResult, p: Pair) -> KeyResult:
    """``kr`` (failing, uncalibrated) with ``_half_side``'s note where it has one."""
    try:
        assert p.ref_tree is not None and p.other_tree is not None
        (ra, rdt), (oa, odt) = leaf_array(p.ref_tree, p.path[-1]), \
            leaf_array(p.other_tree, p.path[-1])
        note = _half_side(np.asarray(ra), np.asarray(oa), rdt, odt)
    except Exception:  # a note, never a verdict: the key's result stands as it is
        return kr
    if note is None:
        return kr
    return dataclasses.replace(kr, note=f"{kr.note}; {note}" if kr.note else note)


def _half_side(ra: np.ndarray, oa: np.ndarray, rdt: Optional[str], odt: Optional[str]
               ) -> Optional[str]:
    """What a failing key's values say where one side holds a half-precision run's values in
    float32 (a ``ReprodLogger`` ``.npy`` of a bfloat16 tensor, saved as reprod_log saves it)
    and the other does not: the dtypes shown are float32 both, and the difference is likely
    that run's rounding."""
    r = rdt if rdt in _HALF_DTYPES else carried_precision(ra)
    o = odt if odt in _HALF_DTYPES else carried_precision(oa)
    if (r is None) == (o is None) or r == o:
        return None
    side, p, other = ("other", o, "ref") if o is not None else ("ref", r, "other")
    held = {"ref": rdt, "other": odt}[side]
    return msg.note_half_side(side, str(p), str(held), other)


_HALF_DTYPES = ("bfloat16", "float16")


def _progress_bar(pairs: Sequence[Pair]) -> Progress:
    return Progress(total_keys=len(pairs), total_bytes=sum(_pair_nbytes(p) for p in pairs))


# Pairs handed to the batch kernel at a time: bounds its scratch (152 bytes a pair).
_WINDOW = 4096
_DROP_EVERY = 16  # windows between two drop_pages of the dumps opened here (64k keys)


def _compare_pair(p: Pair, policy: Criteria, *, bar: Optional[Progress] = None,
                  noise: Optional[Mapping[str, Any]] = None,
                  coarse: Optional[list[str]] = None) -> KeyResult:
    """One key's result; ``coarse`` collects why each key that a noise cannot speak for (a port
    rounding coarser than the reference) was left uncalibrated, for the summary."""
    key = p.key
    leaf = p.path[-1]
    equal_nan = policy.equal_nan
    thresholds = policy.thresholds_for(key)
    atol, rtol = policy.tolerance_for(key)
    methods = tuple(thresholds) or policy.methods
    base: dict[str, Any] = {"key": key, "path": p.path, "methods": methods, "thresholds": thresholds,
                            "atol": atol, "rtol": rtol}
    failed_checks = {m: False for m in thresholds}  # verdicts without a statistic fail every method
    odd = _non_numeric(p, leaf)
    if odd is not None:  # a str, None, list... in a reprod_log file: this key's verdict, not the file's
        return KeyResult(passed=False, status="type" if p.kind in ("leaf", "type") else p.kind,
                         checks=failed_checks, reason=odd, **base)
    if p.kind in ("missing", "extra"):
        tree = p.ref_tree if p.kind == "missing" else p.other_tree
        assert tree is not None
        arr, dt = leaf_array(tree, leaf)
        side = {"ref_shape": tuple(arr.shape), "ref_dtype": dt} if p.kind == "missing" else \
               {"other_shape": tuple(arr.shape), "other_dtype": dt}
        base["atol"], base["rtol"] = policy.tolerance_for(key, dt)
        return KeyResult(passed=False, status=p.kind, reason=msg.reason_one_sided(p.kind), size=int(arr.size),
                         checks=failed_checks, **side, **base)
    assert p.ref_tree is not None and p.other_tree is not None
    if p.kind == "type":
        return KeyResult(passed=False, status="type", checks=failed_checks,
                         reason=msg.REASON_TYPE, **base)
    ra, rdt = leaf_array(p.ref_tree, leaf)
    oa, odt = leaf_array(p.other_tree, leaf)
    atol, rtol = policy.tolerance_for(key, rdt, odt)
    base.update(ref_shape=tuple(ra.shape), other_shape=tuple(oa.shape), ref_dtype=rdt, other_dtype=odt,
                atol=atol, rtol=rtol)
    notes: list[str] = []
    if rdt != odt:
        notes.append(msg.note_dtypes(rdt, odt))
    if (ra.size == 0) != (oa.size == 0):
        return KeyResult(passed=False, status="empty", checks=failed_checks,
                         reason=msg.reason_empty(ra.shape, oa.shape),
                         size=int(ra.size), note="; ".join(notes) or None, **base)
    if ra.shape != oa.shape:
        if _same_elements(ra.shape, oa.shape) and not policy.strict_shape:
            notes.append(msg.note_size_one_axes(ra.shape, oa.shape))
            oa = oa.reshape(ra.shape)
        else:
            hint = ""
            if _same_elements(ra.shape, oa.shape):
                hint = msg.SIZE_ONE_AXES_STRICT
            elif ra.ndim >= 2 and oa.shape == ra.shape[::-1]:
                hint = msg.TRANSPOSE_HINT
            if hint:
                notes.append(hint)
            return KeyResult(passed=False, status="shape", checks=failed_checks,
                             reason=msg.reason_shape(ra.shape, oa.shape, hint),
                             size=int(ra.size), note="; ".join(notes) or None, **base)
    if ra.size == 0:
        return KeyResult(passed=True, status="passed", reason=msg.REASON_BOTH_EMPTY, checks={m: True for m in thresholds},
                         size=0, note="; ".join(notes) or None, **base)
    on_progress = None if bar is None else bar.per_element(ra.itemsize + oa.itemsize)
    # with a noise reference, its statistics come from the same pass (noise.calibrated_stats)
    st, cal = calibrated_stats(ra, oa, noise, p.path, rdt, odt, atol=atol, rtol=rtol,
                               equal_nan=equal_nan, on_progress=on_progress)
    values = {
        "mean_abs": st.mean_abs, "max_abs": st.max_abs, "min_abs": st.min_abs,
        "mean_rel": st.mean_rel, "max_rel": st.max_rel, "cosine": st.cosine,
        "rel_l2": st.rel_l2, "max_scaled": st.max_scaled,
    }
    if cal is not None:
        cal, factor, note = judge_precision(cal, st, ra, oa, rdt, odt, policy.noise_factor)
        if note:
            notes.append(note)
        if cal.multiple is None:
            notes.append(msg.note_uncalibrated(cal.why or "unknown"))
            if cal.coarser_port and coarse is not None:
                coarse.append(cal.why or "")
        else:
            if cal.flips:
                notes.append(msg.note_flips(*cal.flips))
            thresholds = {"noise": factor}
            base.update(methods=("noise",), thresholds=thresholds)
            values.update(noise_multiple=cal.multiple, noise_l2=cal.l2, noise_max=cal.max)
    if st.worst_flat is None:
        worst_index = None
    else:
        worst_index = unravel(int(st.worst_flat), tuple(ra.shape))
    status, reason, checks = "passed", "", {}
    if st.nan_unmatched:
        status = "nan"
        reason = msg.reason_nan(st.nan_unmatched, st.ref_nan, st.other_nan, equal_nan)
        checks = {m: False for m in thresholds}
    elif st.inf_unmatched:
        status = "inf"
        reason = msg.reason_inf(st.inf_unmatched, st.ref_inf, st.other_inf)
        checks = {m: False for m in thresholds}
    else:
        status, reason, checks = judged(values, thresholds, mismatched=st.mismatched, size=st.size,
                                         atol=atol, rtol=rtol, worst_index=worst_index,
                                         worst_ref=st.worst_ref, worst_other=st.worst_other)
    return KeyResult(
        passed=status == "passed", status=status, reason=reason, size=st.size,
        worst_index=worst_index, worst_ref=st.worst_ref, worst_other=st.worst_other,
        mismatched=st.mismatched, ref_nan=st.ref_nan, ref_inf=st.ref_inf,
        other_nan=st.other_nan, other_inf=st.other_inf, checks=checks,
        note="; ".join(notes) or None, **values, **base,
    )


