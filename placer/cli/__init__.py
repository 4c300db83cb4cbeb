"""The ``placer`` command line: parse, one library call with the same parameter names, write.

``main`` (the ``placer`` entry point) and the ``cli`` group are in :mod:`placer.cli.main`; shared
options in :mod:`placer.cli.options`; one module per command group.
"""

from placer.cli.main import cli, main

__all__ = ["cli", "main"]
