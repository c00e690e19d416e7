"""The `RunStarted` payload: what a run was, recorded once at seq 0."""

import os
import platform
import socket
import sys
from datetime import datetime, timezone
from typing import Any

import msgspec
import torch

from esper import __version__
from esper.compute.backend import HostSummary
from esper.compute.blueprints import catalogue
from esper.events import catalogue as ev
from esper.events.envelope import LOG_FORMAT


def run_started(*, config: dict[str, Any], config_hash: str, seed: int, device: str, deterministic: bool,
                threads: int, task: str, topology: str, host: HostSummary, enabled: tuple[str, ...],
                score_kind: str, data_digest: str | None, n_envs: int = 1, world_size: int = 1,
                forked_from: ev.ForkOrigin | None = None) -> ev.RunStarted:
    slots = tuple(ev.SlotInfo(slot_id=s, channels=c, feature_shape=shape, enabled=s in enabled)
                  for s, c, shape in host.slots)
    entries = tuple(
        ev.CatalogueEntry(name=bp.name, identity_at_birth=bp.identity_at_birth,
                          params={s: bp.param_count(c) for s, c, _ in host.slots})
        for bp in catalogue(topology)
    )
    return ev.RunStarted(
        config=config, seed=seed, esper_version=__version__, torch_version=str(torch.__version__),
        python_version=platform.python_version(), msgspec_version=msgspec.__version__,
        platform=f"{sys.platform}-{platform.machine()}", device=device, deterministic=deterministic,
        num_threads=threads, task=task, topology=topology,
        host=ev.HostInfo(preset=host.preset, param_count=host.param_count, input_shape=host.input_shape,
                         classes=host.classes),
        slots=slots, catalogue=entries, n_envs=n_envs, world_size=world_size, score_kind=score_kind,
        config_hash=config_hash, data_digest=data_digest, log_format=LOG_FORMAT, forked_from=forked_from,
        started_at=datetime.now(timezone.utc).isoformat(), hostname=socket.gethostname(), pid=os.getpid(),
    )
