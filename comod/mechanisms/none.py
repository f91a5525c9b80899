"""No modulation: every task reads the same representation."""
from __future__ import annotations

import torch

from comod.mechanisms.base import Mechanism


class NoModulation(Mechanism):
    kind = "none"

    @classmethod
    def from_config(cls, cfg, num_tasks, site_channels, decoder_dim):
        return cls(num_tasks, site_channels, decoder_dim)

    def forward(self, suffix, h0, task):
        return suffix(h0, None)

    def forward_tasks(self, suffix, h0, tasks):
        z = suffix(h0, None)
        return {k: z for k in tasks}

    def sample_gains(self, task, n):
        return {s: torch.ones(n, c) for s, c in self.site_channels.items()}

    def expected_gain(self, task):
        return {s: torch.ones(c) for s, c in self.site_channels.items()}
