"""The command line (typer): one module per command group, each a thin layer that parses options
into the library's config objects, calls the library and prints. Nothing imports the CLI.
"""


def main() -> None:
    """The console script (``saediff = "saediff.cli:main"``): imports the app only when run."""
    from saediff.cli.app import main as run

    run()
