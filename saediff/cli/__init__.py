"""The command line (typer): one module per command group, each a thin layer that parses options
into the library's config objects, calls the library and prints. Nothing imports the CLI.
"""
