"""``reprod-diff``'s outputs: the summary line, the first-failure block, the chosen format, and
writing it (``--output``, ``--html``). JSON, CSV and log lines are written a key at a time to a
file, so that a million keys never make one string of gigabytes."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import argparse

    from .cli import Compared
    from .diff.result import DiffResult

__all__: list[str] = []



def _summary(compared: Compared) -> str:
    if len(compared) == 1 and compared[0][0] is None:
        return compared[0][1].summary_line()
    results = [r for _, result in compared for r in result.results]
    passed = sum(r.passed for r in results)
    head = (
        f"{len(compared)} file{'' if len(compared) == 1 else 's'}, {len(results)} "
        f"key{'' if len(results) == 1 else 's'} compared, {passed} passed, "
        f"{len(results) - passed} failed"
    )
    for rel, result in compared:
        first = result.first_failure
        if first is not None:
            return head + f": FAILED; first failure {rel}: {first.key}: {first.reason}"
    return head + ": PASSED"


def _first(compared: Compared) -> str:
    from .report.table import render_first_failure

    for rel, result in compared:
        if not result.passed:
            text = render_first_failure(result)
            where = _divergence(result)
            if where:
                text = f"{where}\n{text}"
            return text if rel is None else f"file: {rel}\n{text}"
    keys = sum(len(result) for _, result in compared)
    return f"all keys passed ({keys} compared)"


def _divergence(result: DiffResult) -> str:
    """For layer-by-layer captures (``reprod.capture`` keys), where the two models part ways."""
    from .capture.naming import parse_key

    if not any(parse_key(k.key) is not None for k in result):
        return ""
    from .capture import first_divergence

    div = first_divergence(result)
    return "" if div is None else div.message


def _log_lines(result: DiffResult) -> list[str]:
    try:
        from .report.log import render_log
    except ImportError:  # pragma: no cover - the log renderer ships with reprod
        raise _usage_error("--format log is not available in this installation") from None
    return list(render_log(result))


def _by_file(compared: Compared) -> dict[str, DiffResult]:
    return {str(rel): result for rel, result in compared}


def _render(compared: Compared, args: argparse.Namespace) -> str:
    fmt = args.format
    single = len(compared) == 1 and compared[0][0] is None
    trim = {"failed_only": getattr(args, "failed_only", False),
            "max_rows": getattr(args, "max_rows", None)}
    if fmt != "table" and (trim["failed_only"] or trim["max_rows"] is not None):
        raise _usage_error(f"--failed-only and --max-rows shape the table; --format {fmt} "
                         "writes every key")
    if fmt == "json":
        from .report.data import files_to_json, to_json

        if single:
            return to_json(compared[0][1])
        return files_to_json(_by_file(compared))
    if fmt == "csv":
        from .report.data import files_to_csv, to_csv

        if single:
            return to_csv(compared[0][1]).rstrip("\n")
        return files_to_csv(_by_file(compared)).rstrip("\n")
    if fmt == "markdown":
        from .report.data import to_markdown

        if single:
            return to_markdown(compared[0][1]).rstrip("\n")
        parts = [f"## {rel}\n\n{to_markdown(result).rstrip()}" for rel, result in compared]
        return "\n\n".join(parts) + "\n\n" + _summary(compared)
    if fmt == "log":
        if single:
            return "\n".join(_log_lines(compared[0][1]))
        parts = ["\n".join([f"== {rel} ==", *_log_lines(result)]) for rel, result in compared]
        return "\n\n".join(parts) + "\n\n" + _summary(compared)
    from .report.table import render_table

    if single:
        return render_table(compared[0][1], **trim)
    parts = [f"== {rel} ==\n{render_table(result, **trim)}" for rel, result in compared]
    return "\n\n".join(parts) + "\n\n" + _summary(compared)


def _write_atomic(path: str, text: Union[str, Iterable[str]]) -> None:
    """``--output``: ``-`` is stdout; a file is replaced atomically (through a symlink, keeping
    its permissions); a FIFO or device (``/dev/null``, ``>(cat)``) is written, never replaced.
    ``text``: a string, or its pieces (``_render_pieces``), written as they come."""
    pieces = [text] if isinstance(text, str) else text
    if path == "-":
        for piece in _batched(pieces):
            sys.stdout.write(piece)
        sys.stdout.flush()
        return
    from .storage.atomic import AtomicFile

    with AtomicFile(path) as f:
        for piece in _batched(pieces):
            # a key or file name may hold lone surrogates (a non-UTF-8 file name): written escaped
            f.file.write(piece.encode("utf-8", "backslashreplace"))


def _batched(pieces: Iterable[str], size: int = 1 << 20) -> Iterator[str]:
    """The pieces joined into runs of about ``size`` characters: one write per key would cost
    more than the key's text."""
    run: list[str] = []
    n = 0
    for piece in pieces:
        run.append(piece)
        n += len(piece)
        if n >= size:
            yield "".join(run)
            run, n = [], 0
    if run:
        yield "".join(run)


def _render_pieces(compared: Compared, args: argparse.Namespace) -> Iterable[str]:
    """``_render``'s text, in pieces where a format can be written a key at a time (JSON of two
    files); checked now, rendered as the pieces are taken."""
    if len(compared) == 1 and compared[0][0] is None and not getattr(args, "failed_only", False) \
            and getattr(args, "max_rows", None) is None:
        result = compared[0][1]
        if args.format == "json":
            from .report.data import iter_json

            return iter_json(result)
        if args.format == "csv":
            from .report.data import iter_csv

            return _rstrip_newlines(iter_csv(result))
        if args.format == "log":
            from .report.log import iter_log_text

            return iter_log_text(result)
    return [_render(compared, args)]


def _rstrip_newlines(pieces: Iterable[str]) -> Iterator[str]:
    """The pieces of a text, its trailing newlines left out (``text.rstrip("\n")``)."""
    held = ""
    for piece in pieces:
        if piece.rstrip("\n"):
            if held:
                yield held
            held = piece
        else:
            held += piece  # only newlines: they go only if text follows
    yield held.rstrip("\n")


def _write_html(compared: Compared, path: str, sides: Optional[tuple[Any, Any]] = None) -> None:
    from .report.html import write_html

    results = [r for _, r in compared]
    findings = _html_findings(compared)
    if len(results) == 1:
        histograms = None
        if sides is not None:
            from .diff.histogram import result_histograms

            histograms = result_histograms(results[0], *sides)
        write_html(results[0], path, histograms=histograms, findings=findings)
        return
    # folders: one page over every file, keys prefixed with their file (and grouped by it, for
    # the page's per-file summary)
    from .diff.result import DiffResult

    merged = []
    for rel, r in compared:
        merged.extend(
            replace(k, key=f"{rel}:{k.key}", path=(str(rel), *(k.path or (k.key,)))) for k in r
        )
    first = results[0] if results else None
    write_html(DiffResult(results=tuple(merged), ref_name=getattr(first, "ref_name", "ref"),
                          other_name=getattr(first, "other_name", "other"),
                          options=getattr(first, "options", {}), created=getattr(first, "created", "")),
               path, findings=findings)


def _html_findings(compared: Compared) -> list[str]:
    """The sentences the HTML page opens with: where layer captures diverge
    (``reprod.capture.first_divergence``), else the first failure and its reason."""
    from .capture import first_divergence
    from .capture.naming import parse_key

    several = len(compared) > 1
    findings: list[str] = []
    for rel, result in compared:
        keys = result.keys()
        if not keys or 2 * sum(parse_key(k) is not None for k in keys) <= len(keys):
            continue  # not (mostly) layer captures
        div = first_divergence(result)
        if div is not None:
            findings.append(f"{rel}: {div.message}" if several else div.message)
    if not findings:
        for rel, result in compared:
            first = result.first_failure
            if first is not None:
                key = f"{rel}:{first.key}" if several else first.key
                findings.append(f"first failure: {key}: {first.reason}")
                break
    return findings


def _usage_error(text: str) -> Exception:
    from .cli import UsageError  # defined beside the parser; imported here when raised

    return UsageError(text)
