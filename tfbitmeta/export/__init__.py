"""TFLite export: the static-bitwidth export graph, conversion and verification, the manifest, ProtoNet embeddings
and federated front ends.  Import the submodules; this package imports nothing itself (no TensorFlow)."""
