"""PPO's recurrent actor-critic (policy §5.4).

    obs ─ Linear(D,128) ─ LayerNorm ─ ReLU ─ LSTM(128→128) ─ LayerNorm ─ z
    op        z               ─ Linear(·,64) ─ ReLU ─ Linear(64, 5)
    slot      [z, onehot(op)]   ─ … ─ Linear(64, S)
    blueprint [z, onehot(slot)] ─ … ─ Linear(64, B)
    blend     [z, onehot(slot)] ─ … ─ Linear(64, K)
    value     z               ─ … ─ Linear(64, 1)      V(s), independent of the op

Init (CleanRL's `layer_init`): hidden Linears orthogonal with gain √2 and zero bias; the last Linear
of each policy head gain 0.01, so the first policy is near-uniform over the valid entries; the value
head's last Linear gain 1.0; LSTM weights orthogonal (gain 1), biases 0 except the input bias's
forget-gate slice = 1 (remember by default). The network is deliberately mask-agnostic: masking and
sampling live in `sampling.py`, shared by acting and the update.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

N_OPS = 5


def _layer(n_in: int, n_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _head(n_in: int, hidden: int, n_out: int, last_gain: float) -> nn.Sequential:
    return nn.Sequential(_layer(n_in, hidden, math.sqrt(2)), nn.ReLU(), _layer(hidden, n_out, last_gain))


class PolicyNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_slots: int, n_blueprints: int, n_blends: int, *,
                 feature_dim: int = 128, lstm_hidden: int = 128, head_hidden: int = 64):
        super().__init__()
        self.obs_dim, self.n_slots, self.n_blueprints, self.n_blends = obs_dim, n_slots, n_blueprints, n_blends
        self.lstm_hidden = lstm_hidden
        self.features = nn.Sequential(_layer(obs_dim, feature_dim, math.sqrt(2)), nn.LayerNorm(feature_dim), nn.ReLU())
        self.lstm = nn.LSTM(feature_dim, lstm_hidden, num_layers=1, batch_first=True)
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.orthogonal_(param, 1.0)
            else:
                nn.init.zeros_(param)
        with torch.no_grad():  # PyTorch gate order i, f, g, o: the forget gate is the second slice
            self.lstm.bias_ih_l0[lstm_hidden:2 * lstm_hidden].fill_(1.0)
        self.z_norm = nn.LayerNorm(lstm_hidden)
        self.op_head = _head(lstm_hidden, head_hidden, N_OPS, 0.01)
        self.slot_head = _head(lstm_hidden + N_OPS, head_hidden, n_slots, 0.01)
        self.blueprint_head = _head(lstm_hidden + n_slots, head_hidden, n_blueprints, 0.01)
        self.blend_head = _head(lstm_hidden + n_slots, head_hidden, n_blends, 0.01)
        self.value_head = _head(lstm_hidden, head_hidden, 1, 1.0)

    def initial_state(self, batch: int = 1, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each (1, batch, H): the state at the start of an episode."""
        zeros = torch.zeros(1, batch, self.lstm_hidden, device=device)
        return zeros, zeros.clone()

    def encode(self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """obs (B, T, D) with every sequence starting from `state` (each (1, B, H)); returns
        z (B, T, H) and the state after the last step. Padding at a sequence's end never affects
        its earlier outputs, so segments of unequal length share one call."""
        x = self.features(obs)
        out, new_state = self.lstm(x, state)
        return self.z_norm(out), new_state

    def step(self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One step for a batch of envs: obs (B, D) → z (B, H), new state."""
        z, new_state = self.encode(obs.unsqueeze(1), state)
        return z[:, 0], new_state

    # Heads on flat z (N, H); op and slot are index tensors (N,).
    def op_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.op_head(z)

    def slot_logits(self, z: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        return self.slot_head(torch.cat([z, F.one_hot(op, N_OPS).to(z.dtype)], dim=-1))

    def blueprint_logits(self, z: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return self.blueprint_head(torch.cat([z, F.one_hot(slot, self.n_slots).to(z.dtype)], dim=-1))

    def blend_logits(self, z: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return self.blend_head(torch.cat([z, F.one_hot(slot, self.n_slots).to(z.dtype)], dim=-1))

    def value(self, z: torch.Tensor) -> torch.Tensor:
        return self.value_head(z).squeeze(-1)

    def architecture(self) -> dict:
        """The constructor's arguments, as primitives (saved in policy checkpoints)."""
        first = self.features[0]
        return {"obs_dim": self.obs_dim, "n_slots": self.n_slots, "n_blueprints": self.n_blueprints,
                "n_blends": self.n_blends, "feature_dim": first.out_features, "lstm_hidden": self.lstm_hidden,
                "head_hidden": self.op_head[0].out_features}
