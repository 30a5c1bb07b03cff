"""The session report of the pytest plugin (``--reprod-report PATH``): every alignment check of a
test session, as JSON (the default) or, for a ``.txt``/``.log`` path, as text (each check's table,
then one summary line)."""

from __future__ import annotations

import json
from typing import Any

from ..diff.result import DiffResult

__all__ = ["write_session_report", "session_text", "checks_text"]

TEXT_SUFFIXES = (".txt", ".log")


def checks_text(n: int) -> str:
    return f"{n} alignment check{'' if n == 1 else 's'}"



def write_session_report(path: str, checks: list[dict[str, Any]]) -> None:
    from ..storage.atomic import AtomicFile

    failed = sum(not c["passed"] for c in checks)
    if path.lower().endswith(TEXT_SUFFIXES):
        text = session_text(checks, failed)
    else:
        doc = {
            "passed": failed == 0,
            "summary": {"checks": len(checks), "passed": len(checks) - failed, "failed": failed},
            "checks": checks,
        }
        text = json.dumps(doc, indent=2) + "\n"
    with AtomicFile(path) as f:
        f.file.write(text.encode("utf-8"))


def session_text(checks: list[dict[str, Any]], failed: int) -> str:
    from .table import render_table

    parts = []
    for c in checks:
        verdict = "passed" if c["passed"] else "FAILED"
        head = f"== {c['nodeid'] or '<outside a test>'} ({c['kind']}): {verdict}"
        if c["reference"]:
            head += f"\n   reference: {c['reference']}"
        body = render_table(DiffResult.from_dict(c["result"]))
        if not c["passed"]:
            body += "\n" + c["message"]
        parts.append(head + "\n" + body)
    parts.append(f"{checks_text(len(checks))}, {len(checks) - failed} passed, {failed} failed")
    return "\n\n".join(parts) + "\n"
