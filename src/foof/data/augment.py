"""The conv experiments' data augmentation (App. D.6), applied per mini-batch on any device.

App. D.6: "standard data-augmentation consisting of random horizontal flips as well as padding
with 4 pixels followed by random cropping". :func:`foof.train.train` calls
:func:`augment_batch` on every training mini-batch when ``TrainConfig.augment`` is set.
"""

from __future__ import annotations

import torch
from torch import Tensor

PAD = 4
"""Padding of the random crop (App. D.6)."""


def augment_batch(images: Tensor, generator: torch.Generator, padding: int = PAD) -> Tensor:
    """Random crop after zero padding and random horizontal flip, per image (App. D.6).

    The images are already normalised, so the padding is the channel mean (zero), not black;
    the random numbers come from ``generator`` (a CPU generator), so a seeded run is
    reproducible on any device.

    Args:
        images: ``(B, C, H, W)``.
        generator: CPU ``torch.Generator`` the offsets and flips are drawn from.
        padding: pixels of padding on each side before the ``H x W`` crop.

    Returns:
        ``(B, C, H, W)``: image ``i`` is rows ``dy_i .. dy_i+H`` and columns ``dx_i .. dx_i+W``
        of the padded image, mirrored left-right with probability 1/2.

    Example:
        >>> x = torch.arange(2 * 3 * 8 * 8.0).reshape(2, 3, 8, 8)
        >>> augment_batch(x, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 8, 8])
    """
    if images.dim() != 4:
        raise ValueError(
            f"augment_batch needs images (B, C, H, W), got shape {tuple(images.shape)}"
        )
    b, _, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(images.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # padded[b, :, rows[b, i], cols[b, j]] gathered as (B, H, W, C), then back to (B, C, H, W).
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()
