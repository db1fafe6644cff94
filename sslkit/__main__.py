"""``python -m sslkit`` is the ``sslkit`` command (and what ``accelerate launch -m sslkit`` runs)."""

from sslkit.cli import main

main()
