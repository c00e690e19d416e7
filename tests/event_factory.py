"""One valid example of every event type, for tests that need real events of each kind.

`example(cls)` raises KeyError for a type without an example, so a new event type fails loudly
in `all_examples()` until someone adds it here.
"""

from esper.events import EVENT_TYPES, Event, Gate, Stage
from esper.events import catalogue as c

RUN_ID = "run-0000"
_SEED = {"epoch": 3, "slot": "mid", "seed_id": "env0-mid-1"}
_COMMAND = c.PolicyCommand(op="germinate", slot="mid", blueprint="norm", blend=c.Blend(kind="linear", steps=5))


def _run_started() -> Event:
    return c.RunStarted(
        config={"task": "digits", "lr": 0.01, "slots": ["early", "mid"], "nested": {"a": None}},
        seed=7,
        esper_version="0.1.0",
        torch_version=None,
        python_version="3.11.7",
        msgspec_version="0.22.0",
        platform="linux-x86_64",
        device="cpu",
        deterministic=True,
        num_threads=2,
        task="digits",
        topology="cnn",
        host=c.HostInfo(preset="cnn-digits", param_count=422, input_shape=(1, 8, 8), classes=10),
        slots=(c.SlotInfo(slot_id="mid", channels=8, feature_shape=(8, 2, 2), enabled=True),),
        catalogue=(c.CatalogueEntry(name="norm", identity_at_birth=True, params={"mid": 16}),),
        n_envs=1,
        world_size=1,
        score_kind="accuracy",
        config_hash="ab" * 32,
        data_digest=None,
        log_format=1,
        forked_from=c.ForkOrigin(run_id="run-parent", seq=41, prefix_sha256="cd" * 32),
        started_at="2026-01-01T00:00:00Z",
        hostname="box",
        pid=1234,
    )


_EXAMPLES = {
    c.RunStarted: _run_started,
    c.CheckpointWritten: lambda: c.CheckpointWritten(
        path="checkpoints/e3.pt", sha256="ef" * 32, size_bytes=4096, covers_seq=40, kind="model"
    ),
    c.PolicyUpdated: lambda: c.PolicyUpdated(
        update=1, round=1, episodes_completed=4, steps=100, segments=4, ppo_epochs=4, epochs_run=2,
        early_stopped=True, stop_epoch=1, stop_minibatch=3, approx_kl=0.02,
        kl={"op": 0.01}, clip_fraction={"op": 0.1}, entropy={"op": 1.2}, applicable={"op": 100},
        policy_loss=-0.1, value_loss=0.5, explained_variance=None, grad_norm_mean=0.3,
        grad_norm_max=0.9, lr=3e-4, entropy_coef=0.01, reward_std=1.0, observations=100,
        logprob_drift=0.0, advantage_mean=0.0, advantage_std=1.0, return_mean=0.2, return_std=0.4,
        op_counts={"wait": 90, "germinate": 10}, rollbacks=0, wall_time_s=1.5,
    ),
    c.RunFinished: lambda: c.RunFinished(
        status="completed", episodes_completed=4, final={"val_acc": 91.0, "test_acc": None}, wall_time_s=60.0
    ),
    c.EpisodeStarted: lambda: c.EpisodeStarted(
        epoch=0, episode_seed=11, host_seed=12, host_params=422, slots_enabled=("mid",), max_epochs=30,
        evaluation=False,
    ),
    c.EpisodeExtended: lambda: c.EpisodeExtended(epoch=12, max_epochs=40, previous_max_epochs=30),
    c.EpochCompleted: lambda: c.EpochCompleted(
        epoch=3, train_loss=0.9, train_acc=70.0, val_loss=1.0, val_acc=68.5, n_train=1257, n_val=270,
        total_params=438, lr=0.01, forward_passes=3, non_finite=False, rolled_back=False,
        train_time_s=0.2, val_time_s=0.05, counterfactual_time_s=0.01, samples_per_s=6000.0,
        wall_time_s=0.3,
    ),
    c.PolicyDecided: lambda: c.PolicyDecided(
        epoch=3, policy="random", policy_id="random-v1", commands=(_COMMAND,),
        action={"op": "germinate", "slot": "mid", "blueprint": "norm", "blend": None},
        action_index={"op": 1, "slot": 0}, legal={"op": ("wait", "germinate")},
        log_prob={"op": -0.69}, log_prob_total=-0.69, rationale="",
    ),
    c.ActionRejected: lambda: c.ActionRejected(
        epoch=3, decision_epoch=3, command=_COMMAND, code="slot_occupied", message="slot mid holds a live seed"
    ),
    c.RewardComputed: lambda: c.RewardComputed(
        epoch=4, decision_epoch=3, mode="shaped", components={"accuracy": 0.5, "rent": 0.0},
        total_raw=0.5, governor=False, terminated=False, truncated=False, score_before=68.5,
        score_after=69.0, potential_before=0.0, potential_after=0.1, seed_params_total=16,
        host_params=422,
        seeds=(c.SeedRewardInput(
            seed_id="env0-mid-1", slot="mid", stage=Stage.TRAINING, contribution=None, progress=0.1,
            attribution=0.0, ratio_penalty=0.0,
        ),),
    ),
    c.GovernorRolledBack: lambda: c.GovernorRolledBack(
        epoch=5, reason="nan_loss", restored_epoch=4, loss_at_panic=float("nan"), threshold=None,
        consecutive_panics=1, culled=("env0-mid-1",), history_mean=1.0, history_std=0.1,
        decision_epoch=None, rollback_index=1,
    ),
    c.EpochTicked: lambda: c.EpochTicked(epoch=3, state_digest="0f" * 32),
    c.EpisodeFinished: lambda: c.EpisodeFinished(
        epoch=29, epochs=30, final_val_acc=90.0, best_val_acc=91.0, final_val_loss=0.3,
        seeds_germinated=2, seeds_fossilized=1, seeds_culled=1, total_params=438, episode_return=3.5,
        state_digest="1e" * 32,
    ),
    c.SeedGerminated: lambda: c.SeedGerminated(
        **_SEED, blueprint="norm", blend=c.Blend(kind="sigmoid", steps=5), seed_params=16,
        blend_params=0, identity_at_birth=True, decision_epoch=3,
    ),
    c.GateEvaluated: lambda: c.GateEvaluated(
        **_SEED, blueprint="norm", gate=Gate.G1, target_stage=Stage.TRAINING, passed=True, score=1.0,
        checks=(c.Check(tag="finite", passed=True, value=None, threshold=None, comparator="present"),),
        message="", trigger="tick",
    ),
    c.StageChanged: lambda: c.StageChanged(
        **_SEED, from_stage=Stage.GERMINATED, to_stage=Stage.TRAINING, reason="auto", trigger="tick",
        epochs_in_previous_stage=1,
    ),
    c.AlphaChanged: lambda: c.AlphaChanged(**_SEED, old=0.2, new=0.4, step=2, steps_total=5, reason="ramp"),
    c.SeedMeasured: lambda: c.SeedMeasured(
        **_SEED, stage=Stage.TRAINING, grad_ratio=0.3, grad_ratio_ema=0.25, seed_grad_norm=0.01,
        host_grad_norm=0.04, isolation_leaks=0, finite=True, vanishing=False, exploding=False,
    ),
    c.CounterfactualMeasured: lambda: c.CounterfactualMeasured(
        **_SEED, kind="ablation", alpha=0.0, real_acc=70.0, ablated_acc=69.0, contribution=1.0,
        real_loss=0.9, ablated_loss=0.95, n_examples=270,
    ),
    c.SeedCulled: lambda: c.SeedCulled(
        **_SEED, reason="negative_counterfactual", initiator="lifecycle", stage_at_cull=Stage.BLENDING,
        epochs_total=6, total_improvement=-0.5, last_counterfactual=-1.0, decision_epoch=None,
    ),
    c.SeedFossilized: lambda: c.SeedFossilized(
        **_SEED, contribution=2.0, total_improvement=3.0, seed_params=16, epochs_total=12, decision_epoch=8
    ),
}


def example(cls: type[Event]) -> Event:
    return _EXAMPLES[cls]()


def all_examples() -> list[Event]:
    """Every event type once, in catalogue order (`RunStarted` first)."""
    missing = [cls.__name__ for cls in EVENT_TYPES if cls not in _EXAMPLES]
    if missing:
        raise AssertionError(f"tests/event_factory.py has no example of {', '.join(missing)}")
    return [example(cls) for cls in EVENT_TYPES]
