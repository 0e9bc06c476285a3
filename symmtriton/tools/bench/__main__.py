"""``python -m symmtriton.tools.bench``: see :mod:`symmtriton.tools.bench.cli`."""

from .cli import main

raise SystemExit(main())
