"""Fault injectors for integration tests: strategies (given by Hydra ``_target_``, the same way a
user plugs in their own) whose clients misbehave on purpose. Never used outside tests."""

from __future__ import annotations

import torch

from privfed.strategies.lora import LoraFedAvg


class FaultyClientsLora(LoraFedAvg):
    """Client 0 raises, client 1 replies NaN, client 2 adds an extra tensor (its own reply check
    stops it), others behave."""

    name = "faulty_clients_lora"

    def client_payload(self, global_state, local_state):
        payload = super().client_payload(global_state, local_state)
        if self.client == 0:
            raise RuntimeError("fault injected: client 0 crashes")
        if self.client == 1:
            return {k: torch.full_like(v, float("nan")) for k, v in payload.items()}
        if self.client == 2:
            return {**payload, "exfiltrated": torch.zeros(3)}
        return payload
