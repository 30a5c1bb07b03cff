"""A griffe extension for the API reference (mkdocs.yml): reprod's docstrings are plain prose
with ``>>>`` examples and a few Sphinx roles; Markdown would render the examples as nested
quotes (and read ``x["mean"]`` as a link). This fences each example as Python code and turns
``:func:`name``` into ``name``. It changes what the page shows, never the source."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|data|class|meth|attr|mod|exc|obj|py:\w+):`~?([^`]+)`")


def fence_examples(text: str) -> str:
    """Wrap each run of ``>>>`` lines (with their ``...`` continuations and the output lines
    below them, up to a blank line) in a ```python fence at the same indentation."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(lines[i][len(indent):])
            i += 1
        out.extend([f"{indent}```python", *(indent + b for b in block), f"{indent}```"])
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and docstring.value:
            docstring.value = fence_examples(_ROLE.sub(r"`\1`", docstring.value))
