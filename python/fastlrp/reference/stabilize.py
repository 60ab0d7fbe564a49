"""The denominator stabilizer shared by every rule."""

import torch


def stabilize(z: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """Return ``z + epsilon * sign(z)`` where zero counts as positive.

    Shifting away from zero (instead of clamping) is what makes the Epsilon rule absorb
    weak or contradictory relevance; sign(0) = +1 keeps the division finite everywhere.
    """
    sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return z + sign * epsilon
