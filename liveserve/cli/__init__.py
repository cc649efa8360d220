"""The `liveserve` command line: `app` parses and dispatches; a module per group of commands (`bench`,
`serve` with `client`/`demo`/`transcript`/`models`, `loadtest`) and what they share (`options`, `connection`,
`source`)."""

from liveserve.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
