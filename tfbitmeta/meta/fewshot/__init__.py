"""Few-shot MEBQAT: joint bitwidth and class adaptation on Omniglot (docs/fewshot.md).

Modules, in dependency order (no cycles):

* :mod:`.maml`, :mod:`.protonet` -- the two meta-learning algorithms with the bitwidth as input;
* :mod:`.hausdorff` -- the training-free modified-Hausdorff baseline;
* :mod:`.config` -- methods, bitwidth candidates, the run's :class:`FewShotConfig` and the default recipe;
* :mod:`.evaluation` -- scoring a run (and the baseline) on test episodes, test folders and one-shot runs;
* :mod:`.trainer` -- meta-training with validation-based checkpoint selection, then evaluation.
"""
