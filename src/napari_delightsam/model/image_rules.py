"""Rules the network applies to its own input, on the normalised (B,3,S,S) tensor it receives.

* **grey**: an image whose three channels are (almost) equal. The appearance head never
  recolours one (``DeLightSAM._correct_colour``).
* **dark-field**: a grey image whose median pixel is darker than ``DARKFIELD_MEDIAN`` (of 0–255):
  fluorescence microscopy, where bright objects lie on a black field. A modality listed in
  ``ModelConfig.darkfield_refiners`` corrects these images' logits with a second refiner
  (``decoder.refiners.<modality>_darkfield``) and every other image's with its usual one:
  bright-field and fluorescence nuclei are opposite contrasts that one small refiner served
  worse together than two apart (docs/ablations.md, "Fluorescence nuclei: a dark-field refiner").

Both rules read the pixels as 0–255 values, so they mean the same thing on the image a user
loaded and on the network's input (bilinear resizing keeps equal channels equal and moves a
median little).
"""

from __future__ import annotations

import torch

from ..config import PIXEL_MEAN, PIXEL_STD

__all__ = ["DARKFIELD_MEDIAN", "GREY_SPREAD", "channel_spread", "darkfield_rows", "to_pixels"]

#: mean absolute difference between neighbouring channels (0–255) at or below which an image is grey
GREY_SPREAD = 2.0
#: a grey image whose median pixel (0–255) is below this is dark-field (a quarter of the range:
#: fluorescence fields have medians of 0–26 in the training data, bright-field H&E in greyscale 100+)
DARKFIELD_MEDIAN = 64.0
#: about this many pixels per image are read (a regular grid: a 512² input has 262,144)
_SAMPLES = 16384


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) normalised network input -> the same images as float32 0–255 pixel values."""
    mean = torch.tensor(PIXEL_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return images.float() * std + mean


def channel_spread(pixels: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) 0–255 pixels -> (B,) mean |R−G| + mean |G−B| (0 for a grey image)."""
    return (pixels[:, 0] - pixels[:, 1]).abs().mean((1, 2)) + (pixels[:, 1] - pixels[:, 2]).abs().mean((1, 2))


def darkfield_rows(images: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) normalised network input -> (B,) bool: grey images with a dark median."""
    step = max(1, round((images.shape[-2] * images.shape[-1] / _SAMPLES) ** 0.5))
    pixels = to_pixels(images[:, :, ::step, ::step])  # a regular grid of pixels is enough for both
    grey = channel_spread(pixels) <= GREY_SPREAD
    median = pixels.mean(1).flatten(1).median(dim=1).values
    return grey & (median < DARKFIELD_MEDIAN)
