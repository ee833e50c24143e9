"""mkdocs hook: the API reference, one page per saediff subpackage, written at build time.

mkdocs build --strict   # mkdocs.yml names this file under ``hooks:``

The pages are found from the package folders, never listed by hand: a module that is added, split
or renamed appears under its new name at the next build, and a new subpackage gets its own page and
nav entry. Each page shows the subpackage's docstring (what it owns, what it may import) and then
every public module in it through mkdocstrings (griffe reads the source; nothing is imported).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

PACKAGE = Path(__file__).resolve().parent.parent / "saediff"
SKIP = {"cli"}  # the command line has its own page, generated from the typer app (cli.md)
NAV_TITLE = "API reference"
INDEX = "reference/index.md"


def subpackages() -> list[str]:
    """The subpackages in the order of the flow: the layers below first (as ``docs/architecture.md``)."""
    found = [p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.name not in SKIP]
    from saediff import LAYERS as order

    return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))


def modules(sub: str) -> list[str]:
    """Dotted names of the public modules (and nested packages) under ``saediff.<sub>``."""
    names = []
    for path in sorted((PACKAGE / sub).rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
            if len(parts) == 2:
                continue  # the subpackage itself heads the page
        if any(p.startswith("_") for p in parts):
            continue
        names.append(".".join(parts))
    return names


def core_modules() -> list[str]:
    return sorted(f"saediff.{p.stem}" for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))


def _block(name: str, **options: str) -> str:
    lines = [f"::: {name}"]
    if options:
        lines.append("    options:")
        lines += [f"      {k}: {v}" for k, v in options.items()]
    return "\n".join(lines)


def subpackage_page(sub: str) -> str:
    parts = [
        f"# saediff.{sub}",
        _block(f"saediff.{sub}", show_root_heading="false", show_root_toc_entry="false", members="false"),
    ]
    parts += [_block(name) for name in modules(sub)]
    return "\n\n".join(parts) + "\n"


def core_page() -> str:
    parts = [
        "# saediff (core)",
        "The top-level modules every subpackage may import, beside the lazy facade `saediff/__init__.py` "
        "(`import saediff` does no work; `saediff.load_model` imports `saediff.models.loading` on first use).",
    ]
    parts += [_block(name) for name in core_modules()]
    return "\n\n".join(parts) + "\n"


def index_page() -> str:
    lines = [
        "# API reference",
        "",
        "Generated at build time by `docs/gen_ref.py` from the package folders: one page per subpackage,",
        "in the order of the flow (see [Architecture](../architecture.md)). Docstrings are prose: each",
        "says what a function is for and what its numbers mean. The command line is on the",
        "[CLI reference](../cli.md) page.",
        "",
        "| page | modules |",
        "|---|---|",
        f"| [saediff (core)](core.md) | {', '.join(f'`{m}`' for m in core_modules())} |",
    ]
    for sub in subpackages():
        mods = ", ".join(f"`{m.removeprefix(f'saediff.{sub}.')}`" for m in modules(sub))
        lines.append(f"| [saediff.{sub}]({sub}.md) | {mods} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """``src_uri -> markdown`` of every generated page."""
    out = {INDEX: index_page(), "reference/core.md": core_page()}
    out.update({f"reference/{sub}.md": subpackage_page(sub) for sub in subpackages()})
    return out


def on_config(config):
    """Fill the nav's API reference entry with one page per subpackage."""
    entries = [{"Overview": INDEX}, {"saediff (core)": "reference/core.md"}]
    entries += [{f"saediff.{sub}": f"reference/{sub}.md"} for sub in subpackages()]
    for i, item in enumerate(config.nav or []):
        if isinstance(item, dict) and NAV_TITLE in item:
            config.nav[i] = {NAV_TITLE: entries}
    return config


def on_files(files, config):
    for uri, content in pages().items():
        files.append(File.generated(config, uri, content=content))
    return files
