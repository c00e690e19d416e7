"""The `cifar10` task spec over random data, for benchmarks that time the cifar10 host without
the dataset: uint8 images (N, 3, 32, 32) and int64 labels in 0-9, from a seeded generator."""

import torch

from esper.tasks import TASKS, Split, TaskData


def random_cifar(n_train: int, n_val: int, n_test: int, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        return Split(images, torch.randint(0, 10, (n,), generator=g, dtype=torch.int64))

    return TaskData(TASKS["cifar10"], split(n_train), split(n_val), split(n_test), data_digest=None)
