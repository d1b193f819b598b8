"""Print the recipe reference (every key, its default and its help) as Markdown.

    python tools/recipe_reference.py            # print
    python tools/recipe_reference.py --check README.md   # exit 1 if README's copy is stale
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wantune.data.config import SourceConfig  # noqa: E402
from wantune.train.config import Recipe  # noqa: E402

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _rows(cls, prefix: str) -> list[str]:
    rows = []
    for f in fields(cls):
        value = _default(f)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            rows += _rows(type(value), key + ".")
            continue
        shown = "[]" if value == [] else repr(value) if isinstance(value, str) else str(value)
        shown = shown.replace("|", "\\|")
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{shown}` | {help_text} |")
    return rows


def reference() -> str:
    lines = [BEGIN, "| key | default | meaning |", "|---|---|---|"]
    lines += _rows(Recipe, "")
    lines += ["", "Each entry of `data.sources`:", "", "| key | default | meaning |", "|---|---|---|"]
    lines += _rows(SourceConfig, "data.sources[].")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", metavar="README", help="fail if this file's reference block differs")
    a = p.parse_args(argv)
    ref = reference()
    if a.check:
        text = Path(a.check).read_text()
        start, end = text.find(BEGIN), text.find(END)
        if start < 0 or end < 0 or text[start:end + len(END)] != ref:
            print(f"{a.check}: the recipe reference is stale; regenerate it with "
                  "python tools/recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
