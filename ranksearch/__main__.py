"""``python -m ranksearch``: the same command line as the ``ranksearch`` script."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
