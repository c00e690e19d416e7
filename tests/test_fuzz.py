"""Property tests: the log reader, the config loader and the command decoder on arbitrary input raise
only their documented errors (tests/fuzz_targets.py lists them), never anything else.

Inputs are raw bytes and, to get past the first check of each parser, structured ones: a real log
with flipped, cut, inserted or duplicated bytes (some with their frame CRC recomputed, so the
decoder sees the damage); frames with a valid CRC around arbitrary msgpack; config layers mixing
real keys and wrong values; msgpack commands with real tags and fields of the wrong types.
`tests/fuzz_atheris.py` is the same three targets for atheris, when it is installed.
"""

import functools
import importlib.util
import math
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import attrs
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as targets
from esper.events import catalogue as c
from esper.events.log_format import FRAME_HEAD, HEADER_SIZE, header_bytes
from esper.lifecycle import commands as cmd
from esper.policy.run_config import RunConfig
from event_factory import RUN_ID, all_examples, example
from log_helpers import frame, frames, write_log

TESTS = Path(__file__).parent
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRIED = {"log": 0, "config": 0, "command": 0}


@pytest.fixture(scope="module")
def scratch():
    s = targets.Scratch()
    yield s
    s.close()


@functools.cache
def real_log() -> bytes:
    """A valid log of every event type, in batches of three (not a fixture: hypothesis would print
    all of it with every failing example)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "events.elog"
        events = [e for e in all_examples() if not isinstance(e, c.RunStarted)]
        write_log(path, [events[i:i + 3] for i in range(0, len(events), 3)])
        return path.read_bytes()


# -- the log reader ---------------------------------------------------------------------------


def _reframe(data: bytearray, index: int) -> None:
    """Recompute the CRC of the frame holding `index`, so damage there reaches the decoder."""
    for start, end in frames(bytes(data)):
        if start <= index < end:
            payload = bytes(data[start + FRAME_HEAD.size:end])
            data[start:start + FRAME_HEAD.size] = FRAME_HEAD.pack(len(payload), zlib.crc32(payload))
            return


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255), st.booleans()),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**6), st.integers(1, 400)),
    st.tuples(st.just("zero"), st.integers(0, 10**6), st.integers(1, 400)),
)


def mutate(base: bytes, mutations: list) -> bytes:
    data = bytearray(base)
    for m in mutations:
        if not data:
            break
        at = m[1] % len(data)
        if m[0] == "flip":
            data[at] ^= m[2]
            if m[3] and at >= HEADER_SIZE:
                _reframe(data, at)
        elif m[0] == "cut":
            del data[at:]
        elif m[0] == "insert":
            data[at:at] = m[2]
        elif m[0] == "duplicate":
            data[at:at] = data[at:at + m[2]]
        else:
            data[at:at + m[2]] = bytes(len(data[at:at + m[2]]))
    return bytes(data)


@FUZZ
@given(data=st.binary(max_size=2000))
def test_the_log_reader_on_arbitrary_bytes(scratch, data):
    TRIED["log"] += 1
    targets.read_log(scratch, data)


@FUZZ
@given(data=st.binary(max_size=2000))
def test_the_log_reader_on_a_valid_header_then_arbitrary_bytes(scratch, data):
    TRIED["log"] += 1
    targets.read_log(scratch, header_bytes() + data)


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_the_log_reader_on_a_damaged_real_log(scratch, mutations):
    TRIED["log"] += 1
    targets.read_log(scratch, mutate(real_log(), mutations))


MSGPACK = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TAGS = [t.__struct_config__.tag for t in c.EVENT_TYPES] if hasattr(c, "EVENT_TYPES") else ["EpochTicked"]
ENVELOPE = st.fixed_dictionaries(
    {"seq": st.one_of(st.integers(0, 3), MSGPACK), "run_id": st.sampled_from([RUN_ID, "other"]) | MSGPACK,
     "env": st.none() | st.integers(0, 2) | MSGPACK, "episode": st.none() | st.integers(0, 2),
     "ts": st.integers(0, 2**40) | MSGPACK, "schema": st.integers(0, 3), "batch_end": st.booleans() | MSGPACK,
     "event": st.one_of(MSGPACK, st.dictionaries(st.text(max_size=8), MSGPACK, max_size=4).map(
         lambda d: {"type": "EpochTicked", **d}))},
    optional={"extra": MSGPACK},
)


@FUZZ
@given(payloads=st.lists(st.one_of(ENVELOPE.map(msgspec.msgpack.encode), st.binary(min_size=1, max_size=60),
                                   MSGPACK.map(msgspec.msgpack.encode)), min_size=1, max_size=4),
       first=st.booleans())
def test_the_log_reader_on_frames_with_valid_checksums(scratch, payloads, first):
    """Past the CRC the envelope decoder and the log's rules (seq, run id, RunStarted first) judge."""
    TRIED["log"] += 1
    head = b""
    if first:
        record = msgspec.msgpack.encode({"seq": 0, "run_id": RUN_ID, "env": None, "episode": None, "ts": 1,
                                         "schema": 1, "batch_end": True, "event": msgspec.to_builtins(
                                             example(c.RunStarted)) | {"type": "RunStarted"}})
        head = frame(record)
    targets.read_log(scratch, header_bytes() + head + b"".join(frame(p) for p in payloads))


def _with_run_started(event: dict) -> bytes:
    first = {"seq": 0, "run_id": RUN_ID, "env": None, "episode": None, "ts": 1, "schema": 1, "batch_end": True,
             "event": msgspec.to_builtins(example(c.RunStarted)) | {"type": "RunStarted"}}
    second = {"seq": 1, "run_id": RUN_ID, "env": 0, "episode": 0, "ts": 1, "schema": 1, "batch_end": True,
              "event": event}
    return header_bytes() + frame(msgspec.msgpack.encode(first)) + frame(msgspec.msgpack.encode(second))


def test_an_unknown_event_tag_with_a_line_break_gives_a_one_line_error(scratch):
    """Found by the fuzzer: the tag went into the message as it was, line break included."""
    assert targets.read_log(scratch, _with_run_started({"type": "Bad\nType"})) == "UnknownEventType"


@pytest.mark.parametrize("where", ["envelope", "payload", "tag"])
def test_invalid_utf8_in_a_checksummed_frame_is_corruption(scratch, where):
    """Found by the fuzzer: msgspec reports invalid UTF-8 in a string as UnicodeDecodeError, which
    escaped the reader (exit 70 and a traceback) instead of reading as a corrupt frame."""
    event = {"type": "EpochTicked" if where != "tag" else "ZZ", "epoch": 1, "state_digest": "ZZ"}
    data = bytearray(_with_run_started(event))
    start = frames(bytes(data))[-1][0]
    payload = bytearray(data[start + FRAME_HEAD.size:])
    if where == "envelope":
        payload = payload.replace(b"\xa8" + RUN_ID.encode(), b"\xa8" + b"\xc3\x28" + RUN_ID.encode()[2:])
    else:
        payload = payload.replace(b"\xa2ZZ", b"\xa2\xc3\x28")
    data[start:] = FRAME_HEAD.pack(len(payload), zlib.crc32(payload)) + payload
    assert targets.read_log(scratch, bytes(data)) == "LogCorruptError"


def test_a_frame_length_past_the_limit_is_damage_not_a_huge_read(scratch):
    data = bytearray(real_log())
    start, _ = frames(real_log())[-1]
    struct.pack_into("<I", data, start, 2**32 - 1)
    assert targets.read_log(scratch, bytes(data)) == "ok"  # a torn tail: readers stop before it


# -- the config loader ------------------------------------------------------------------------

SECTIONS = {f.name: [g.name for g in attrs.fields(f.type)] for f in attrs.fields(RunConfig)}
KEYS = [(s, k) for s, keys in SECTIONS.items() for k in keys]
TOML_VALUE = st.recursive(
    st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return "{" + ", ".join(f'"{k}" = {toml_literal(v)}' for k, v in value.items()) + "}"


LAYER = st.dictionaries(
    st.sampled_from(list(SECTIONS)) | st.text(max_size=6),
    st.dictionaries(st.sampled_from([k for _, k in KEYS]) | st.text(max_size=8), TOML_VALUE, max_size=4)
    | TOML_VALUE,
    max_size=3,
)


def test_a_config_key_with_a_line_break_gives_a_one_line_error(scratch):
    """Found by the fuzzer: a quoted TOML key may hold a newline, which the message printed as is."""
    assert targets.load_config(scratch, b'[run]\n"ep\\nochs" = 3\n') == "ConfigError"
    assert targets.resolve_layer({"run": {"a\u2028b": 1}}) == "ConfigError"


@FUZZ
@given(data=st.binary(max_size=600))
def test_the_config_loader_on_arbitrary_bytes(scratch, data):
    TRIED["config"] += 1
    targets.load_config(scratch, data)


@FUZZ
@given(layer=LAYER)
def test_the_config_loader_on_toml_with_real_keys_and_any_values(scratch, layer):
    TRIED["config"] += 1
    lines = []
    for section, values in layer.items():
        if isinstance(values, dict):
            lines.append(f'["{section}"]')
            lines += [f'"{k}" = {toml_literal(v)}' for k, v in values.items()]
        else:
            lines.insert(0, f'"{section}" = {toml_literal(values)}')
    targets.load_config(scratch, "\n".join(lines).encode())
    TRIED["config"] += 1
    targets.resolve_layer(layer)


@FUZZ
@given(section_key=st.sampled_from(KEYS), value=st.text(max_size=20) | TOML_VALUE.map(toml_literal))
def test_set_assignments_of_any_value_to_real_keys(section_key, value):
    TRIED["config"] += 1
    targets.parse_assignment(f"{section_key[0]}.{section_key[1]}={value}")


@FUZZ
@given(text=st.text(max_size=40))
def test_set_assignments_of_any_text(text):
    TRIED["config"] += 1
    targets.parse_assignment(text)


# -- the command decoder ----------------------------------------------------------------------

COMMANDS = {t.__struct_config__.tag: t.__struct_fields__ for t in cmd.AnyCommand.__args__}


@st.composite
def command_like(draw):
    tag = draw(st.sampled_from(sorted(COMMANDS)) | st.text(max_size=8))
    fields = COMMANDS.get(tag, ())
    chosen = draw(st.lists(st.sampled_from(fields), unique=True)) if fields else []
    body = {name: draw(MSGPACK) for name in chosen}
    body.update(draw(st.dictionaries(st.text(max_size=6), MSGPACK, max_size=2)))
    if draw(st.booleans()):
        body["type"] = tag
    return msgspec.msgpack.encode(body)


@FUZZ
@given(data=st.binary(max_size=400))
def test_the_command_decoder_on_arbitrary_bytes(data):
    TRIED["command"] += 1
    targets.decode(data)


@FUZZ
@given(data=command_like())
def test_the_command_decoder_on_commands_with_wrong_fields(data):
    TRIED["command"] += 1
    targets.decode(data)


@FUZZ
@given(data=st.sampled_from([b"\xa1\xff", b"\x81\xa4type\xa3\xc3\x28\xa1", b"\xd9\x02\xed\xa0"]) | st.binary(max_size=8)
       .map(lambda b: b"\x81\xa4type\xd9" + bytes([len(b)]) + b))
def test_the_command_decoder_on_invalid_utf8(data):
    TRIED["command"] += 1
    targets.decode(data)


def test_every_command_round_trips():
    """The decoder accepts what the encoder writes, so refusals above are about the input."""
    from support import probe, run_started

    samples = [cmd.StartRun(run=run_started()), cmd.Germinate(slot="mid", blueprint="norm", probe=probe()),
               cmd.Cull(slot="mid", reason="r"), cmd.FinishRun(status="failed", final={"x": None})]
    for command in samples:
        assert cmd.decode_command(cmd.encode_command(command)) == command


# -- atheris ----------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_the_atheris_target_runs_clean_for_a_while(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), *sys.path]))
    done = subprocess.run([sys.executable, str(TESTS / "fuzz_atheris.py"), "-runs=3000", "-max_total_time=20",
                           f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_zz_report_how_many_inputs_were_tried():
    print(f"\nfuzz inputs tried: {TRIED} ({sum(TRIED.values())} in all)")
