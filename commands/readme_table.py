"""The README's table of inputs, generated from the predictor so that the two cannot drift.

python -m commands.readme_table          # print the table
python -m commands.readme_table --write  # replace the table between the markers in README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from commands.didp import _number, _predictor_inputs, default_text

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- inputs:begin -->", "<!-- inputs:end -->"


def _allowed(field) -> str:
    if field.choices:
        return ", ".join(f"`{c}`" for c in field.choices)
    if field.ge is not None or field.le is not None:
        low = _number(field.ge) if field.ge is not None else ""
        return f"{low} to {_number(field.le) if field.le is not None else ''}"
    if field.min_length:
        return "not blank" if field.regex == r"\S" else "non-empty"
    return ""


def inputs_table() -> str:
    rows = ["| input | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for field in sorted(_predictor_inputs().values(), key=lambda f: f.order):
        default = f"`{field.default}`" if field.default is not None else default_text(field)  # optional/required
        kind = field.type.primitive.name.lower()
        rows.append(f"| `{field.name}` | {kind} | {default} | {_allowed(field)} | {field.description} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    """The table currently between the markers of ``text``."""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commands.readme_table", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    table = inputs_table()
    if not args.write:
        print(table)
        return 0
    head, rest = README.read_text().split(BEGIN, 1)
    README.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
