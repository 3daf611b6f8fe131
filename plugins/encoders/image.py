"""Image encoder: ViT-style patch embedding plus a few transformer layers.

Input: ``[B, C, H, W]`` float (scale pixels in the data source, e.g. to 0..1).
Output: one token per ``patch_size x patch_size`` patch, ``T = (H/p) * (W/p)``, mask all
True (images have no padding). ``H`` and ``W`` may be smaller than ``image_size`` as
long as they are multiples of ``patch_size``: the 2-D position table is cropped, so a
short scanned formula does not need to be padded to a square.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from m3tfed import EncoderSpec, ModalityEncoder, Tokens
from torch import nn


class ImageEncoder(ModalityEncoder):
    modality = "image"

    def __init__(
        self,
        d_model: int,
        image_size: int = 32,
        patch_size: int = 8,
        # 1 channel: the education images at hand (handwritten maths, scanned
        # answers) are greyscale; set 3 for photographs.
        channels: int = 1,
        depth: int = 1,  # transformer layers after the patch embedding; 0 = none
        heads: int | None = None,
        # (H, W) of the pixels a wide term reads (default image_size square): a source
        # whose images are all 32 x 96 need not carry weights for pixels it never has.
        wide_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        size = (image_size, image_size) if wide_size is None else tuple(wide_size) if isinstance(wide_size, Sequence) else (wide_size, wide_size)
        if len(size) != 2 or not all(isinstance(n, int) and 0 < n <= image_size and n % patch_size == 0 for n in size):
            raise ValueError(f"wide_size must be an int or [H, W], multiples of patch_size {patch_size} up to image_size {image_size}, got {wide_size!r}")
        self.wide_size = size
        heads = heads or next(h for h in (4, 2, 1) if d_model % h == 0)
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        grid = image_size // patch_size
        self.patch = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(grid, grid, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, images: torch.Tensor) -> Tokens:
        b, c, h, w = images.shape
        p = self.patch_size
        if c != self.channels or h % p or w % p or h > self.image_size or w > self.image_size:
            raise ValueError(
                f"image batch must be [B, {self.channels}, H, W] with H, W multiples of {p} "
                f"and at most {self.image_size}; got {list(images.shape)}"
            )
        x = self.patch(images.to(self.patch.weight.dtype))  # [B, d, H/p, W/p]
        x = x + rearrange(self.pos[: h // p, : w // p], "gh gw d -> d gh gw")
        x = rearrange(x, "b d gh gw -> b (gh gw) d")
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return Tokens(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

    @property
    def wide_width(self) -> int:
        return self.channels * self.wide_size[0] * self.wide_size[1]

    def wide_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pixels, as a logistic model on raw pixels takes them; a smaller image is
        padded (right and bottom) to ``wide_size`` so that a pixel keeps its weight."""
        (h, w), (H, W) = images.shape[-2:], self.wide_size
        if h > H or w > W:
            raise ValueError(f"image {h} x {w} is larger than wide_size {H} x {W}; raise the encoder's wide_size option")
        images = F.pad(images.float(), (0, W - w, 0, H - h))
        return images.reshape(images.shape[0], -1)

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(batch_size, self.channels, *self.wide_size, generator=generator)  # image_size square by default


# Registered by the package (``register_encoders``); ``params`` is counted at
# REFERENCE_D_MODEL with default options and checked against the module.
SPEC = EncoderSpec(
    name="image",
    modality="image",
    build=ImageEncoder,
    version="0.2.0",  # 0.2: wide features
    license="Apache-2.0",
    params=548_352,
    min_memory_mb=9,  # fp32 weights, gradients and AdamW moments
    description="ViT patch embedding + small transformer; one token per patch",
)
