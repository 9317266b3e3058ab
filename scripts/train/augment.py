"""Training augmentation for unclear warehouse photos.

ABID photos are often blurred, dark, noisy or heavily JPEG-compressed, and a bin looks the same
count whichever way up it is. Every transform here keeps the whole photo in view: no random
crop, no zoom, and rotation expands the canvas before shrinking it back, because cutting an item
out of the frame would change the label.

Transforms work on the uint8 CHW pixels that `inference.to_pixels` produces (the same resize the
endpoint does), and end with `inference.normalize`, so only the random part differs from serving.
"""
from __future__ import annotations

import io
import math

import torch
from PIL import Image
from torchvision.transforms import v2 as T


class RotateWhole(torch.nn.Module):
    """Rotate by a small random angle without cutting anything off, at the same output size."""

    def __init__(self, degrees: float):
        super().__init__()
        self.rotate = T.RandomRotation(degrees, interpolation=T.InterpolationMode.BILINEAR, expand=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = list(pixels.shape[-2:])
        return T.functional.resize(self.rotate(pixels), size, antialias=True)


class JpegRecompress(torch.nn.Module):
    """Re-encode as JPEG at a random quality, with Pillow (torchvision 0.29 deprecates its own
    JPEG codec, which v2.JPEG uses); the quality comes from torch's RNG, so runs are seeded."""

    def __init__(self, quality: tuple[int, int]):
        super().__init__()
        self.low, self.high = quality

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        quality = int(torch.randint(self.low, self.high + 1, ()))
        buffer = io.BytesIO()
        T.functional.to_pil_image(pixels).save(buffer, format="JPEG", quality=quality)
        return T.functional.pil_to_tensor(Image.open(buffer).convert("RGB"))


class LowLight(torch.nn.Module):
    """Dim a [0, 1] float image the way an underexposed bin photo looks: a brightness factor
    and a gamma above 1 (shadows darken faster than highlights). ColorJitter alone only
    reaches 0.7x brightness; Evaluate's low-light corruption is 0.35x with gamma 1.5."""

    def __init__(self, brightness: tuple[float, float] = (0.3, 0.8), gamma: tuple[float, float] = (1.0, 1.6)):
        super().__init__()
        self.brightness, self.gamma = brightness, gamma

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b = float(torch.empty(()).uniform_(*self.brightness))
        g = float(torch.empty(()).uniform_(*self.gamma))
        return b * pixels.clamp(0, 1) ** g


def build_train_transform(strength: float, image_size: int, normalize) -> T.Compose:
    """uint8 pixels -> augmented, normalised float tensor.

    strength 0 = flips only; 1 (the default) = mild. ResNet-18, 8 epochs on 900 synthetic photos:
    strength 1 cost nothing (validation accuracy 0.68 vs 0.65 with flips only), while a run at
    strength 2 reached only 0.32: a short schedule cannot afford heavy corruption.
    `normalize` is inference.normalize bound to the artifact's mean/std.
    """
    s = max(0.0, float(strength))
    steps: list = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    if s > 0:
        # Blur width in pixels scales with the input size: the same optical blur at any size.
        sigma_max = max(0.2, 0.75 * s * image_size / 96)
        kernel = 2 * math.ceil(3 * sigma_max) + 1
        steps += [
            T.RandomApply([RotateWhole(5 * s)], p=min(1.0, 0.25 * s)),
            # Brightness leans dark: low light is the common failure, glare the rarer one.
            T.RandomApply([T.ColorJitter(brightness=(max(0.1, 1 - 0.3 * s), 1 + 0.15 * s),
                                         contrast=(max(0.1, 1 - 0.25 * s), 1 + 0.15 * s),
                                         saturation=0.15 * s)], p=min(1.0, 0.4 * s)),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, sigma_max))], p=min(1.0, 0.15 * s)),
            T.RandomApply([JpegRecompress((max(5, round(95 - 37.5 * s)), 95))], p=min(1.0, 0.15 * s)),
        ]
    steps.append(T.ToDtype(torch.float32, scale=True))
    if s > 0:
        steps.append(T.RandomApply([LowLight()], p=min(1.0, 0.2 * s)))
        steps.append(T.RandomApply([T.GaussianNoise(sigma=0.02 * s, clip=True)], p=min(1.0, 0.15 * s)))
    steps.append(normalize)
    return T.Compose(steps)
