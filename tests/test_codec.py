"""Codec round trips for every event type, JSON Schema validity, and the schema check."""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import msgspec
import pytest
from event_factory import RUN_ID, all_examples, example
from hypothesis import given, settings, strategies as st

from esper.events import EVENT_TYPES, SCHEMA_VERSION, Record, UnknownEventType, codec, decode_record, encode_record
from esper.events import schema
from esper.events.catalogue import RewardComputed

ROOT = Path(__file__).resolve().parent.parent


def _record(event, seq=0):
    return Record(seq=seq, run_id=RUN_ID, env=0, episode=0, ts=1, schema=SCHEMA_VERSION, batch_end=True, event=event)


def _stored_schema():
    return json.loads((ROOT / "schemas" / schema.SCHEMA_FILE).read_text())


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
def test_every_type_round_trips_through_msgpack_and_json(cls):
    # Compared as bytes: NaN-aware, and bit for bit.
    record = _record(example(cls))
    assert encode_record(decode_record(encode_record(record))) == encode_record(record)
    as_json = codec.record_to_json(record)
    assert codec.record_to_json(codec.record_from_json(as_json)) == as_json


def test_every_type_has_an_example():
    assert {type(e) for e in all_examples()} == set(EVENT_TYPES)


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
def test_every_type_validates_against_the_checked_in_schema(cls):
    instance = json.loads(codec.record_to_json(_record(example(cls))))
    jsonschema.validate(instance, _stored_schema())


def test_a_bad_instance_fails_the_schema():
    instance = json.loads(codec.record_to_json(_record(example(EVENT_TYPES[0]))))
    instance["seq"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance, _stored_schema())


def test_discriminator_lists_exactly_the_union_tags():
    document = schema.build_schema()
    record = document["$defs"]["Record"] if "$defs" in document and "Record" in document["$defs"] else document
    mapping = record["properties"]["event"]["discriminator"]["mapping"]
    assert set(mapping) == {cls.__struct_config__.tag for cls in EVENT_TYPES}
    assert all(cls.__struct_config__.tag == cls.__name__ for cls in EVENT_TYPES)


def test_schema_check_passes_on_the_repository_and_names_a_stale_path(tmp_path):
    assert schema.check(ROOT / "schemas") is None
    stored = _stored_schema()
    stored["$defs"]["EpochTicked"]["required"] = ["epoch"]
    (tmp_path / schema.SCHEMA_FILE).write_text(json.dumps(stored))
    problem = schema.check(tmp_path)
    assert "$.$defs.EpochTicked.required" in problem and "SCHEMA_VERSION" in problem
    stored["x-esper-schema-version"] = SCHEMA_VERSION - 1
    (tmp_path / schema.SCHEMA_FILE).write_text(json.dumps(stored))
    assert "SCHEMA_VERSION stayed" not in schema.check(tmp_path)


def test_esper_schemas_check_cli_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "esper", "schemas", "--check"], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / schema.SCHEMA_FILE).write_text("{}\n")
    stale = subprocess.run([sys.executable, "-m", "esper", "schemas", "--check", "--out", str(tmp_path)],
                           capture_output=True, text=True)
    assert stale.returncode == 1
    assert stale.stderr.count("\n") == 1 and stale.stderr.startswith("esper: error:")


def test_unknown_tag_is_reported_with_its_seq():
    raw = msgspec.msgpack.decode(encode_record(_record(example(EVENT_TYPES[0]), seq=5)))
    raw["event"] = {"type": "FutureEvent", "x": 1}
    with pytest.raises(UnknownEventType) as caught:
        decode_record(msgspec.msgpack.encode(raw))
    assert caught.value.seq == 5 and caught.value.type == "FutureEvent"


def test_unknown_fields_are_accepted_for_forward_compatibility():
    raw = msgspec.msgpack.decode(encode_record(_record(example(EVENT_TYPES[0]))))
    raw["event"]["added_in_a_later_version"] = 1
    raw["also_new"] = True
    assert decode_record(msgspec.msgpack.encode(raw)) == _record(example(EVENT_TYPES[0]))


def test_envelope_first_decoding_leaves_the_payload_raw():
    record = _record(example(EVENT_TYPES[0]), seq=9)
    raw = codec.decode_envelope(encode_record(record))
    assert raw.seq == 9 and bytes(raw.event) == codec.encode_event(record.event)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=False, allow_infinity=False))
def test_floats_survive_msgpack_bit_for_bit_and_json_when_finite(any_float, finite):
    event = RewardComputed(epoch=2, decision_epoch=1, mode="sparse", components={"a": any_float, "b": finite},
                           total_raw=finite, governor=False, terminated=False, truncated=False, score_before=0.0,
                           score_after=0.0, potential_before=0.0, potential_after=0.0, seed_params_total=0,
                           host_params=1, seeds=())
    back = decode_record(encode_record(_record(event))).event.components["a"]
    assert (math.isnan(back) and math.isnan(any_float)) or back == any_float
    through_json = codec.record_from_json(codec.record_to_json(_record(event))).event
    assert through_json.total_raw == finite
    assert through_json.components["a"] == (any_float if math.isfinite(any_float) else None)


def test_import_boundary_keeps_torch_and_duckdb_out_of_the_core():
    code = ("import sys, esper.events, esper.events.log, esper.lifecycle, esper.lifecycle.fold;"
            "bad = [m for m in ('torch', 'duckdb') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_events_import_no_other_esper_package_and_lifecycle_only_events():
    rules = {"events": {"esper", "esper.events"}, "lifecycle": {"esper", "esper.events", "esper.lifecycle"}}
    for package, allowed in rules.items():
        for path in (ROOT / "esper" / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in (n for n in names if n.startswith("esper")):
                    assert ".".join(name.split(".")[:2]) in allowed, f"{path.name} imports {name}"
