"""The fixed views over `raw_events` (events spec §8), generated once from the event catalogue.

Each view reads the rows of its event type and parses each payload once, with `from_json` and a
structure derived from the msgspec type, into a typed struct `p`; its fields become columns. Stage
and gate numbers become their names (with the number in `<field>_id`), by a CASE generated from
the enums. Nothing here depends on a user value, so every view is constant SQL text.
"""

import json

import msgspec.inspect as mi

from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.policy.rewards import COMPONENTS

_SCALARS = {mi.IntType: "BIGINT", mi.FloatType: "DOUBLE", mi.BoolType: "BOOLEAN", mi.StrType: "VARCHAR",
            mi.EnumType: "INTEGER", mi.AnyType: "JSON"}


def _present(t: mi.Type) -> mi.Type:
    """`X | None` is X: null reads as NULL whatever the type."""
    if isinstance(t, mi.UnionType):
        return next(x for x in t.types if not isinstance(x, mi.NoneType))
    return t


def _ddl(t: mi.Type) -> str:
    t = _present(t)
    if isinstance(t, mi.StructType):
        return "STRUCT(" + ", ".join(f'"{f.encode_name}" {_ddl(f.type)}' for f in t.fields) + ")"
    if isinstance(t, (mi.VarTupleType, mi.ListType)):
        return f"{_ddl(t.item_type)}[]"
    if isinstance(t, mi.DictType):
        # An open map of anything (the run configuration) stays JSON for json_extract.
        return "JSON" if isinstance(t.value_type, mi.AnyType) else f"MAP(VARCHAR, {_ddl(t.value_type)})"
    return _SCALARS[type(t)]


# Seeds are drawn from the whole u64 range; from_json would make a larger value than BIGINT holds NULL.
_UNSIGNED = {"seed", "episode_seed", "host_seed"}


def _field_ddl(f: mi.Field) -> str:
    return "UBIGINT" if f.name in _UNSIGNED else _ddl(f.type)


def _fields(cls: type[ev.Event], names: tuple[str, ...]) -> list[mi.Field]:
    fields = mi.type_info(cls).fields
    return [f for f in fields if f.name in names] if names else list(fields)


def _payload(cls: type[ev.Event], *names: str) -> str:
    """The rows of one event type with the payload fields `names` (default: all) parsed into `p`."""
    structure = json.dumps({f.encode_name: _field_ddl(f) for f in _fields(cls, names)})
    tag = cls.__struct_config__.tag
    return (f"SELECT run_id, env, episode, seq, from_json(event, '{structure}') AS p "
            f"FROM raw_events WHERE type = '{tag}'")


def _enum_case(expr: str, enum: type) -> str:
    whens = " ".join(f"WHEN {m.value} THEN '{m.name}'" for m in enum)
    return f"CASE {expr} {whens} END"


def _columns(cls: type[ev.Event], *names: str) -> str:
    """`p`'s fields as columns; an enum field as its name, plus its number as `<field>_id`."""
    out = []
    for f in _fields(cls, names):
        t = _present(f.type)
        if isinstance(t, mi.EnumType):
            out += [f"{_enum_case(f'p.{f.name}', t.cls)} AS {f.name}", f"p.{f.name} AS {f.name}_id"]
        else:
            out.append(f"p.{f.name} AS {f.name}")
    return ", ".join(out)


def _flat(cls: type[ev.Event], *names: str) -> str:
    """One row per event of `cls`: the envelope keys, then its payload fields (default: all)."""
    epoch = "" if "epoch" in {f.name for f in _fields(cls, ())} else "NULL::BIGINT AS epoch, "
    return f"SELECT run_id, env, episode, seq, {epoch}{_columns(cls, *names)} FROM ({_payload(cls, *names)})"


def _stage(expr: str) -> str:
    return _enum_case(expr, Stage)


_LIVE = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY)
# The slot's embargo pipeline after a cull still names the seed, but the seed ended as CULLED.
_PIPELINE = f"{int(Stage.DORMANT)}, {int(Stage.EMBARGOED)}, {int(Stage.RESETTING)}"

EVENTS = """
SELECT run_id, env, episode, seq, TRY_CAST(event->>'$.epoch' AS BIGINT) AS epoch, make_timestamp(ts) AS ts, type,
       batch_end, schema, event, filename
FROM raw_events"""

STAGE_CHANGES = f"""
WITH c AS ({_flat(ev.StageChanged)}),
     g AS ({_flat(ev.SeedGerminated, "seed_id", "blueprint")})
SELECT c.run_id, c.env, c.episode, c.seq, c.epoch, c.slot, c.seed_id, g.blueprint, c.from_stage, c.from_stage_id,
       c.to_stage, c.to_stage_id, c.reason, c.trigger, c.epochs_in_previous_stage
FROM c LEFT JOIN g ON g.run_id = c.run_id AND g.env = c.env AND g.episode = c.episode AND g.seed_id = c.seed_id"""

GATE_CHECKS = """
SELECT run_id, env, episode, seq, epoch, slot, seed_id, blueprint, gate, gate_id, passed AS verdict_passed,
       check_index, c.tag AS tag, c.passed AS check_passed, c.value AS value, c.threshold AS threshold,
       c.comparator AS comparator
FROM (SELECT *, unnest(checks) AS c, unnest(range(len(checks))) AS check_index FROM gate_verdicts)"""

# `max_epochs` is the episode's length as it stands: the last EpisodeExtended's (a resume that
# extended it), else EpisodeStarted's, which `initial_max_epochs` keeps.
EPISODES = f"""
WITH s AS ({_flat(ev.EpisodeStarted)}),
     f AS ({_flat(ev.EpisodeFinished)}),
     x AS (SELECT run_id, env, episode, arg_max(p.max_epochs, seq) AS max_epochs
           FROM ({_payload(ev.EpisodeExtended, "max_epochs")}) GROUP BY ALL)
SELECT s.* REPLACE (coalesce(x.max_epochs, s.max_epochs) AS max_epochs), s.max_epochs AS initial_max_epochs,
       f.seq IS NOT NULL AS finished,
       f.seq IS NOT NULL OR s.episode < max(s.episode) OVER (PARTITION BY s.run_id, s.env) AS ended,
       f.epochs, f.final_val_acc, f.best_val_acc, f.final_val_loss, f.seeds_germinated, f.seeds_fossilized,
       f.seeds_culled, f.total_params, f.episode_return
FROM s LEFT JOIN f ON f.run_id = s.run_id AND f.env = s.env AND f.episode = s.episode
LEFT JOIN x ON x.run_id = s.run_id AND x.env = s.env AND x.episode = s.episode"""

_STAGE_TIMES = ",\n".join(
    f"sum(coalesce(left_epoch, last_epoch) - epoch) FILTER (WHERE stage = {int(s)})::BIGINT AS epochs_{s.name.lower()}"
    for s in _LIVE
)
_STAGE_TIME_COLUMNS = ", ".join(f"coalesce(t.epochs_{s.name.lower()}, 0) AS epochs_{s.name.lower()}" for s in _LIVE)

SEEDS = f"""
WITH g AS ({_flat(ev.SeedGerminated)}),
     c AS (SELECT run_id, env, episode, seq, p.epoch AS epoch, p.seed_id AS seed_id, p.to_stage AS stage,
                  lead(p.epoch) OVER (PARTITION BY run_id, env, episode, p.seed_id ORDER BY seq) AS left_epoch
           FROM ({_payload(ev.StageChanged, "epoch", "seed_id", "to_stage")})),
     -- epochs rise with seq, so only each episode's last EpochCompleted needs parsing
     e AS (SELECT run_id, env, episode, (arg_max(event, seq)->>'$.epoch')::BIGINT AS last_epoch
           FROM raw_events WHERE type = 'EpochCompleted' GROUP BY ALL),
     t AS (SELECT run_id, env, episode, seed_id,
                  max(epoch) FILTER (WHERE stage IN ({int(Stage.FOSSILIZED)}, {int(Stage.CULLED)})) AS ended_epoch,
                  bool_or(stage = {int(Stage.FOSSILIZED)}) AS fossilized,
                  bool_or(stage = {int(Stage.CULLED)}) AS culled,
                  arg_max(stage, seq) FILTER (WHERE stage NOT IN ({_PIPELINE})) AS final_stage,
                  {_STAGE_TIMES}
           FROM c LEFT JOIN e USING (run_id, env, episode) GROUP BY ALL),
     k AS ({_flat(ev.SeedCulled, "seed_id", "reason", "stage_at_cull")}),
     x AS (SELECT run_id, env, episode, p.seed_id AS seed_id, arg_max_null(p.contribution, seq) AS last_contribution
           FROM ({_payload(ev.CounterfactualMeasured, "seed_id", "kind", "contribution")})
           WHERE p.kind = 'ablation' GROUP BY ALL)
SELECT g.run_id, g.env, g.episode, g.seed_id, g.slot, g.blueprint, g.blend.kind AS blend, g.seed_params,
       g.epoch AS germinated_epoch, t.ended_epoch,
       CASE WHEN t.fossilized THEN 'fossilized' WHEN t.culled THEN 'culled'
            WHEN d.ended THEN 'episode_ended' ELSE 'alive' END AS outcome,
       {_stage("t.final_stage")} AS final_stage, k.stage_at_cull, k.reason AS cull_reason,
       {_STAGE_TIME_COLUMNS},
       coalesce(t.ended_epoch, e.last_epoch) - g.epoch AS lifetime_epochs, x.last_contribution
FROM g
LEFT JOIN t ON t.run_id = g.run_id AND t.env = g.env AND t.episode = g.episode AND t.seed_id = g.seed_id
LEFT JOIN k ON k.run_id = g.run_id AND k.env = g.env AND k.episode = g.episode AND k.seed_id = g.seed_id
LEFT JOIN x ON x.run_id = g.run_id AND x.env = g.env AND x.episode = g.episode AND x.seed_id = g.seed_id
LEFT JOIN e ON e.run_id = g.run_id AND e.env = g.env AND e.episode = g.episode
LEFT JOIN episodes d ON d.run_id = g.run_id AND d.env = g.env AND d.episode = g.episode"""

_REJECTIONS = f"({_payload(ev.ActionRejected, 'decision_epoch', 'command', 'code')})"

DECISIONS = f"""
WITH d AS ({_payload(ev.PolicyDecided)}),
     r AS (SELECT run_id, env, episode, p.decision_epoch AS epoch, count(*) AS rejected FROM {_REJECTIONS} GROUP BY ALL)
SELECT d.run_id, d.env, d.episode, d.seq, d.p.epoch AS epoch, d.p.policy AS policy, d.p.policy_id AS policy_id,
       len(d.p.commands) AS n_commands, list_transform(d.p.commands, lambda c: c.op) AS ops,
       d.p.log_prob_total AS log_prob_total, d.p.value AS value, d.p.legal['op'] AS legal_ops,
       coalesce(r.rejected, 0) AS rejected, d.p.log_prob AS log_prob, d.p.entropy AS entropy,
       d.p.rationale AS rationale
FROM d LEFT JOIN r ON r.run_id = d.run_id AND r.env = d.env AND r.episode = d.episode AND r.epoch = d.p.epoch"""

DECISION_COMMANDS = f"""
WITH d AS (SELECT run_id, env, episode, seq, p.epoch AS epoch, unnest(p.commands) AS c,
                  unnest(range(len(p.commands))) AS index
           FROM ({_payload(ev.PolicyDecided, "epoch", "commands")})),
     r AS (SELECT run_id, env, episode, p.decision_epoch AS epoch, p.command.op AS op, p.command.slot AS slot,
                  p.code AS code FROM {_REJECTIONS})
SELECT d.run_id, d.env, d.episode, d.seq, d.epoch, d.epoch AS decision_epoch, d.index, d.c.op AS op,
       d.c.slot AS slot, d.c.blueprint AS blueprint, d.c.blend.kind AS blend, d.c.reason AS reason,
       r.code IS NOT NULL AS rejected, r.code
FROM d LEFT JOIN r ON r.run_id = d.run_id AND r.env = d.env AND r.episode = d.episode AND r.epoch = d.epoch
                  AND r.op = d.c.op AND r.slot = d.c.slot"""

_REWARD_FIELDS = ("epoch", "decision_epoch", "mode", "total_raw", "terminated", "truncated", "score_before",
                  "score_after", "potential_before", "potential_after", "seed_params_total", "host_params")
_COMPONENT_COLUMNS = ", ".join(f"p.components['{name}'] AS {name}" for name in COMPONENTS)

# The payload's `governor` flag would clash with the `governor` component: it is `governor_flag`.
REWARDS = f"""
SELECT run_id, env, episode, seq, {_columns(ev.RewardComputed, *_REWARD_FIELDS)}, p.governor AS governor_flag,
       {_COMPONENT_COLUMNS}
FROM ({_payload(ev.RewardComputed, *_REWARD_FIELDS, "governor", "components")})"""

REWARD_COMPONENTS = f"""
SELECT run_id, env, episode, seq, p.epoch AS epoch, p.decision_epoch AS decision_epoch, p.mode AS mode,
       unnest(map_keys(p.components)) AS component, unnest(map_values(p.components)) AS value
FROM ({_payload(ev.RewardComputed, "epoch", "decision_epoch", "mode", "components")})"""

REWARD_SEEDS = f"""
SELECT run_id, env, episode, seq, epoch, decision_epoch, mode, s.seed_id AS seed_id, s.slot AS slot,
       {_stage("s.stage")} AS stage, s.stage AS stage_id, s.contribution AS contribution, s.progress AS progress,
       s.attribution AS attribution, s.ratio_penalty AS ratio_penalty
FROM (SELECT run_id, env, episode, seq, p.epoch AS epoch, p.decision_epoch AS decision_epoch, p.mode AS mode,
             unnest(p.seeds) AS s
      FROM ({_payload(ev.RewardComputed, "epoch", "decision_epoch", "mode", "seeds")}))"""

RUNS = f"""
WITH s AS ({_payload(ev.RunStarted)}), f AS ({_payload(ev.RunFinished)})
SELECT s.run_id, NULL::INTEGER AS env, NULL::INTEGER AS episode, s.p.task AS task, s.p.seed AS seed,
       json_extract_string(s.p.config, '$.run.policy') AS policy,
       CASE WHEN f.run_id IS NOT NULL THEN f.p.status WHEN l.tail = 'live' THEN 'running'
            ELSE 'unterminated' END AS status,
       f.p.episodes_completed AS episodes_completed, f.p.final AS final, f.p.error_type AS error_type,
       f.p.error_message AS error_message, s.p.forked_from.run_id AS forked_from,
       s.p.forked_from.seq AS forked_at_seq, s.p.topology AS topology, s.p.n_envs AS n_envs,
       s.p.world_size AS world_size, s.p.score_kind AS score_kind, s.p.device AS device,
       s.p.deterministic AS deterministic, s.p.esper_version AS esper_version, s.p.started_at AS started_at,
       s.p.config_hash AS config_hash, s.p.config AS config, l.records AS events, l.last_seq AS last_seq,
       l.tail AS tail, l.filename AS filename
FROM s LEFT JOIN f ON f.run_id = s.run_id LEFT JOIN logs l ON l.run_id = s.run_id"""

# Creation order: a view is created after the views it reads.
VIEWS: dict[str, str] = {
    "events": EVENTS,
    "epochs": _flat(ev.EpochCompleted),
    "episodes": EPISODES,
    "stage_changes": STAGE_CHANGES,
    "gate_verdicts": _flat(ev.GateEvaluated),
    "gate_checks": GATE_CHECKS,
    "seeds": SEEDS,
    "counterfactuals": _flat(ev.CounterfactualMeasured),
    "seed_measurements": _flat(ev.SeedMeasured),
    "alpha_changes": _flat(ev.AlphaChanged),
    "decisions": DECISIONS,
    "decision_commands": DECISION_COMMANDS,
    "rewards": REWARDS,
    "reward_components": REWARD_COMPONENTS,
    "reward_seeds": REWARD_SEEDS,
    "rollbacks": _flat(ev.GovernorRolledBack),
    "ppo_updates": _flat(ev.PolicyUpdated),
    "checkpoints": _flat(ev.CheckpointWritten),
    "runs": RUNS,
}

# The ready-made questions of the README (events spec §8), tested against the folded projections.
QUESTIONS: dict[str, str] = {
    "time in stage per blueprint": (
        "WITH s AS (SELECT *, lead(epoch) OVER (PARTITION BY run_id, env, episode, seed_id ORDER BY seq) "
        "AS left_epoch FROM stage_changes) SELECT blueprint, to_stage, avg(left_epoch - epoch) AS mean_epochs, "
        "count(*) AS n FROM s WHERE left_epoch IS NOT NULL GROUP BY ALL ORDER BY ALL"
    ),
    "gate failure reasons by gate": (
        "SELECT gate, tag, count(*) AS failures FROM gate_checks WHERE NOT check_passed "
        "GROUP BY ALL ORDER BY gate, failures DESC"
    ),
    "fossilization rate per blueprint": (
        "SELECT blueprint, count(*) AS germinated, count(*) FILTER (WHERE outcome = 'fossilized') AS fossilized, "
        "round(fossilized / germinated, 3) AS rate FROM seeds GROUP BY blueprint ORDER BY rate DESC"
    ),
    "accuracy curve per run": "SELECT run_id, env, episode, epoch, val_acc FROM epochs ORDER BY ALL",
    "reward components per decision": (
        "SELECT d.run_id, d.env, d.episode, d.epoch, d.ops, c.component, c.value FROM decisions d "
        "JOIN reward_components c ON c.run_id = d.run_id AND c.env = d.env AND c.episode = d.episode "
        "AND c.decision_epoch = d.epoch ORDER BY d.run_id, d.seq, c.component"
    ),
}
