"""Regenerate the README's CLI reference from the CLI itself.

python tools/cli_reference.py          # rewrite README.md between the markers
python tools/cli_reference.py --check  # exit 1 if the README is stale (the tests run this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"


def reference() -> str:
    from saediff.cli.app import app

    root = typer.main.get_command(app)
    lines = []

    def walk(cmd, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer may vendor its own click)
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], [*path, name])
            return
        params = []
        for p in cmd.params:
            if type(p).__name__.endswith("Argument"):
                params.append(p.name.upper())
            elif getattr(p, "opts", None) and p.name != "help":
                flag = max(p.opts, key=len)
                params.append(flag if getattr(p, "is_flag", False) else f"{flag} {p.name.upper()}")
        help_line = (cmd.help or "").strip().splitlines()[0] if cmd.help else ""
        lines.append(f"- `saediff {' '.join(path)}` — {help_line}  \n  `{' '.join(params)}`")

    walk(root, [])
    return "\n".join(lines)


def main() -> None:
    text = README.read_text()
    new = re.sub(
        re.escape(BEGIN) + ".*?" + re.escape(END), f"{BEGIN}\n{reference()}\n{END}", text, flags=re.S
    )
    if "--check" in sys.argv:
        sys.exit(0 if new == text else 1)
    README.write_text(new)


if __name__ == "__main__":
    main()
