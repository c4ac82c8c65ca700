"""``python -m lurker``: the ``lurker`` command, where its script is not on PATH."""

from .cli import main

main()
