"""Hybrid split federated learning in TFF (TFF is imported lazily, only by the federated trainers)."""
