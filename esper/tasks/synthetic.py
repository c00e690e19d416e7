"""Generated 4-class 8×8 images: blurred random ±1 prototypes plus unit Gaussian noise."""

import torch
import torch.nn.functional as F

from esper.tasks.split import Split

_CLASSES = 4
_SIZES = (1024, 256, 256)


def load() -> tuple[tuple[Split, Split, Split], None]:
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (_CLASSES, 1, 8, 8), generator=generator) * 2 - 1
    # Box blur with zero padding: neighbouring pixels correlate, as in natural images.
    box = torch.full((1, 1, 3, 3), 1.0 / 9.0)
    prototypes = F.conv2d(signs.float(), box, padding=1)

    def split(n: int) -> Split:
        # Balanced classes in a generator-drawn order.
        labels = (torch.arange(n) % _CLASSES)[torch.randperm(n, generator=generator)]
        noise = torch.randn(n, 1, 8, 8, generator=generator)
        return Split(prototypes[labels] + noise, labels)

    return tuple(split(n) for n in _SIZES), None
