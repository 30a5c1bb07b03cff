"""What ``reprod.compare_trees`` returns: a ``TreeResult`` of file pairs, reported by step, then
rank (``by_step``), with the tree's first divergence (earliest step, lowest rank, call order)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ..diff.result import DiffResult, KeyResult

__all__ = ["TreeResult", "TreeEntry", "StepReport", "Divergence"]


@dataclass(frozen=True)
class TreeEntry:
    """One file pair of the tree: its verdicts, and the rank and step its path names.

    ``status``: ``compared``; ``missing`` (the file is absent on one side: ``absent`` says which,
    ``"ref"`` or ``"other"``; its keys fail as missing/extra); ``error`` (not compared: the
    worker died, or with ``errors="report"`` the file could not be read; ``reason`` says why).
    ``keys``/``passed_keys`` count every key even when ``failed_only`` kept only the failing
    ``KeyResult``s in ``result``."""

    rel: str
    result: DiffResult
    status: str
    rank: Optional[int]
    step: Optional[int]
    keys: int
    passed_keys: int
    absent: Optional[str] = None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "compared" and self.keys == self.passed_keys

    @property
    def failed_keys(self) -> int:
        return self.keys - self.passed_keys

    @property
    def first_failure(self) -> Optional[KeyResult]:
        return None if self.passed else self.result.first_failure


def _where(step: Optional[int], rank: Optional[int]) -> str:
    parts = [] if step is None else [f"step {step}"]
    if rank is not None:
        parts.append(f"rank {rank}")
    return ", ".join(parts)


def _ranks_text(ranks: Sequence[int], limit: int = 12) -> str:
    """``5``; ``0-3, 7, 9``: runs of consecutive ranks joined."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    if len(parts) > limit:
        parts = parts[:limit] + [f"... ({len(ranks)} in all)"]
    return ", ".join(parts)


@dataclass(frozen=True)
class StepReport:
    """The pairs of one step, by rank (ranks in increasing order; ``None``: no rank in the path,
    listed first)."""

    step: Optional[int]
    ranks: dict[Optional[int], tuple[TreeEntry, ...]]

    @property
    def failing_ranks(self) -> list[Optional[int]]:
        return [r for r, es in self.ranks.items() if not all(e.passed for e in es)]

    @property
    def passing_ranks(self) -> list[Optional[int]]:
        return [r for r, es in self.ranks.items() if all(e.passed for e in es)]

    @property
    def passed(self) -> bool:
        return not self.failing_ranks

    @property
    def disagree(self) -> bool:
        """Some ranks of this step pass and others fail: a rank-local bug (one bad rank's data,
        sharding, a collective) rather than a port bug every rank shares."""
        return bool(self.failing_ranks) and bool(self.passing_ranks)

    def line(self) -> str:
        """``step 3: rank 5 fails, 63 ranks pass``; ``step 3: every rank fails (64 ranks)``."""
        head = "files without a step" if self.step is None else f"step {self.step}"
        bad, good = self.failing_ranks, self.passing_ranks
        if list(self.ranks) == [None]:  # no rank in these paths
            es = self.ranks[None]
            n_bad = sum(not e.passed for e in es)
            files = f"{len(es)} file pair{'s' if len(es) != 1 else ''}"
            return f"{head}: {files}, " + ("all pass" if not n_bad else f"{n_bad} fail")
        n = len(self.ranks)
        if not bad:
            return f"{head}: every rank passes ({n} rank{'s' if n != 1 else ''})"
        if not good:
            return f"{head}: every rank fails ({n} rank{'s' if n != 1 else ''})" if n > 1 \
                else f"{head}: rank {_rank_name(bad[0])} fails (the only rank)"
        named = [r for r in bad if r is not None]
        what = (f"rank {named[0]} fails" if len(bad) == 1 and named else
                f"ranks {_ranks_text(named)} fail" if len(named) == len(bad) else
                f"{len(bad)} ranks fail")
        return f"{head}: {what}, " + ("1 rank passes" if len(good) == 1 else
                                      f"{len(good)} ranks pass")


def _rank_name(rank: Optional[int]) -> str:
    return "(none)" if rank is None else str(rank)


@dataclass(frozen=True)
class Divergence:
    """Where the tree first goes wrong: the earliest step, its lowest failing rank, that rank's
    first failing file (file order) and that file's first failing key (call order)."""

    step: Optional[int]
    rank: Optional[int]
    rel: str
    key: Optional[KeyResult]
    entry: TreeEntry

    def line(self) -> str:
        where = _where(self.step, self.rank)
        head = f"first divergence: {where + ': ' if where else ''}{self.rel}"
        if self.key is None:
            return head
        return f"{head}, key {self.key.key!r}: {self.key.reason}"


def _order(v: Optional[int]) -> tuple[int, int]:
    return (0, 0) if v is None else (1, v)


@dataclass(frozen=True)
class TreeResult:
    """The comparison of two trees of dumps.

    ``pairs``: ``(relative path, DiffResult)`` for every file pair, the reference's files in
    sorted order then the files only the other tree holds (reprod-diff's folder order).
    ``entries``: the same pairs with their status, rank, step and key counts. ``by_step()``,
    ``first_divergence()`` and ``summary_lines()`` read them by step, then rank."""

    ref: str
    other: str
    entries: tuple[TreeEntry, ...]
    mode: str = "serial"
    seconds: float = 0.0

    @property
    def pairs(self) -> list[tuple[str, DiffResult]]:
        return [(e.rel, e.result) for e in self.entries]

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.entries)

    @property
    def failed(self) -> list[TreeEntry]:
        return [e for e in self.entries if not e.passed]

    @property
    def missing(self) -> list[TreeEntry]:
        return [e for e in self.entries if e.status == "missing"]

    @property
    def errors(self) -> list[TreeEntry]:
        return [e for e in self.entries if e.status == "error"]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Any:
        return iter(self.pairs)

    def __repr__(self) -> str:
        n, bad = len(self.entries), len(self.failed)
        return f"<TreeResult {n} file pairs: {n - bad} passed, {bad} failed ({self.mode})>"

    def by_step(self) -> list[StepReport]:
        """One report per step in increasing order (files whose path names no step first), each
        with its ranks in increasing order and each rank's pairs in file order."""
        steps: dict[Optional[int], dict[Optional[int], list[TreeEntry]]] = {}
        for e in self.entries:
            steps.setdefault(e.step, {}).setdefault(e.rank, []).append(e)
        out = []
        for s in sorted(steps, key=_order):
            ranks = steps[s]
            out.append(StepReport(step=s, ranks={
                r: tuple(sorted(ranks[r], key=lambda e: e.rel)) for r in sorted(ranks, key=_order)
            }))
        return out

    def first_divergence(self) -> Optional[Divergence]:
        """The earliest step with a failure, its lowest failing rank, that rank's first failing
        file in file order, and that file's first failing key in call order; None if all pass."""
        for sr in self.by_step():
            for rank, es in sr.ranks.items():
                for e in es:
                    if not e.passed:
                        return Divergence(step=sr.step, rank=rank, rel=e.rel,
                                          key=e.result.first_failure, entry=e)
        return None

    def summary(self) -> dict[str, Any]:
        ranks = {e.rank for e in self.entries if e.rank is not None}
        steps = {e.step for e in self.entries if e.step is not None}
        first = self.first_divergence()
        return {
            "pairs": len(self.entries),
            "passed": sum(e.passed for e in self.entries),
            "failed": len(self.failed),
            "missing": len(self.missing),
            "errors": len(self.errors),
            "keys": sum(e.keys for e in self.entries),
            "failed_keys": sum(e.failed_keys for e in self.entries),
            "ranks": len(ranks),
            "steps": len(steps),
            "first_divergence": None if first is None else {
                "step": first.step, "rank": first.rank, "file": first.rel,
                "key": None if first.key is None else first.key.key},
            "mode": self.mode,
            "seconds": self.seconds,
        }

    def summary_lines(self, *, max_lines: int = 20) -> list[str]:
        """The verdict of the tree in a few lines: the count, the first divergence, one line per
        failing step (saying whether every rank fails or only some), then missing and error
        pairs (at most ``max_lines`` of those, then a count)."""
        s = self.summary()
        shape = []
        if s["steps"]:
            shape.append(f"{s['steps']} step{'s' if s['steps'] != 1 else ''}")
        if s["ranks"]:
            shape.append(f"{s['ranks']} rank{'s' if s['ranks'] != 1 else ''}")
        head = f"{s['pairs']} file pair{'s' if s['pairs'] != 1 else ''}"
        if shape:
            head += f" ({' x '.join(shape)})"
        head += f", {s['passed']} passed, {s['failed']} failed"
        extra = [f"{s['missing']} missing on one side"] if s["missing"] else []
        extra += [f"{s['errors']} not compared"] if s["errors"] else []
        if extra:
            head += f" ({', '.join(extra)})"
        head += f"; {s['keys']:,} keys, {s['failed_keys']:,} failed"
        lines = [head + (": PASSED" if self.passed else ": FAILED")]
        first = self.first_divergence()
        if first is not None:
            lines.append(first.line())
        reports = self.by_step()
        good = [r for r in reports if r.passed]
        for r in reports:
            if not r.passed:
                lines.append(r.line())
        if good and len(good) < len(reports):
            named = [r.step for r in good if r.step is not None]
            lines.append(f"steps {_ranks_text(named)}: every pair passes" if len(named) > 1 else
                         f"step {named[0]}: every pair passes" if named else
                         "files without a step: every pair passes")
        odd = [e for e in self.entries if e.status != "compared"]
        for e in odd[:max_lines]:
            if e.status == "missing":
                lines.append(f"{e.rel}: missing in the {'other' if e.absent == 'other' else 'reference'}"
                             f" tree ({e.reason})")
            else:
                lines.append(f"{e.rel}: not compared: {e.reason}")
        if len(odd) > max_lines:
            lines.append(f"... and {len(odd) - max_lines} more missing or uncompared pairs")
        return lines


