"""``python -m symmtriton``: see :mod:`symmtriton.demo`."""

from .demo import main

raise SystemExit(main())
