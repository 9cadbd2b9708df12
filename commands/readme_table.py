"""The README's table of inputs, generated from the request model so that the two cannot drift.

python -m commands.readme_table          # print the table
python -m commands.readme_table --write  # replace the table between the markers in README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from commands.input_docs import inputs_table

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- inputs:begin -->", "<!-- inputs:end -->"


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
