"""MEBQAT training: methods (task samplers over bitwidths), the shared training loop, trainers, evaluation; the
few-shot variants (MAML, ProtoNet).  Import the submodules; this package imports nothing itself."""
