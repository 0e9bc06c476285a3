"""``symmtriton-bench`` (:mod:`.cli`) and what it is made of: its options (:mod:`.options`), the
operands and exact references of each row (:mod:`.workloads`), timing to completion agreed over
the ranks (:mod:`.timing`), the torch.distributed and symmetric-memory baselines and copy
ceilings (:mod:`.baselines`), run metadata (:mod:`.meta`), result files (:mod:`.report`), and
the autotuner that writes the tuning cache (:mod:`.tune`)."""
