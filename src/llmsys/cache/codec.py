"""8-bit min/max codes: what crosses tiers compressed (LeoAM's disk pages and, when asked, host pages).

Each group of `group` consecutive elements (one key or value row of one head and token, i.e.
``group = head_dim``) is stored as uint8 codes with its own float32 minimum and step
``(max - min) / 255``. Every element comes back within half a step of its original value
(`minmax_error_bound`), a bound the tests check on random and adversarial inputs.
"""

from __future__ import annotations

import torch

__all__ = ["LEVELS", "dequantize_minmax", "minmax_error_bound", "quantize_minmax"]

LEVELS = 255


def quantize_minmax(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit min/max codes of `x` in groups of `group` consecutive elements.

    Returns ``(codes uint8 [G, group], mins float32 [G], steps float32 [G])``, G = numel / group.
    A constant group gets step 0 and decodes exactly.
    """
    if x.numel() % group:
        raise ValueError(f"quantize_minmax: {x.numel()} elements are not a multiple of group={group}")
    rows = x.detach().reshape(-1, group).float()
    mins = rows.amin(dim=1)
    steps = (rows.amax(dim=1) - mins) / LEVELS
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))
    codes = torch.round((rows - mins[:, None]) / safe[:, None]).clamp_(0, LEVELS).to(torch.uint8)
    return codes, mins, steps


def dequantize_minmax(codes: torch.Tensor, mins: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """float32 ``[G, group]``: ``mins + codes * steps`` (the inverse of `quantize_minmax` up to the bound)."""
    return mins[:, None] + codes.float() * steps[:, None]


def minmax_error_bound(x: torch.Tensor, group: int) -> torch.Tensor:
    """Largest error the 8-bit code may make on each element of `x`: half a step of its group,
    plus float32 rounding of ``min + code * step``. Shape ``[G, group]``."""
    rows = x.detach().reshape(-1, group).float()
    span = rows.amax(dim=1) - rows.amin(dim=1)
    magnitude = rows.abs().amax(dim=1)
    return (span / LEVELS / 2 + 4 * torch.finfo(torch.float32).eps * magnitude)[:, None].expand_as(rows)
