"""``reprod-diff``: compare two dumps (or two folders of dumps) from the command line.

A thin layer: parse arguments, call ``reprod.compare``, hand the result to a renderer, map the
verdict to an exit status (0 every key passed, 1 some key failed, 2 bad usage or unreadable input).
Only what the chosen output needs is imported, so a check in a CI loop starts fast.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import ReprodError

if TYPE_CHECKING:
    import argparse

    from .diff.result import DiffResult

__all__ = ["main", "build_parser", "DUMP_SUFFIXES"]


PROG = "reprod-diff"
DUMP_SUFFIXES = (".npy", ".npz")  # what folder mode compares (any case; reprod.trees.dump_files)
METHODS = ("mean", "max", "min", "all", "mean_rel", "max_rel", "rel_l2", "max_scaled")
FORMATS = ("table", "log", "json", "csv", "markdown")

# one compared pair: (relative path in folder mode, or None for two files; its result)
Compared = list[tuple[Optional[str], "DiffResult"]]


class UsageError(ReprodError):
    """Arguments that parse but do not make sense together (reported like an argparse error)."""


# --- arguments -------------------------------------------------------------------------------------


def _type_error(message: str) -> Exception:
    import argparse

    return argparse.ArgumentTypeError(message)


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise _type_error(
            f"invalid choice: {text!r} (choose from {', '.join(METHODS)}; comma lists allowed)"
        )
    return names


def _key_threshold(text: str) -> tuple[str, Union[float, dict[str, float]]]:
    # "PATTERN=VALUE": VALUE is a number (every judged method) or "method=number[,method=number]"
    pattern, sep, value = text.partition("=")
    if not sep or not pattern or not value:
        raise _type_error(f"expected PATTERN=VALUE, got {text!r}")
    try:
        if "=" not in value:
            return pattern, float(value)
        spec: dict[str, float] = {}
        for part in value.split(","):
            method, _, number = part.partition("=")
            method = method.strip()
            if method not in METHODS:
                raise _type_error(
                    f"unknown method {method!r} in {text!r} (choose from {', '.join(METHODS)})"
                )
            spec[method] = float(number)
        return pattern, spec
    except ValueError:
        raise _type_error(f"not a number in {text!r}") from None


def _row_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise _type_error(f"expected a row count (0 or more), got {text!r}")
    return n


def _terminal_columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def build_parser() -> argparse.ArgumentParser:
    """The ``reprod-diff`` argument parser (exposed for documentation and shell completion)."""
    import argparse

    class _Formatter(argparse.HelpFormatter):
        """argparse's formatter with the terminal width found as ``shutil.get_terminal_size``
        finds it (``COLUMNS``, then stdout's terminal, else 80) without importing shutil (and
        bz2, lzma): argparse builds a formatter for every ``add_argument``."""

        def __init__(self, prog: str, **kwargs: Any) -> None:
            if kwargs.get("width") is None:
                kwargs["width"] = _terminal_columns() - 2  # as HelpFormatter does with shutil's
            super().__init__(prog, **kwargs)

    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description=(
            "Compare two dumps written by reprod or reprod_log (.npy/.npz), key by key, or two "
            "folders of them (files paired by relative path). Exit status: 0 every key passed, "
            "1 some key failed, 2 bad usage or unreadable input."
        ),
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"reprod {__version__}")
    p.add_argument("ref", metavar="REF", help="reference dump or folder (e.g. the torch side)")
    p.add_argument("other", metavar="OTHER", help="dump or folder to check (e.g. the paddle side)")
    p.add_argument(
        "--threshold", type=float, default=1e-6, help="threshold of each method (default 1e-6)"
    )
    p.add_argument(
        "--method",
        action="append",
        type=_methods,
        metavar="{" + ",".join(METHODS) + "}",
        help="statistic(s) judged against the threshold; repeatable or a comma list (default mean)",
    )
    p.add_argument("--atol", type=float, help="also require |other-ref| <= atol + rtol*|ref|")
    p.add_argument("--rtol", type=float, help="relative part of the element-wise rule")
    p.add_argument(
        "--key-threshold",
        action="append",
        type=_key_threshold,
        default=[],
        metavar="PATTERN=VALUE",
        help="threshold for keys matching a name or glob: VALUE a number (every judged method) or "
        "METHOD=NUMBER[,...] (sets those methods' thresholds; repeatable)",
    )
    p.add_argument(
        "--keys", action="append", metavar="GLOB", help="compare only matching keys (repeatable)"
    )
    p.add_argument(
        "--equal-nan", action="store_true", help="NaNs at the same positions on both sides pass"
    )
    p.add_argument(
        "--noise",
        metavar="REF_HI",
        help="the reference computed in float64 (same keys; a folder when REF is one): each key "
        "found there passes when its difference is within --noise-factor times the reference's "
        "own float32 noise, instead of the plain threshold",
    )
    p.add_argument(
        "--noise-factor",
        type=float,
        metavar="F",
        help="with --noise: how many times its noise a key may differ (default 20)",
    )
    p.add_argument(
        "--other-noise",
        metavar="OTHER_HI",
        help="with --noise: the port computed in float64 (same keys; files only): a calibrated key "
        "that fails passes as the port's own rounding where the two float64 runs agree within "
        "the reference's float32 noise (a bug differs in float64 too)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="folders: compare file pairs on N local processes (default: one process)",
    )
    p.add_argument(
        "--scheduler",
        metavar="URL",
        help="folders: compare file pairs on a Dask cluster (tcp://host:8786; environment "
        "REPROD_SCHEDULER), each worker reading its files where they are (pip install dask[distributed])",
    )
    p.add_argument(
        "--by-order",
        action="store_true",
        help="pair OTHER's keys with REF's by order when their names differ: layer captures by "
        "call order, containers by the layers they hold, those pairing with nothing left out "
        "(reprod.capture.match_by_order); anything else leaf by leaf while shapes agree",
    )
    p.add_argument(
        "--rename",
        metavar="FILE",
        help="rename OTHER's keys before pairing: a JSON file holding {\"old name\": \"new name\"} "
        "or [[\"regex\", \"replacement\"], ...] (capture keys are renamed by layer name)",
    )
    p.add_argument(
        "--pair-inputs",
        action="store_true",
        help="layer captures: pair a call's input keyed otherwise on each side (in[hidden_states] "
        "against in[0]: a keyword against a position) by its values "
        "(reprod.capture.pair_inputs); --by-order does so already",
    )
    p.add_argument(
        "--strict-shape",
        action="store_true",
        help="shapes that differ only by axes of size 1 ((90, 1) vs (90,)) fail instead of being "
        "compared element by element",
    )
    p.add_argument("--format", choices=FORMATS, default="table", help="report format (table)")
    p.add_argument("--output", metavar="PATH", help="write the report to PATH instead of stdout")
    p.add_argument(
        "--first",
        action="store_true",
        help="report only the first failing key, in detail (instead of the --format report)",
    )
    p.add_argument(
        "--failed-only", action="store_true", help="table: list only the keys that failed"
    )
    p.add_argument(
        "--max-rows",
        type=_row_count,
        metavar="N",
        help="table: show at most N rows per table, then a '... M more rows' line",
    )
    p.add_argument(
        "--html", metavar="PATH", help="also write a self-contained HTML report to PATH"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the CRC of every .npz member before comparing (by default only members "
        "under 1 MiB are checked, when read)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="print nothing on stdout; the exit status tells"
    )
    return p


# flags that take no value, and options whose value is taken as argparse would take it; a command
# line of two paths and only these is read without argparse (importing and building the parser is
# ~8 ms of a 0.15 s run on 5,000 keys); anything else (abbreviations, --opt=value, a value or path
# starting with "-", a wrong count of paths, --help) goes to argparse, which also words the errors
_FAST_FLAGS = {"--equal-nan": "equal_nan", "--by-order": "by_order", "--strict-shape": "strict_shape",
               "--pair-inputs": "pair_inputs", "--first": "first", "--failed-only": "failed_only", "--verify": "verify",
               "--quiet": "quiet"}
_FAST_VALUES = {"--format": "format", "--output": "output", "--html": "html",
                "--threshold": "threshold"}
_DEFAULTS: dict[str, Any] = {
    "threshold": 1e-6, "method": None, "atol": None, "rtol": None, "key_threshold": [],
    "keys": None, "equal_nan": False, "noise": None, "noise_factor": None, "other_noise": None,
    "jobs": None,
    "scheduler": None, "by_order": False, "rename": None, "pair_inputs": False,
    "strict_shape": False, "format": "table", "output": None, "first": False, "failed_only": False, "max_rows": None,
    "html": None, "verify": False, "quiet": False,
}  # build_parser()'s defaults (tests/test_cli.py checks that they agree)


def _fast_args(argv: Sequence[str]) -> Optional[Any]:
    """``build_parser().parse_args(argv)`` for the common command lines, or None (see above)."""
    import types

    values: dict[str, Any] = dict(_DEFAULTS, key_threshold=[])
    paths: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if not isinstance(token, str) or not token:
            return None
        if not token.startswith("-"):
            paths.append(token)
        elif token in _FAST_FLAGS:
            values[_FAST_FLAGS[token]] = True
        elif token in _FAST_VALUES:
            value = next(tokens, None)
            if not value or value.startswith("-"):
                return None
            dest = _FAST_VALUES[token]
            if dest == "format" and value not in FORMATS:
                return None
            if dest == "threshold":
                try:
                    value = float(value)
                except ValueError:
                    return None
            values[dest] = value
        else:
            return None
    if len(paths) != 2:
        return None
    values["ref"], values["other"] = paths
    return types.SimpleNamespace(**values)


# --- comparing -------------------------------------------------------------------------------------


def _pairing(args: argparse.Namespace) -> Any:
    """The ``pair`` function of --by-order / --rename FILE / --pair-inputs (None without them)."""
    pair = _renaming(args)
    if not args.pair_inputs or args.by_order:  # match_by_order pairs inputs itself
        return pair

    def inputs_paired(ref: Any, other: Any) -> Any:
        from .capture.naming import pair_inputs

        return pair_inputs(ref, other if pair is None else pair(ref, other))

    return inputs_paired


def _renaming(args: argparse.Namespace) -> Any:
    if args.rename and args.by_order:
        raise UsageError("give --by-order or --rename FILE, not both")
    if args.rename:
        import json

        try:
            with open(args.rename, encoding="utf-8") as f:
                rules = json.load(f)
        except OSError as exc:
            raise UsageError(f"{args.rename}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"{args.rename}: not JSON ({exc})") from None
        if isinstance(rules, list) and all(isinstance(r, list) and len(r) == 2 for r in rules):
            rules = [tuple(r) for r in rules]
        elif not (isinstance(rules, dict) and all(isinstance(v, str) for v in rules.values())):
            raise UsageError(f"{args.rename}: expected {{\"old\": \"new\"}} or [[\"regex\", \"replacement\"], ...]")
        from .capture.naming import rename

        return lambda ref, other: rename(other, rules)
    if not args.by_order:
        return None

    def by_order(ref: Any, other: Any) -> Any:
        from .capture.naming import match_by_order, parse_key
        from .diff.pairing import rename_leaves_by_order

        keys = list(ref)
        if keys and sum(parse_key(k) is not None for k in keys) * 2 > len(keys):
            return match_by_order(ref, other)  # layer captures: by call order and shapes
        return rename_leaves_by_order(ref, other)

    return by_order


_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pdparams")


def _open(path: str, verify: bool = False) -> Any:
    """Dumps open lazily (``verify``: every .npz member's CRC is checked first); weight files
    (torch or paddle) are read safely and brought to paddle's names and layout, so
    ``reprod-diff model.pth model.pdparams`` compares across frameworks."""
    if not path.endswith(_WEIGHT_SUFFIXES):
        if verify:
            from .storage import load

            return load(path, verify=True)
        return path
    import warnings

    from .storage.framework_files import load_weights_as_dump

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = load_weights_as_dump(path)
    for w in caught:
        text = str(w.message)
        if text.startswith(f"{path}: "):  # the note names the file once
            text = text[len(path) + 2:]
        if "; pass model=" in text:  # reprod-diff has no --model: say what does decide
            text = text.split("; pass model=")[0] + (
                "; to decide from nn.Linear layers, convert it with reprod-convert --model "
                "MODULE:FACTORY and compare the .pdparams it writes")
        print(f"{PROG}: note: {path}: {text}", file=sys.stderr)
    from .diff.pairing import Named

    return Named(weights, path)


def _run(args: argparse.Namespace) -> tuple[Compared, Optional[tuple[Any, Any]]]:
    """The comparisons, and for two files the two opened sides (the HTML report reads them again
    for its histograms)."""
    from .diff.engine import compare  # what reprod.compare calls, without reprod_log's helpers

    methods: list[str] = [m for group in (args.method or [["mean"]]) for m in group]
    per_key: dict[str, Any] = {}
    for pattern, value in args.key_threshold:
        if isinstance(value, dict) and isinstance(per_key.get(pattern), dict):
            per_key[pattern].update(value)
        else:
            per_key[pattern] = value
    from .diff.criteria import Criteria

    # built before any file is read: a NaN or negative limit is a usage error, not a pass
    criteria = Criteria(methods=methods[0] if len(methods) == 1 else methods,
                        threshold=args.threshold, atol=args.atol, rtol=args.rtol,
                        per_key=per_key or None, equal_nan=args.equal_nan,
                        strict_shape=args.strict_shape, noise_factor=args.noise_factor)
    if args.noise_factor is not None and args.noise is None:
        raise UsageError("--noise-factor needs --noise REF_HI (the reference run in float64)")
    if args.other_noise is not None and args.noise is None:
        raise UsageError("--other-noise needs --noise REF_HI (the reference run in float64)")
    options: dict[str, Any] = {
        "criteria": criteria,
        "keys": args.keys,
        "progress": False if args.quiet else None,
    }
    pair = _pairing(args)
    if pair is not None:
        options["pair"] = pair
    for path in (args.ref, args.other) + tuple(p for p in (args.noise, args.other_noise) if p):
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such file or directory")
    ref_dir, other_dir = os.path.isdir(args.ref), os.path.isdir(args.other)
    if ref_dir != other_dir:
        folder, file = (args.ref, args.other) if ref_dir else (args.other, args.ref)
        raise UsageError(f"{folder} is a folder but {file} is not: give two files or two folders")
    sides: Optional[tuple[Any, Any]] = None
    if args.noise and os.path.isdir(args.noise) != ref_dir:
        raise UsageError(f"--noise {args.noise} must be a folder exactly when {args.ref} is one")
    if args.other_noise and (ref_dir or pair is not None):
        raise UsageError("--other-noise works on two files under the same keys: leave out "
                         "folders and --by-order/--rename/--pair-inputs")
    if ref_dir:
        # folders: every file pair through compare_trees (serially, on a local process pool with
        # --jobs, on a Dask cluster with --scheduler / REPROD_SCHEDULER); --by-order/--rename run
        # their renaming here, in this process
        from .trees import compare_trees

        scheduler = args.scheduler or os.environ.get("REPROD_SCHEDULER") or None
        if pair is not None and (scheduler or (args.jobs or 1) > 1):
            raise UsageError("--by-order/--rename/--pair-inputs work in one process: leave out "
                             "--jobs/--scheduler")
        tree = compare_trees(args.ref, args.other, criteria=criteria, noise=args.noise,
                             jobs=args.jobs, scheduler=scheduler, keys=args.keys,
                             verify=args.verify, progress=False if args.quiet else None, pair=pair)
        compared: Compared = list(tree.pairs)
    else:
        sides = (_open(args.ref, args.verify), _open(args.other, args.verify))
        if args.noise:
            options["noise"] = _open(args.noise, args.verify)
        if args.other_noise:
            options["other_noise"] = _open(args.other_noise, args.verify)
        compared = [(None, compare(*sides, **options))]
    if args.keys and all(kr.status == "nothing" for _, result in compared for kr in result):
        globs = ", ".join(repr(k) for k in args.keys)
        raise UsageError(f"no key matches --keys {globs} in {args.ref} or {args.other}")
    return compared, sides


def _settings_files(ref: str, other: str) -> bool:
    """Whether both inputs are layer settings files (``reprod.align.save_settings``'s JSON)."""
    for path in (ref, other):
        if not path.endswith(".json"):
            return False
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError:
            return False
        if b'"reprod-settings"' not in head:
            return False
    return True


def _compare_settings(args: argparse.Namespace) -> int:
    """``reprod-diff settings_torch.json settings_paddle.json``: the layer settings that differ
    (``reprod.align.compare_settings``), 1 where any does."""
    from .align.settings import compare_settings

    try:
        report = compare_settings(args.ref, args.other)
    except ReprodError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(str(report))
        print(f"{len(report.differ)} layer setting{'s' if len(report.differ) != 1 else ''} "
              f"differ{'s' if len(report.differ) == 1 else ''}: "
              + ("PASSED" if report.passed else "FAILED"))
    return 0 if report.passed else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``reprod-diff`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    >>> main(["torch.npy", "paddle.npy", "--threshold", "1e-5", "--quiet"])
    0
    """
    for stream in (sys.stdout, sys.stderr):
        # a key or file name with lone surrogates (a non-UTF-8 file name) must not end the report
        # with a UnicodeEncodeError under a strict UTF-8 locale: it is printed escaped
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", "") == "strict":
            stream.reconfigure(errors="backslashreplace")
    args = _fast_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help (0) and usage errors (2): return rather than exit
            return exc.code if isinstance(exc.code, int) else 2
    if _settings_files(args.ref, args.other):
        return _compare_settings(args)
    try:
        from ._gc import gc_paused

        with gc_paused():  # imports, opening and comparing build no reference cycle (see _gc)
            compared, sides = _run(args)
            if args.quiet and not args.output and not args.html:
                # nothing to write: the verdict, before the collector walks what was built
                return 0 if all(result.passed for _, result in compared) else 1
        pieces: Iterable[str] = ()
        if args.quiet and not args.output:
            pass  # nothing is printed: rendering (and importing tabulate) is wasted work
        elif args.first:
            from .cli_output import _first

            pieces = [_first(compared)]
        elif args.output:
            from .cli_output import _render_pieces

            pieces = _render_pieces(compared, args)  # JSON: written a key at a time
        else:
            from .cli_output import _render

            pieces = [_render(compared, args)]
        if args.html:
            from .cli_output import _write_html

            _write_html(compared, args.html, sides)
        if args.output:
            from .cli_output import _summary, _write_atomic

            with gc_paused():  # the writers' batches build no cycle either (see _gc)
                _write_atomic(args.output, itertools.chain(pieces, ["\n"]))
            if not args.quiet:
                print(_summary(compared))
        elif not args.quiet:
            print("".join(pieces))
    except BrokenPipeError:
        # the reader went away (`reprod-diff a b | head`): not an input error, keep the verdict;
        # point stdout at devnull so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except ReprodError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input or unwritable --output: the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    passed = all(result.passed for _, result in compared)
    return 0 if passed else 1
