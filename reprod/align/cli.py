"""``reprod-convert``: a PyTorch weight file -> a Paddle ``.pdparams``, through ``reprod.align``'s rules.

    reprod-convert model.pth model.pdparams --model mypkg.models:resnet50 --rename '^module\\.='
    reprod-convert model.pth model.pdparams --by-order --paddle-model mypkg.paddle_models:resnet50
    reprod-convert model.pth model.pdparams --by-order --model mypkg.models:resnet50 \\
        --paddle-model mypkg.paddle_models:resnet50 --inputs x.npy   # in the order layers run

Exit status: 0 written (or shown, with ``--dry-run``), 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

from ..errors import ReprodError
from ..storage.framework_files import PADDLE_SUFFIXES, TORCH_SUFFIXES, write_pdparams
from .conversion import Conversion, HeuristicLinearWarning, check_fits, convert
from .rules import ConversionRules

__all__ = ["main", "load_factory"]

PROG = "reprod-convert"


def load_factory(spec: str) -> Callable[[], Any]:
    """``"package.module:factory"`` or ``"path/to/file.py:factory"`` -> the callable it names.

    The current directory is importable, as it is for ``python -m``.

    >>> build = load_factory("models.resnet:resnet50"); model = build()
    """
    if ":" not in spec:
        raise ReprodError(
            f"--model {spec!r}: expected MODULE:FACTORY (e.g. models.resnet:resnet50)"
        )
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py") or os.sep in target:
            if not os.path.isfile(target):
                raise ReprodError(f"{target}: no such file")
            mod_spec = importlib.util.spec_from_file_location(
                os.path.splitext(os.path.basename(target))[0], target
            )
            if mod_spec is None or mod_spec.loader is None:
                raise ReprodError(f"{target}: cannot be imported")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except ReprodError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why, in one line
        raise ReprodError(f"{spec}: cannot import {target} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ReprodError(f"{spec}: {target} has no callable {attr!r}")
    return factory


def _build(spec: str, what: str) -> Any:
    try:
        return load_factory(spec)()
    except ReprodError:
        raise
    except Exception as exc:
        raise ReprodError(
            f"{what} {spec}: the factory failed ({type(exc).__name__}: {exc})"
        ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a PyTorch state dict into a Paddle .pdparams: nn.Linear weights "
        "transposed, BatchNorm running_mean/running_var renamed to _mean/_variance, "
        "num_batches_tracked dropped, plus your rules. Patterns are regular expressions searched in "
        "the PyTorch key.",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"reprod {__version__}")
    p.add_argument(
        "src", help=f"PyTorch weights ({', '.join(TORCH_SUFFIXES)}), read with weights_only=True"
    )
    p.add_argument("dst", help="the .pdparams to write (atomically)")
    p.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="builds the torch model: Linear weights are then found by isinstance, not "
        "guessed, and the file must fit the model",
    )
    p.add_argument(
        "--paddle-model",
        metavar="MODULE:FACTORY",
        help="builds the Paddle model: the result must fit it (every key, shape, dtype); "
        "the reference's tensors one of its tensors fuses are fused (--fuse-groups)",
    )
    p.add_argument(
        "--by-order",
        action="store_true",
        help="name each tensor after the Paddle model's tensor at the same position (definition "
        "order, shapes checked; a 2-D weight may be the transpose), for ports whose names no "
        "rename maps; needs --paddle-model",
    )
    p.add_argument(
        "--inputs",
        metavar="FILE",
        help="with --by-order: pair by the order the layers run, not the order they are "
        "defined; both models run once on these inputs (a .npy: the one argument; a .npz: its "
        "arrays by name as keyword arguments, or arr_0, arr_1... as positional ones); needs "
        "--model",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="PATTERN=REPL",
        help="re.sub(PATTERN, REPL, key); repeatable, applied in order",
    )
    p.add_argument(
        "--skip", action="append", default=[], metavar="PATTERN", help="leave these keys out"
    )
    p.add_argument(
        "--port-only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Paddle keys only the port has (a pooler the reference lacks): not written, kept "
        "as the port initialises them, left out of --by-order's pairing",
    )
    p.add_argument(
        "--fuse-groups",
        action="append",
        default=[],
        metavar="PATTERN=N",
        help="a --paddle-model tensor fusing several of the reference's (PaddleNLP's qkv_proj) "
        "holds each cut in N pieces taken in turn (its key-value head count); default side by "
        "side",
    )
    p.add_argument(
        "--transpose",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also transpose these 2-D tensors",
    )
    p.add_argument(
        "--no-transpose",
        action="append",
        default=[],
        metavar="PATTERN",
        help="never transpose these tensors",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show what would be done per key, write nothing"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _read_inputs(path: str) -> Any:
    """``--inputs``: a .npy's array (the one positional argument), a .npz's arrays (keyword
    arguments by name; ``arr_0``, ``arr_1``..., as ``np.savez`` names unnamed ones: positional)."""
    import re

    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except Exception as exc:  # a missing, truncated or foreign file: one line
        raise ReprodError(f"--inputs {path}: cannot be read ({type(exc).__name__}: {exc})") \
            from None
    if arrays and all(re.fullmatch(r"arr_\d+", name) for name in arrays):
        return tuple(arrays[f"arr_{i}"] for i in range(len(arrays)) if f"arr_{i}" in arrays)
    return arrays


def _plan_table(conv: Conversion) -> str:
    from tabulate import tabulate

    from ..messages import fmt_shape

    rows = [
        [
            p.torch_name,
            p.paddle_name or "-",
            fmt_shape(p.torch_shape),
            fmt_shape(p.paddle_shape),
            p.action,
            p.why,
        ]
        for p in conv.plan
    ]
    return tabulate(
        rows, headers=["torch key", "paddle key", "torch shape", "paddle shape", "action", "why"]
    )


def _run(args: argparse.Namespace, out: Any, err: Any) -> int:
    if os.path.splitext(args.dst)[1].lower() in TORCH_SUFFIXES:
        raise ReprodError(
            f"{args.dst}: the output would be a PyTorch suffix; did you swap SRC and DST? "
            f"(write {PADDLE_SUFFIXES[0]})"
        )
    rules = ConversionRules.from_strings(
        rename=args.rename, skip=args.skip, transpose=args.transpose,
        no_transpose=args.no_transpose, port_only=args.port_only, fuse_groups=args.fuse_groups,
    )
    if args.by_order and not args.paddle_model:
        raise ReprodError("--by-order needs --paddle-model MODULE:FACTORY to take the order from")
    if args.inputs and not args.by_order:
        raise ReprodError("--inputs pairs by call order: it needs --by-order")
    if args.inputs and not args.model:
        raise ReprodError("--inputs runs the models: it needs --model MODULE:FACTORY")
    inputs = _read_inputs(args.inputs) if args.inputs else None
    torch_model = _build(args.model, "--model") if args.model else None
    paddle_model = _build(args.paddle_model, "--paddle-model") if args.paddle_model else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HeuristicLinearWarning)
        conv = convert(
            args.src,
            model=torch_model,
            rules=rules,
            by_order=args.by_order,
            paddle_model=paddle_model,
            inputs=inputs,
        )
    for w in caught:
        if issubclass(w.category, HeuristicLinearWarning):
            print(f"{PROG}: note: {w.message}", file=err)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if paddle_model is not None:
        check_fits(paddle_model, conv.weights, source=args.src, rules=rules)
    if args.dry_run:
        print(_plan_table(conv), file=out)
        print(conv.summary_line() + " (dry run, nothing written)", file=out)
        return 0
    write_pdparams(args.dst, conv.weights)
    if not args.quiet:
        print(f"wrote {args.dst}: {conv.summary_line()}", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``reprod-convert``; returns the exit status.

    >>> main(["model.pth", "model.pdparams", "--model", "models:build"])
    0
    """
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if args.quiet:  # importing paddle (--paddle-model) warns that ccache is missing
                warnings.filterwarnings("ignore", message=r"No ccache found", category=UserWarning)
            return _run(args, sys.stdout, sys.stderr)
    except ReprodError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
