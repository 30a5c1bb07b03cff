"""The keys of a result in time order: each key's pass (a run of forward keys, then the
gradients of that step), and the forward order of each pass (where each layer call started)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from ...diff.result import DiffResult, KeyResult
from ..naming import CaptureKey, parse_key


@dataclass
class _Entry:
    pos: int
    kr: KeyResult
    parsed: Optional[CaptureKey]
    pass_index: Optional[int]  # None: not placed in time (keys only in other come last)
    backward: bool  # recorded after this pass's first gradient


def _entries(result: DiffResult) -> list[_Entry]:
    out = []
    index, backward = 0, False
    for pos, kr in enumerate(result.results):
        parsed = parse_key(kr.key)
        if kr.status == "extra":
            out.append(_Entry(pos, kr, parsed, None, False))
            continue
        if parsed is not None:
            if parsed.what in ("in", "out"):
                if backward:  # forward keys after gradients: the next step
                    index, backward = index + 1, False
            else:
                backward = True
        out.append(_Entry(pos, kr, parsed, index, backward))
    return out


class _Pass:
    """The forward order of one pass: where each layer call and each layer started."""

    def __init__(self, index: int, order: Optional[Sequence[str]]) -> None:
        self.index = index
        self.start: dict[str, int] = {}  # layer call -> position of its first forward key
        self.name_start: dict[str, int] = {}  # layer -> its first call's position
        self.local: dict[str, str] = {}  # layer call -> the call within this pass (relu#5 -> relu#2)
        self._calls: dict[str, int] = {}
        self._order = None if order is None else {s: i for i, s in enumerate(order)}

    def add_forward(self, parsed: CaptureKey, pos: int) -> None:
        subject = parsed.subject
        if subject in self.start:
            return
        self.start[subject] = pos
        self.name_start.setdefault(parsed.name, pos)
        call = self._calls.get(parsed.name, 0) + 1
        self._calls[parsed.name] = call
        self.local[subject] = parsed.name if call == 1 else f"{parsed.name}#{call}"

    def call_position(self, subject: str, name: str) -> Optional[int]:
        if self._order is not None:
            local = self.local.get(subject, subject)
            found = self._order.get(local)
            return self._order.get(name) if found is None else found
        return self.start.get(subject)

    def layer_position(self, name: str) -> Optional[int]:
        if self._order is not None:
            return self._order.get(name)
        return self.name_start.get(name)
