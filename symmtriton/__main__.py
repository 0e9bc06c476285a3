"""``python -m symmtriton``: see :mod:`symmtriton.tools.demo`."""

from .tools.demo import main

raise SystemExit(main())
