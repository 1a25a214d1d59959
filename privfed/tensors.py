"""Named tensor sets: the one type that adapter states, replies' payloads and updates share."""

from __future__ import annotations

import torch

# A named tensor set: a model's adapter state ({"...lora_A.default.weight": tensor, ...}), a
# client's payload, a device's update. Every module that passes one uses this alias.
State = dict[str, torch.Tensor]
