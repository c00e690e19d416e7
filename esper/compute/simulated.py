"""The `simulated` compute backend (runtime §5.4, policy §7.5): the torch backend's interface on
seeded parametric curves, with no data and no training.

The engine, lifecycle, events, gates, rewards and policies run unchanged on top of it, so it serves
PPO tests with hundreds of episodes and lifecycle experiments that need a known ground truth. It
uses the task's real host preset (slot ids, widths and feature shapes, host parameter count) and
the real blueprint catalogue (parameter counts from the catalogue formulas, identity at birth), so
G0, rent and budget checks see the same numbers as under torch.

Curves (every score in percentage points, pp; `[simulated]` config section in brackets):

- **Host.** After `t` epochs of host training, `H(t) = A_inf − (A_inf − A_0)·exp(−t/τ)`
  [`a0` = 10, `a_inf` = 60, `tau` = 4]. `t` is the host's own progress: it advances once per
  `train_epoch`, is part of the governor snapshot, and a rollback restores it.
- **Seeds.** At germination a seed of blueprint `b` draws its quality `q ~ N(μ_b, σ_b)` from its
  own `init_seed`, so a seed's quality never depends on what else happened in the episode.
  Maturity `m = 1 − exp(−e/τ_s)` [`seed_tau` = 3], with `e` the epochs the seed has trained: every
  epoch in mode incubate, blend or fused (TRAINING, BLENDING, PROBATIONARY, FOSSILIZED), not inert
  (GERMINATED); a frozen fossil (`lifecycle.fossilized_trainable = false`) stops maturing.
- **Alpha.** The real forward alpha `α` of a slot is its set_slot alpha in mode blend, 1 in mode
  fused and 0 in modes incubate and inert (an incubating seed is straight-through). A validation
  configuration may override it with `a` (ablation: 0; shadow: 1); an inert slot has no effect
  under any override, as in the torch forward.
- **Dependency ("ransomware").** Blueprint `b`'s `δ_b`: while the seed is in the forward, the
  host's own score is down by `δ·α`, and removing the seed costs that dependency a second time. A
  seed's effect in a configuration is
      `E(a) = a·q·m − δ·α − δ·max(0, α − a)`,
  so the real effect is `α(q·m − δ)` and an ablation (a = 0) measures `E(α) − E(0) = α(q·m + δ)`:
  the contribution is positive while the score moves by `α(q·m − δ)` (`P < 0` when `δ > q·m`). A
  shadow pass (α = 0, a = 1) measures `q·m`: the host cannot depend on a seed it has not seen.
- **Model score.** `S = clamp(H(t) + Σ_seeds E, 0, 99.9)` (capped below 100).
- **Observations.** Each evaluated score gets Gaussian noise of σ = `noise` (0.3 pp): the main
  configuration `S_obs = S + ε`; every counterfactual configuration `c` (ablation, shadow, all-off)
  is reported as `S_obs − (S − S_c) − ν_c`, so the measured contribution `S_obs − S_c,obs` is the
  true effect plus one noise term `ν_c` (counterfactuals run on the same batches as the main pass,
  so they share its sampling noise). Observed scores are clamped to [0, 99.9]. The loss is
  `L_rand·(1 − S_obs/100)`, i.e. `L_rand·(1 − S/100)` plus the same noise in loss units, so for a
  loss-scored task (`text`, score `100·(1 − L/L_rand)`) score and loss agree exactly. The training
  pass reports the real configuration with its own noise.
- **Gradient ratio.** For the slots the engine asks to measure (TRAINING and BLENDING):
  `ρ = max(0, ρ_max,b·(1 − exp(−e/2)) + N(0, (0.1·ρ_max,b)²))`; a blueprint without parameters
  (`noop`) measures exactly 0, as under torch. The host gradient norm is a nominal 1.0 and the
  seed norm follows from the per-element RMS definition (lifecycle §4.4):
  `‖g_seed‖ = ρ·‖g_host‖·sqrt(n_seed/n_host)`. Isolation leaks are always 0 where measured.
- **Non-finite epochs.** With probability `nan_probability` per epoch, a training epoch reports a
  non-finite batch loss (`non_finite = True`, every seed `finite = False`), as the torch backend
  does when it skips a non-finite batch; the governor then rolls back and `restore` returns the
  host's progress `t` and every fossil's maturity to the snapshot.

Randomness: every draw is a pure function of a key, hashed with `mix64` from
`mix64(episode_seed, SIMULATOR)` (host and epoch draws) or `mix64(init_seed, SIMULATOR)` (seed
quality): `(channel, epoch, seed init_seed)` picks a uniform in (0, 1]; Gaussians use Box–Muller
over two such uniforms. Nothing is drawn from a sequential generator, so the answers do not
depend on how many configurations were evaluated before, on a rollback's re-validation, or on a
resume from a checkpoint; and the host's noise is shared by every policy run with the same seed
(common random numbers). torch's global generator is never touched.

Counts are nominal: `train_epoch` reports `batches·batch_size` samples (batches = the task's
`steps_per_epoch`, else 16; tokens for text), validation 1024 examples (tokens for text). The
reported lr is the host optimizer's lr with the configured schedule over those nominal steps.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import attrs

from esper.compute.backend import EpochPlan, Evaluation, HostSummary, SeedBuild, SeedGradients, TrainStats, ValStats
from esper.compute.blueprints import get_blueprint
from esper.compute.optimizer import schedule_factor
from esper.compute.settings import SimulatedSettings, TrainSettings
from esper.compute.streams import HOST_INIT, SIMULATOR, generator, mix64
from esper.lifecycle.config import LifecycleConfig
from esper.tasks.spec import TaskSpec

SCORE_CAP = 99.9
RATIO_NOISE = 0.1  # relative to rho_max
HOST_GRAD_NORM = 1.0
NOMINAL_BATCHES = 16
NOMINAL_EVAL = 1024

MODES = ("inert", "incubate", "blend", "fused")
BLEND_KINDS = ("linear", "sigmoid", "gated")

# Noise channels: the first key of every draw after the stream base.
_TRAIN, _VAL, _ABLATE, _SHADOW, _ALL_OFF, _TEST, _RATIO, _QUALITY, _NAN = range(1, 10)
_TWO_53 = float(1 << 53)


def uniform(*key: int) -> float:
    """A uniform in (0, 1] that is a pure function of the key."""
    return ((mix64(*key) >> 11) + 1) / _TWO_53


def normal(*key: int) -> float:
    """A standard normal that is a pure function of the key (Box–Muller)."""
    u1, u2 = uniform(*key, 0), uniform(*key, 1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _clamp(score: float) -> float:
    return min(max(score, 0.0), SCORE_CAP)


@functools.lru_cache(maxsize=None)
def host_shape(topology: str, preset: str) -> tuple[int, tuple[tuple[str, int, tuple[int, ...]], ...]]:
    """(host parameter count, (slot id, channels, feature shape) per slot) of the real host preset.

    Built once per process from a fixed generator (the values are discarded): the counts then match
    the torch backend's by construction.
    """
    from esper.compute.hosts import CNN_PRESETS, TRANSFORMER_PRESETS, CNNHost, TransformerHost

    g = generator(0, HOST_INIT)
    host = CNNHost(CNN_PRESETS[preset], g) if topology == "cnn" else TransformerHost(TRANSFORMER_PRESETS[preset], g)
    slots = tuple((s.slot_id, s.channels, tuple(s.feature_shape)) for s in host.slot_specs)
    return host.host_param_count(), slots


@attrs.define
class SimSeed:
    """One simulated seed: what it is, what it has learnt, and how the engine put it in the forward."""

    blueprint: str
    blend: str
    init_seed: int
    quality: float
    dependency: float
    rho_max: float
    params: int
    gate_params: int
    mode: str = "inert"
    alpha: float = 0.0
    isolated: bool = False
    fossil: bool = False
    trained: int = 0  # epochs trained (maturity clock)

    @property
    def real_alpha(self) -> float:
        if self.mode == "blend":
            return self.alpha
        return 1.0 if self.mode == "fused" else 0.0

    def maturity(self, seed_tau: float) -> float:
        return 1.0 - math.exp(-self.trained / seed_tau)

    def effect(self, a: float, seed_tau: float) -> float:
        """E(a) = a·q·m − δ·α − δ·max(0, α − a); an inert seed is out of the forward."""
        if self.mode == "inert":
            return 0.0
        alpha = self.real_alpha
        return (a * self.quality * self.maturity(seed_tau) - self.dependency * alpha
                - self.dependency * max(0.0, alpha - a))

    def state(self) -> dict[str, Any]:
        return attrs.asdict(self)


class SimulatedBackend:
    """The Backend protocol on parametric curves (module docstring). Plain data only."""

    def __init__(self, spec: TaskSpec, settings: SimulatedSettings, train: TrainSettings,
                 lifecycle: LifecycleConfig, slots: tuple[str, ...], context: int | None = None):
        self.spec, self.settings, self.train, self.lifecycle = spec, settings, train, lifecycle
        self.slot_ids = tuple(slots)
        self.host_params, self.slot_specs = host_shape(spec.topology, spec.host_preset)
        known = [s for s, _, _ in self.slot_specs]
        unknown = sorted(set(self.slot_ids) - set(known))
        if unknown:
            raise ValueError(f"unknown slot {', '.join(unknown)} (choose from {', '.join(known)})")
        self.channels = {s: c for s, c, _ in self.slot_specs}
        self.context = context
        if spec.topology == "transformer":
            from esper.compute.hosts import TRANSFORMER_PRESETS

            self.context = context or TRANSFORMER_PRESETS[spec.host_preset].block_size
        self.l_rand = spec.l_rand
        self.batches = spec.steps_per_epoch or NOMINAL_BATCHES
        per_sample = self.context if spec.topology == "transformer" else 1
        self.train_samples = self.batches * spec.batch_size * per_sample
        self.eval_examples = NOMINAL_EVAL * per_sample
        self.episode_seed = 0
        self.base = mix64(0, SIMULATOR)
        self.max_epochs = 1
        self.total_steps = 1
        self.step = 0
        self.epoch = 0
        self.host_t = 0
        self.seeds: dict[str, tuple[str, str]] = {}  # slot -> (blueprint, blend kind), as the engine reads it
        self.sim: dict[str, SimSeed] = {}

    # -- construction ---------------------------------------------------------------------------

    def build(self, episode_seed: int, max_epochs: int) -> HostSummary:
        self.episode_seed = episode_seed
        self.base = mix64(episode_seed, SIMULATOR)
        self.max_epochs = max_epochs
        self.total_steps = max_epochs * self.batches
        self.step = self.epoch = self.host_t = 0
        self.seeds, self.sim = {}, {}
        return self.summary()

    def summary(self) -> HostSummary:
        spec = self.spec
        if spec.topology == "transformer":
            shape: tuple[int, ...] = (self.context,)
        else:
            from esper.compute.hosts import CNN_PRESETS

            preset = CNN_PRESETS[spec.host_preset]
            shape = (preset.in_channels, preset.image_size, preset.image_size)
        return HostSummary(preset=spec.host_preset, param_count=self.host_params, input_shape=shape,
                           classes=spec.classes, slots=self.slot_specs)

    # -- seeds ----------------------------------------------------------------------------------

    def germinate(self, slot: str, blueprint: str, blend_kind: str, init_seed: int) -> SeedBuild:
        bp = get_blueprint(self.spec.topology, blueprint)
        if slot not in self.slot_ids:
            raise KeyError(f"slot {slot!r} is not enabled")
        if slot in self.sim:
            raise RuntimeError(f"slot {slot} already holds a seed")
        if blend_kind not in BLEND_KINDS:
            raise ValueError(f"unknown blend kind {blend_kind!r} (choose from {', '.join(BLEND_KINDS)})")
        mu, sigma, rho_max, delta = self.settings.blueprints[blueprint]
        channels = self.channels[slot]
        params = bp.param_count(channels)
        gate = max(1, channels // 4) * (channels + 2) + 1 if blend_kind == "gated" else 0
        quality = mu + sigma * normal(mix64(init_seed, SIMULATOR), _QUALITY)
        self.sim[slot] = SimSeed(blueprint=blueprint, blend=blend_kind, init_seed=init_seed, quality=quality,
                                 dependency=delta, rho_max=rho_max if params else 0.0, params=params,
                                 gate_params=gate)
        self.seeds[slot] = (blueprint, blend_kind)
        return SeedBuild(shape_ok=True, finite=True, identity=True if bp.identity_at_birth else None,
                         param_count=params, blend_params=gate)

    def drop(self, slot: str) -> None:
        self.sim.pop(slot, None)
        self.seeds.pop(slot, None)

    def set_slot(self, slot: str, mode: str, alpha: float, isolated: bool, fossil: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown slot mode {mode!r} (choose from {', '.join(MODES)})")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha {alpha} is outside [0, 1]")
        seed = self.sim.get(slot)
        if seed is None:
            if mode != "inert":
                raise RuntimeError(f"slot {slot} has no seed to put in mode {mode}")
            return
        if mode in ("blend", "fused") and alpha >= 1.0 and seed.blend == "gated":
            # The schedule and its gate are discarded (lifecycle §4.5); re-insert like the torch backend.
            seed.blend, seed.gate_params = "linear", 0
            self.seeds.pop(slot)
            self.seeds[slot] = (seed.blueprint, "linear")
        seed.mode, seed.alpha, seed.isolated = mode, float(alpha), isolated
        if fossil:
            seed.fossil = True

    # -- scores ---------------------------------------------------------------------------------

    def host_score(self) -> float:
        s = self.settings
        return s.a_inf - (s.a_inf - s.a0) * math.exp(-self.host_t / s.tau)

    def true_score(self, overrides: dict[str, float] | None = None) -> float:
        """The noiseless model score with some slots' alphas overridden."""
        overrides = overrides or {}
        total = self.host_score()
        for slot, seed in self.sim.items():
            total += seed.effect(overrides.get(slot, seed.real_alpha), self.settings.seed_tau)
        return _clamp(total)

    def _noise(self, *key: int) -> float:
        return self.settings.noise * normal(self.base, *key) if self.settings.noise else 0.0

    def _evaluation(self, score: float) -> Evaluation:
        return Evaluation(loss=self.l_rand * (1.0 - score / 100.0), score=score, examples=self.eval_examples)

    # -- epochs ---------------------------------------------------------------------------------

    def run_epoch(self, plan: EpochPlan) -> tuple[TrainStats, ValStats]:
        train = self.train_epoch(plan.epoch, plan.ratio_slots, plan.incubating, plan.leak_slots)
        return train, self.validate(plan.ablate, plan.shadow, plan.all_off)

    def train_epoch(self, epoch: int, ratio_slots: tuple[str, ...], incubating: tuple[str, ...],
                    leak_slots: tuple[str, ...]) -> TrainStats:
        started = time.perf_counter()
        self.epoch = epoch
        self.host_t += 1
        for seed in self.sim.values():
            frozen = seed.fossil and not self.lifecycle.fossilized_trainable
            if seed.mode != "inert" and not frozen:
                seed.trained += 1
        p = self.settings.nan_probability
        non_finite = p > 0 and uniform(self.base, _NAN, epoch) <= p
        t = self.train
        lr_factor = schedule_factor(self.step + self.batches - 1, t.lr_schedule, t.warmup_steps, self.total_steps,
                                    t.min_lr_ratio)
        self.step += self.batches
        score = _clamp(self.true_score() + self._noise(_TRAIN, epoch))
        seeds = {}
        for slot, seed in self.sim.items():
            ratio = seed_norm = host_norm = None
            if slot in ratio_slots:
                ratio = 0.0
                if seed.params:
                    mean = seed.rho_max * (1.0 - math.exp(-seed.trained / 2.0))
                    noise = RATIO_NOISE * seed.rho_max * normal(self.base, _RATIO, epoch, seed.init_seed)
                    ratio = max(0.0, mean + noise)
                host_norm = HOST_GRAD_NORM
                n_seed = seed.params + seed.gate_params
                seed_norm = ratio * host_norm * math.sqrt(n_seed / self.host_params) if n_seed else 0.0
            seeds[slot] = SeedGradients(grad_ratio=ratio, seed_grad_norm=seed_norm, host_grad_norm=host_norm,
                                        isolation_leaks=0 if slot in leak_slots else None, finite=not non_finite)
        return TrainStats(loss=self.l_rand * (1.0 - score / 100.0), score=score, samples=self.train_samples,
                          non_finite=non_finite, seeds=seeds, lr=self.spec.host_optimizer.lr * lr_factor,
                          seconds=time.perf_counter() - started)

    def validate(self, ablate: tuple[str, ...], shadow: tuple[str, ...], all_off: bool) -> ValStats:
        started = time.perf_counter()
        epoch = self.epoch
        main_true = self.true_score()
        main_obs = _clamp(main_true + self._noise(_VAL, epoch))

        def counterfactual(overrides: dict[str, float], *key: int) -> Evaluation:
            delta = main_true - self.true_score(overrides)
            return self._evaluation(_clamp(main_obs - delta - self._noise(*key)))

        ablations = {s: counterfactual({s: 0.0}, _ABLATE, epoch, self.sim[s].init_seed) for s in ablate}
        shadows = {s: counterfactual({s: 1.0}, _SHADOW, epoch, self.sim[s].init_seed) for s in shadow}
        off = None
        if all_off:
            off = counterfactual({s: 0.0 for s, seed in self.sim.items() if seed.mode != "inert"}, _ALL_OFF, epoch)
        seconds = time.perf_counter() - started
        configs = 1 + len(ablations) + len(shadows) + (off is not None)
        main_only = seconds / configs
        return ValStats(main=self._evaluation(main_obs), ablations=ablations, shadows=shadows, all_off=off,
                        forward_passes=configs, seconds=main_only, counterfactual_seconds=seconds - main_only)

    def test(self) -> Evaluation:
        return self._evaluation(_clamp(self.true_score() + self._noise(_TEST, self.epoch)))

    # -- governor -------------------------------------------------------------------------------

    def snapshot(self, epoch: int) -> dict[str, Any]:
        """Host progress and fossils only: cullable seeds never enter a snapshot."""
        fossils = {s: seed.state() for s, seed in sorted(self.sim.items()) if seed.fossil}
        return {"epoch": epoch, "host": {"t": self.host_t}, "fossils": fossils}

    def restore(self, snapshot: dict[str, Any]) -> None:
        fossils = {s for s, seed in self.sim.items() if seed.fossil}
        if set(snapshot["fossils"]) != fossils:
            raise RuntimeError(f"snapshot fossils {sorted(snapshot['fossils'])} != model {sorted(fossils)}")
        self.host_t = int(snapshot["host"]["t"])
        for slot, state in snapshot["fossils"].items():
            self.sim[slot].trained = int(state["trained"])
        self.reset_optimizer_state()

    def reset_optimizer_state(self) -> None:
        """Nothing to clear: the simulator keeps no optimizer state."""

    def param_counts(self) -> tuple[int, int]:
        return self.host_params, sum(s.params + s.gate_params for s in self.sim.values())

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (loadable with weights_only); seeds in the engine-visible order."""
        return {
            "episode_seed": self.episode_seed, "max_epochs": self.max_epochs, "total_steps": self.total_steps,
            "step": self.step, "epoch": self.epoch, "host_t": self.host_t,
            "slots": [[slot, self.sim[slot].state()] for slot in self.seeds],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episode_seed = int(state["episode_seed"])
        self.base = mix64(self.episode_seed, SIMULATOR)
        self.max_epochs, self.total_steps = int(state["max_epochs"]), int(state["total_steps"])
        self.step, self.epoch, self.host_t = int(state["step"]), int(state["epoch"]), int(state["host_t"])
        self.sim, self.seeds = {}, {}
        for slot, seed_state in state["slots"]:
            seed = SimSeed(**seed_state)
            self.sim[slot] = seed
            self.seeds[slot] = (seed.blueprint, seed.blend)

    def extend(self, max_epochs: int) -> None:
        """The episode now lasts `max_epochs`: the lr schedule stretches over the new total from the
        current step, as TorchBackend's does."""
        self.max_epochs, self.total_steps = max_epochs, max_epochs * self.batches

    def close(self) -> None:
        """Nothing to release."""
