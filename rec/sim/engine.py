"""Batched simulation engine shared by the world, the fitted environment and presets."""

from __future__ import annotations

import torch


def sample_slate_choice(
    utilities: torch.Tensor, no_click_utility: torch.Tensor | float, generator: torch.Generator
) -> torch.Tensor:
    """Draw at most one choice per slate from a multinomial logit.

    Args:
        utilities: (B, K) utility of each slate item for each user.
        no_click_utility: utility of choosing nothing, (B,) or a scalar.
        generator: the seeded source of randomness.

    Returns:
        (B,) index of the chosen item in 0..K-1, or -1 where the user chose nothing.
    """
    batch = utilities.shape[0]
    no_click = torch.as_tensor(no_click_utility, dtype=utilities.dtype).expand(batch)
    logits = torch.cat([utilities, no_click.unsqueeze(1)], dim=1)
    choice = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return torch.where(choice == utilities.shape[1], torch.full_like(choice, -1), choice)
