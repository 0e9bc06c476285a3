"""Tools above the runtime: the benchmark and autotuner (:mod:`symmtriton.tools.bench`), the
demo behind ``python -m symmtriton`` (:mod:`symmtriton.tools.demo`), the multi-process worker
pool and teardown that tests, examples and benchmarks share (:mod:`symmtriton.tools.testing`)
and the pure-torch references results are checked against (:mod:`symmtriton.tools.reference`).

The runtime (the rest of ``symmtriton``) never imports this package."""
