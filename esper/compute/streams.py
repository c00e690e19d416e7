"""Per-env random streams (policy §7.3): every random draw has a named, independent source.

An episode seed is mixed from (run seed, env, episode); each stream below is mixed from it, so
germinating or not never shifts data order, and `none` and `heuristic` runs with the same seed
share host initialisation and batch order (common random numbers).
"""

import torch

_MASK = (1 << 64) - 1

HOST_INIT, DATA, SEED_INIT, PROBE, SIMULATOR = 1, 2, 3, 4, 5


def mix64(*values: int) -> int:
    """splitmix64 folded over the values: a documented, stable 64-bit mixing function."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK)) & _MASK
        state = (state + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        state = z ^ (z >> 31)
    return state


def episode_seed(run_seed: int, env: int, episode: int) -> int:
    return mix64(run_seed, env, episode)


def generator(seed: int, *stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for one stream; torch seeds take 63 bits."""
    g = torch.Generator(device=device)
    g.manual_seed(mix64(seed, *stream) >> 1)
    return g
