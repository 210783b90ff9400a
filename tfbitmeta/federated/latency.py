"""Modelled inference latency of the hybrid rule (docs/federated.md, "Ours"):

    T_k = F_client / psi_k + offload_ratio * (feature_bits / R_uplink + F_server / psi_server + RTT)

Client compute tiers cycle over the clients (low / mid / high effective GFLOP/s); the feature payload is the split
tensor at the client's activation bitwidth as the device sends it: the bytes of its predict request, with a-bit codes
packed at a bits per value (float32 at full precision)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tfbitmeta.serve.payload import request_bytes_for

@dataclass(frozen=True)
class LatencyModel:
    tiers_gflops: tuple = (1.0, 5.0, 20.0)
    uplink_mbps: float = 10.0
    rtt_ms: float = 20.0
    server_gflops: float = 1000.0

    def client_gflops(self, k: int) -> float:
        return self.tiers_gflops[k % len(self.tiers_gflops)]

    def mean_ms(self, k: int, client_flops: float, offload_ratio: float, feature_elements: int, bits: int,
                server_flops: float) -> float:
        local = client_flops / (self.client_gflops(k) * 1e9) * 1e3
        payload_bits = 8 * request_bytes_for(feature_elements, min(bits, 32))  # the device's real request
        remote = payload_bits / (self.uplink_mbps * 1e6) * 1e3 + server_flops / (self.server_gflops * 1e9) * 1e3 \
            + self.rtt_ms
        return local + offload_ratio * remote

    def describe(self) -> dict:
        return {"formula": "T = F_client/psi_k + offload * (feature_bits/R + F_server/psi_S + RTT)", **asdict(self)}
