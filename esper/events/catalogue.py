"""The whole event catalogue (events spec §4.3) as one tagged union of frozen msgspec structs.

Each class names its tag explicitly, so renaming a class can never change stored data. `VOLATILE`
lists the wall-clock or machine-dependent fields that determinism comparisons drop; it is a class
variable, so it is never encoded.
"""

from typing import Any, ClassVar

import msgspec

from esper.events.enums import Gate, Stage

# A float that may be absent ("not measured") or non-finite: JSON has no NaN, so the export writes
# null, and the same type decodes both formats.
Number = float | None


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    VOLATILE: ClassVar[frozenset[str]] = frozenset()


# -- nested values ------------------------------------------------------------------------------


class HostInfo(msgspec.Struct, frozen=True, kw_only=True):
    preset: str
    param_count: int
    input_shape: tuple[int, ...]
    classes: int


class SlotInfo(msgspec.Struct, frozen=True, kw_only=True):
    slot_id: str
    channels: int
    feature_shape: tuple[int, ...]
    enabled: bool


class CatalogueEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    identity_at_birth: bool
    params: dict[str, int]  # slot id -> trainable parameters at that slot's width


class Blend(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # linear | sigmoid | gated
    steps: int


class Check(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    passed: bool
    value: Number
    threshold: Number
    comparator: str  # >= | <= | == | present


class ForkOrigin(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    seq: int
    prefix_sha256: str


class PolicyCommand(msgspec.Struct, frozen=True, kw_only=True):
    op: str  # germinate | advance | cull | fossilize
    slot: str
    blueprint: str | None = None
    blend: Blend | None = None
    reason: str = ""


class SeedRewardInput(msgspec.Struct, frozen=True, kw_only=True):
    seed_id: str
    slot: str
    stage: Stage
    contribution: Number
    progress: Number
    attribution: Number
    ratio_penalty: Number


# -- run-scoped ---------------------------------------------------------------------------------


class RunStarted(Event, tag="RunStarted", kw_only=True):
    VOLATILE = frozenset({"platform", "started_at", "hostname", "pid"})
    config: dict[str, Any]
    seed: int
    esper_version: str
    torch_version: str | None
    python_version: str
    msgspec_version: str
    platform: str
    device: str
    deterministic: bool
    num_threads: int
    task: str
    topology: str
    host: HostInfo
    slots: tuple[SlotInfo, ...]
    catalogue: tuple[CatalogueEntry, ...]
    n_envs: int
    world_size: int
    score_kind: str  # accuracy | loss
    config_hash: str
    data_digest: str | None
    log_format: int
    forked_from: ForkOrigin | None = None
    started_at: str
    hostname: str
    pid: int


class CheckpointWritten(Event, tag="CheckpointWritten", kw_only=True):
    VOLATILE = frozenset({"path", "sha256", "size_bytes"})
    path: str
    sha256: str
    size_bytes: int
    covers_seq: int
    kind: str  # model | policy | full


class PolicyUpdated(Event, tag="PolicyUpdated", kw_only=True):
    VOLATILE = frozenset({"wall_time_s"})
    update: int
    round: int
    episodes_completed: int
    steps: int
    segments: int
    ppo_epochs: int
    epochs_run: int
    early_stopped: bool
    stop_epoch: int | None
    stop_minibatch: int | None
    approx_kl: float
    kl: dict[str, float]
    clip_fraction: dict[str, float]
    entropy: dict[str, float]
    applicable: dict[str, int]
    policy_loss: float
    value_loss: float
    explained_variance: Number
    grad_norm_mean: float
    grad_norm_max: float
    lr: float
    entropy_coef: float
    reward_std: float
    observations: int
    logprob_drift: float
    advantage_mean: float
    advantage_std: float
    return_mean: float
    return_std: float
    op_counts: dict[str, int]
    rollbacks: int
    wall_time_s: float


class RunFinished(Event, tag="RunFinished", kw_only=True):
    VOLATILE = frozenset({"wall_time_s"})
    status: str  # completed | failed | interrupted
    episodes_completed: int
    final: dict[str, Number]
    error_type: str | None = None
    error_message: str | None = None
    wall_time_s: float


# -- env-scoped ---------------------------------------------------------------------------------


class EpisodeStarted(Event, tag="EpisodeStarted", kw_only=True):
    epoch: int
    episode_seed: int
    host_seed: int
    host_params: int
    slots_enabled: tuple[str, ...]
    max_epochs: int
    evaluation: bool


# A running episode's length grows (`esper run --resume --epochs E'`): its EpisodeStarted lies in
# the copied prefix and is never rewritten, so the new length is a fact of its own.
class EpisodeExtended(Event, tag="EpisodeExtended", kw_only=True):
    epoch: int
    max_epochs: int
    previous_max_epochs: int


class EpochCompleted(Event, tag="EpochCompleted", kw_only=True):
    VOLATILE = frozenset(
        {
            "train_time_s",
            "val_time_s",
            "counterfactual_time_s",
            "samples_per_s",
            "peak_memory_bytes",
            "recompiles",
            "wall_time_s",
        }
    )
    epoch: int
    train_loss: Number
    train_acc: Number
    val_loss: Number
    val_acc: Number
    n_train: int
    n_val: int
    total_params: int
    lr: float
    test_loss: Number = None
    test_acc: Number = None
    all_off_loss: Number = None
    all_off_acc: Number = None
    next_token_acc: Number = None
    forward_passes: int
    amp_scale: Number = None
    non_finite: bool
    rolled_back: bool
    train_time_s: float
    val_time_s: float
    counterfactual_time_s: float
    samples_per_s: float
    peak_memory_bytes: int | None = None
    recompiles: int | None = None
    wall_time_s: float


class PolicyDecided(Event, tag="PolicyDecided", kw_only=True):
    epoch: int
    policy: str  # none | random | heuristic | ppo
    policy_id: str
    commands: tuple[PolicyCommand, ...]
    action: dict[str, str | None]
    action_index: dict[str, int]
    legal: dict[str, tuple[str, ...]]
    log_prob: dict[str, float] | None = None
    log_prob_total: Number = None
    value: Number = None
    entropy: dict[str, float] | None = None
    rationale: str


class ActionRejected(Event, tag="ActionRejected", kw_only=True):
    epoch: int
    decision_epoch: int
    command: PolicyCommand
    code: str
    message: str


class RewardComputed(Event, tag="RewardComputed", kw_only=True):
    epoch: int
    decision_epoch: int
    mode: str
    components: dict[str, Number]
    total_raw: Number
    governor: bool
    terminated: bool
    truncated: bool
    score_before: Number
    score_after: Number
    potential_before: Number
    potential_after: Number
    seed_params_total: int
    host_params: int
    seeds: tuple[SeedRewardInput, ...]


class GovernorRolledBack(Event, tag="GovernorRolledBack", kw_only=True):
    epoch: int
    reason: str  # nan_loss | lobotomy | divergence
    restored_epoch: int
    loss_at_panic: Number
    threshold: Number
    consecutive_panics: int
    culled: tuple[str, ...]
    history_mean: Number
    history_std: Number
    decision_epoch: int | None
    rollback_index: int


class EpochTicked(Event, tag="EpochTicked", kw_only=True):
    epoch: int
    state_digest: str


class EpisodeFinished(Event, tag="EpisodeFinished", kw_only=True):
    epoch: int
    epochs: int
    final_val_acc: Number
    best_val_acc: Number
    final_val_loss: Number
    seeds_germinated: int
    seeds_fossilized: int
    seeds_culled: int
    total_params: int
    episode_return: Number
    state_digest: str


# -- seed-scoped --------------------------------------------------------------------------------


class SeedEvent(Event, kw_only=True):
    epoch: int
    slot: str
    seed_id: str


class SeedGerminated(SeedEvent, tag="SeedGerminated", kw_only=True):
    blueprint: str
    blend: Blend
    seed_params: int
    blend_params: int
    identity_at_birth: bool
    decision_epoch: int | None


class GateEvaluated(SeedEvent, tag="GateEvaluated", kw_only=True):
    blueprint: str
    gate: Gate
    target_stage: Stage
    passed: bool
    score: float
    checks: tuple[Check, ...]
    message: str
    trigger: str  # tick | command


class StageChanged(SeedEvent, tag="StageChanged", kw_only=True):
    from_stage: Stage
    to_stage: Stage
    reason: str
    trigger: str  # tick | command | rollback
    epochs_in_previous_stage: int


class AlphaChanged(SeedEvent, tag="AlphaChanged", kw_only=True):
    old: float
    new: float
    step: int
    steps_total: int
    reason: str  # ramp | ramp_complete | pinned | cull


class SeedMeasured(SeedEvent, tag="SeedMeasured", kw_only=True):
    stage: Stage
    grad_ratio: Number
    grad_ratio_ema: Number
    seed_grad_norm: Number
    host_grad_norm: Number
    isolation_leaks: int | None
    finite: bool | None
    vanishing: bool | None
    exploding: bool | None


class CounterfactualMeasured(SeedEvent, tag="CounterfactualMeasured", kw_only=True):
    kind: str  # ablation | shadow
    alpha: float
    real_acc: Number
    ablated_acc: Number
    contribution: Number
    real_loss: Number
    ablated_loss: Number
    n_examples: int


class SeedCulled(SeedEvent, tag="SeedCulled", kw_only=True):
    reason: str
    initiator: str  # policy | operator | lifecycle | governor
    stage_at_cull: Stage
    epochs_total: int
    total_improvement: Number
    last_counterfactual: Number
    decision_epoch: int | None


class SeedFossilized(SeedEvent, tag="SeedFossilized", kw_only=True):
    contribution: Number
    total_improvement: Number
    seed_params: int
    epochs_total: int
    decision_epoch: int | None


AnyEvent = (
    RunStarted
    | CheckpointWritten
    | PolicyUpdated
    | RunFinished
    | EpisodeStarted
    | EpisodeExtended
    | EpochCompleted
    | PolicyDecided
    | ActionRejected
    | RewardComputed
    | GovernorRolledBack
    | EpochTicked
    | EpisodeFinished
    | SeedGerminated
    | GateEvaluated
    | StageChanged
    | AlphaChanged
    | SeedMeasured
    | CounterfactualMeasured
    | SeedCulled
    | SeedFossilized
)

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__
RUN_SCOPED: frozenset[type[Event]] = frozenset({RunStarted, CheckpointWritten, PolicyUpdated, RunFinished})
