"""Commands (events §3): what the engine asks the decider. Never logged; decoded strictly so they
can cross processes."""

import msgspec

from esper.events.catalogue import (
    Blend,
    EpochCompleted,
    PolicyCommand,
    PolicyDecided,
    PolicyUpdated,
    RewardComputed,
    RunStarted,
)


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    pass


class ProbeReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the torch side measured on a freshly built seed, for G0 to judge (lifecycle §4.9)."""

    shape_ok: bool
    finite: bool
    identity: bool | None  # None when the blueprint declares no identity at birth
    param_count: int
    blend_params: int = 0


class CounterfactualSample(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: str  # ablation | shadow
    alpha: float
    real_acc: float
    ablated_acc: float
    real_loss: float
    ablated_loss: float
    n: int


class SlotMeasurement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    slot: str
    seed_id: str
    grad_ratio: float | None = None
    seed_grad_norm: float | None = None
    host_grad_norm: float | None = None
    isolation_leaks: int | None = None
    finite: bool | None = None
    vanishing: bool | None = None
    exploding: bool | None = None
    counterfactual: CounterfactualSample | None = None


class StartRun(Command, tag="StartRun", kw_only=True):
    run: RunStarted


class StartEpisode(Command, tag="StartEpisode", kw_only=True):
    env: int = 0
    episode_seed: int
    host_seed: int
    host_params: int
    slots_enabled: tuple[str, ...]
    max_epochs: int
    evaluation: bool = False


class ExtendEpisode(Command, tag="ExtendEpisode", kw_only=True):
    """Lengthen the env's running episode to `max_epochs` (a resume with a larger `--epochs`)."""

    env: int = 0
    max_epochs: int


class Germinate(Command, tag="Germinate", kw_only=True):
    env: int = 0
    slot: str
    blueprint: str
    blend: Blend | None = None  # None: the lifecycle's default schedule
    probe: ProbeReport
    decision_epoch: int | None = None


class Advance(Command, tag="Advance", kw_only=True):
    env: int = 0
    slot: str
    decision_epoch: int | None = None


class Fossilize(Command, tag="Fossilize", kw_only=True):
    env: int = 0
    slot: str
    decision_epoch: int | None = None


class Cull(Command, tag="Cull", kw_only=True):
    env: int = 0
    slot: str
    reason: str
    initiator: str = "operator"
    decision_epoch: int | None = None


class Wait(Command, tag="Wait", kw_only=True):
    env: int = 0
    decision_epoch: int | None = None


class RecordEpoch(Command, tag="RecordEpoch", kw_only=True):
    env: int = 0
    epoch: int
    metrics: EpochCompleted  # its `epoch` must equal the command's
    measurements: tuple[SlotMeasurement, ...] = ()


class Tick(Command, tag="Tick", kw_only=True):
    env: int = 0
    epoch: int


class RollBack(Command, tag="RollBack", kw_only=True):
    env: int = 0
    epoch: int
    reason: str
    restored_epoch: int
    loss: float
    threshold: float | None
    consecutive_panics: int
    history_mean: float | None
    history_std: float | None
    decision_epoch: int | None = None


class RecordDecision(Command, tag="RecordDecision", kw_only=True):
    env: int = 0
    decision: PolicyDecided


class RejectAction(Command, tag="RejectAction", kw_only=True):
    env: int = 0
    decision_epoch: int
    command: PolicyCommand
    code: str
    message: str


class RecordReward(Command, tag="RecordReward", kw_only=True):
    env: int = 0
    reward: RewardComputed


class RecordCheckpoint(Command, tag="RecordCheckpoint", kw_only=True):
    path: str
    sha256: str
    size: int
    covers_seq: int
    kind: str


class RecordPolicyUpdate(Command, tag="RecordPolicyUpdate", kw_only=True):
    update: PolicyUpdated


class FinishEpisode(Command, tag="FinishEpisode", kw_only=True):
    env: int = 0


class FinishRun(Command, tag="FinishRun", kw_only=True):
    status: str  # completed | failed | interrupted
    final: dict[str, float | None] = {}
    error_type: str | None = None
    error_message: str | None = None
    wall_time_s: float = 0.0


AnyCommand = (
    StartRun
    | StartEpisode
    | ExtendEpisode
    | Germinate
    | Advance
    | Fossilize
    | Cull
    | Wait
    | RecordEpoch
    | Tick
    | RollBack
    | RecordDecision
    | RejectAction
    | RecordReward
    | RecordCheckpoint
    | RecordPolicyUpdate
    | FinishEpisode
    | FinishRun
)

_decoder = msgspec.msgpack.Decoder(AnyCommand)
_encoder = msgspec.msgpack.Encoder()


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> Command:
    """Strict: unknown fields, unknown tags and wrong types raise `msgspec.ValidationError` or
    `msgspec.DecodeError`, never anything else."""
    try:
        return _decoder.decode(data)
    except UnicodeDecodeError as exc:  # msgspec lets invalid UTF-8 in a string through as this
        raise msgspec.DecodeError(f"invalid UTF-8 in a string: {exc}") from None
