"""The `splitveil` command line: thin typer commands over the library."""
