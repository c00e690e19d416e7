"""One split of a task's data, as tensors."""

import attrs
import torch


# eq=False: equality over tensors is element-wise, not a bool.
@attrs.frozen(eq=False)
class Split:
    """CNN tasks: ``inputs`` (N, C, H, W) and ``labels`` (N,) int64.

    Text: ``inputs`` is the split's byte stream, (N,) uint8, and ``labels`` is None
    (targets are the inputs shifted by one).
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> "Split":
        labels = None if self.labels is None else self.labels.to(device)
        return Split(self.inputs.to(device), labels)
