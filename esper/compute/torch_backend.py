"""The `torch` compute backend (runtime §5.2): one env's model, optimizer and data on one device.

It decides nothing and reads no lifecycle state: the engine tells it what to build, which mode each
slot is in and what to measure, and records what it answers. Under `ddp` every rank holds one, given
a `DataParallel` that shards its data and joins its passes to the other ranks' (runtime §5.3).
"""

import copy
from contextlib import nullcontext
from typing import Any

import attrs
import torch

from esper.compute import optimizer as opt
from esper.compute.backend import EpochPlan, Evaluation, HostSummary, SeedBuild, TrainStats, ValStats
from esper.compute.blueprints import get_blueprint
from esper.compute.compiling import Compiler, compiled_pass
from esper.compute.data_parallel import DataParallel
from esper.compute.hosts import CNN_PRESETS, TRANSFORMER_PRESETS, CNNHost, TransformerHost
from esper.compute.precision import make_scaler
from esper.compute.settings import TrainSettings
from esper.compute.slot import GrowingModel
from esper.compute.streams import DATA, HOST_INIT, PROBE, generator
from esper.compute.sums import Pending, settle
from esper.compute.training import train_pass
from esper.compute.validation import Configuration, evaluate
from esper.lifecycle.config import LifecycleConfig
from esper.tasks import TaskData, eval_batches, train_batches


class TorchBackend:
    def __init__(self, task: TaskData, train: TrainSettings, lifecycle: LifecycleConfig,
                 slots: tuple[str, ...], device: torch.device, parallel: DataParallel | None = None):
        self.task, self.train, self.lifecycle, self.slot_ids = task, train, lifecycle, slots
        self.device = device
        self.parallel = parallel
        self.compiler = Compiler() if train.compile else None
        self.graphs_reported = 0
        self.data = task.to(device)
        self.model: GrowingModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.episode_seed = 0
        self.total_steps = 1
        self.step = 0
        self.seeds: dict[str, tuple[str, str]] = {}  # slot -> (blueprint, blend kind)
        self.fossils: set[str] = set()

    # -- construction ---------------------------------------------------------------------------

    def _host(self, g: torch.Generator) -> torch.nn.Module:
        spec = self.task.spec
        if spec.topology == "cnn":
            return CNNHost(CNN_PRESETS[spec.host_preset], g)
        return TransformerHost(TRANSFORMER_PRESETS[spec.host_preset], g)

    def build(self, episode_seed: int, max_epochs: int) -> HostSummary:
        self.episode_seed = episode_seed
        host = self._host(generator(episode_seed, HOST_INIT))
        self.model = GrowingModel(host, self.slot_ids).to(self.device)
        if self.compiler is not None:
            self.compiler.compile_host(self.model.host)
            self.graphs_reported = self.compiler.graphs
        self.optimizer = opt.build_optimizer(self.model.host, self.task.spec.host_optimizer)
        self.scaler = make_scaler(self.device, self.train.amp)
        self.seeds, self.fossils, self.step = {}, set(), 0
        self.total_steps = max_epochs * self._batches_per_epoch()
        return self.summary()

    def summary(self) -> HostSummary:
        host = self.model.host
        specs = tuple((s.slot_id, s.channels, tuple(s.feature_shape)) for s in host.slot_specs)
        spec = self.task.spec
        shape = (self.task.context,) if spec.topology == "transformer" else tuple(self.data.train.inputs.shape[1:])
        return HostSummary(preset=spec.host_preset, param_count=host.host_param_count(), input_shape=shape,
                           classes=spec.classes, slots=specs)

    def _batches_per_epoch(self) -> int:
        spec = self.task.spec
        if spec.steps_per_epoch:
            return spec.steps_per_epoch
        return -(-len(self.data.train) // spec.batch_size)

    def _score(self, loss: float, accuracy: float) -> float:
        return float(self.task.spec.score(loss=loss, accuracy=accuracy))

    # -- seeds ----------------------------------------------------------------------------------

    def germinate(self, slot: str, blueprint: str, blend_kind: str, init_seed: int) -> SeedBuild:
        bp = get_blueprint(self.task.spec.topology, blueprint)
        seed_slot = self.model.slots[slot]
        g = generator(init_seed)
        module = bp.build(seed_slot.channels, g)
        report = self._probe(module, slot, bp.identity_at_birth, generator(init_seed, PROBE))
        if self.compiler is not None:
            self.compiler.compile(module)  # after the probe, which would only add a batch-2 variant
        seed_slot.attach(module, blend_kind, g)
        self.seeds[slot] = (blueprint, blend_kind)
        factor = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["base_lr"]
        opt.add_seed_group(self.optimizer, slot, seed_slot.seed_parameters(), self.task.spec.seed_optimizer, factor)
        gate_params = sum(p.numel() for p in seed_slot.gate.parameters()) if seed_slot.gate is not None else 0
        return SeedBuild(shape_ok=report[0], finite=report[1], identity=report[2],
                         param_count=sum(p.numel() for p in module.parameters() if p.requires_grad),
                         blend_params=gate_params)

    def _probe(self, module: torch.nn.Module, slot: str, identity: bool, g: torch.Generator):
        """Eval mode, no grad, a random input of the slot's real feature shape (batch 2)."""
        shape = next(s.feature_shape for s in self.model.host.slot_specs if s.slot_id == slot)
        x = torch.randn((2, *shape), generator=g)
        module.eval()
        with torch.no_grad():
            y = module(x)
        module.train()
        shape_ok = y.shape == x.shape
        finite = bool(torch.isfinite(y).all())
        return shape_ok, finite, (shape_ok and bool(torch.equal(y, x))) if identity else None

    def drop(self, slot: str) -> None:
        opt.remove_group(self.optimizer, slot)
        self.model.slots[slot].drop()
        self.seeds.pop(slot, None)
        self.fossils.discard(slot)

    def set_slot(self, slot: str, mode: str, alpha: float, isolated: bool, fossil: bool) -> None:
        seed_slot = self.model.slots[slot]
        if mode in ("blend", "fused") and alpha >= 1.0 and seed_slot.gate is not None:
            opt.remove_group(self.optimizer, slot)  # the schedule and its gate are discarded
            seed_slot.discard_gate()
            opt.add_seed_group(self.optimizer, slot, seed_slot.seed_parameters(), self.task.spec.seed_optimizer,
                               self._factor())
            # Re-insert so the seed order keeps matching the optimizer's group order.
            self.seeds[slot] = (self.seeds.pop(slot)[0], "linear")
        seed_slot.set_slot(mode, alpha, isolated)
        if fossil and slot not in self.fossils:
            self.fossils.add(slot)
            if self.lifecycle.fossilized_trainable:
                opt.adopt_as_host(self.optimizer, slot, self.task.spec.host_optimizer)
            else:
                opt.remove_group(self.optimizer, slot)
                for p in seed_slot.seed_parameters():
                    p.requires_grad_(False)

    def _factor(self) -> float:
        g = self.optimizer.param_groups[0]
        return g["lr"] / g["base_lr"]

    # -- epochs ---------------------------------------------------------------------------------

    def run_epoch(self, plan: EpochPlan) -> tuple[TrainStats, ValStats]:
        """Train, then validate. Under ddp the running statistics are averaged between the two
        passes, and every measurement of the epoch is reduced in one all-reduce after validation."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        training = self._train(plan)
        if self.parallel is not None:
            self.parallel.average_running_statistics(self.model)
        train, val = settle([training, self._validation(plan.ablate, plan.shadow, plan.all_off)], self.parallel)
        if self.parallel is not None:
            self.parallel.verify(self.model, plan.epoch)
        if cuda:  # the allocator's own count: no wait for the device
            train = attrs.evolve(train, peak_memory_bytes=torch.cuda.max_memory_allocated(self.device))
        return train, val

    def _train(self, plan: EpochPlan) -> Pending:
        train = self.train
        batches = train_batches(self.data, generator(self.episode_seed, DATA, plan.epoch), self.device)
        net, parallel = None, self.parallel
        if parallel is not None:
            batches, net = parallel.shard_train(batches), parallel.wrap(self.model)

        def before_step() -> None:
            factor = opt.schedule_factor(self.step, train.lr_schedule, train.warmup_steps, self.total_steps,
                                         train.min_lr_ratio)
            opt.set_factor(self.optimizer, factor)
            self.step += 1

        with self._compiling():
            pending = train_pass(
                self.model, self.optimizer, batches, device=self.device, amp=train.amp, scaler=self.scaler,
                ratio_slots=plan.ratio_slots, incubating=plan.incubating, leak_slots=plan.leak_slots,
                stride=self.lifecycle.grad_stats_stride, eps=self.lifecycle.gradient_ratio_eps,
                grad_clip=train.grad_clip, before_step=before_step, score=self._score, net=net, collective=parallel,
            )
        graphs = self._new_graphs()

        def finish(values: list[float], world: int) -> TrainStats:
            # Read once the epoch is settled: reading it earlier would wait for the device.
            scale = self.scaler.get_scale() if self.scaler is not None else None
            return attrs.evolve(pending.finish(values, world), amp_scale=scale, recompiles=graphs)

        return Pending(pending.sums, finish)

    def _new_graphs(self) -> int | None:
        """Graphs compiled since the last pass reported them: a recompiling model shows here."""
        if self.compiler is None:
            return None
        new, self.graphs_reported = self.compiler.graphs - self.graphs_reported, self.compiler.graphs
        return new

    def _compiling(self):
        return compiled_pass() if self.compiler is not None else nullcontext()

    def _evaluate(self, split: str, configs: list[Configuration], fused: bool) -> Pending:
        batches = eval_batches(self.data, split, self.device)
        if self.parallel is not None:
            batches = self.parallel.shard_eval(batches)
        with self._compiling():
            return evaluate(self.model, batches, configs, device=self.device, amp=self.train.amp, fused=fused,
                            score=self._score)

    def validate(self, ablate: tuple[str, ...], shadow: tuple[str, ...], all_off: bool) -> ValStats:
        return settle([self._validation(ablate, shadow, all_off)], self.parallel)[0]

    def _validation(self, ablate: tuple[str, ...], shadow: tuple[str, ...], all_off: bool) -> Pending:
        configs = [Configuration("main", ())]
        configs += [Configuration(f"ablate:{s}", ((s, 0.0),)) for s in ablate]
        configs += [Configuration(f"shadow:{s}", ((s, 1.0),)) for s in shadow]
        active = tuple(s for s, slot in self.model.slots.items() if slot.mode != "inert")
        if all_off:
            configs.append(Configuration("all_off", tuple((s, 0.0) for s in active)))
        pending = self._evaluate("val", configs, self.train.fused_counterfactuals)
        graphs = self._new_graphs()

        def finish(values: list[float], world: int) -> ValStats:
            results, passes, seconds = pending.finish(values, world)
            main_only = seconds / max(1, len(configs))
            return ValStats(
                main=self._text_only(results["main"]),
                ablations={s: results[f"ablate:{s}"] for s in ablate},
                shadows={s: results[f"shadow:{s}"] for s in shadow},
                all_off=results.get("all_off"), forward_passes=passes, seconds=main_only,
                counterfactual_seconds=seconds - main_only, recompiles=graphs,
            )

        return Pending(pending.sums, finish)

    def _text_only(self, evaluation: Evaluation) -> Evaluation:
        if self.task.spec.topology == "transformer":
            return evaluation
        return Evaluation(loss=evaluation.loss, score=evaluation.score, examples=evaluation.examples)

    def test(self) -> Evaluation:
        results, _, _ = settle([self._evaluate("test", [Configuration("main", ())], False)], self.parallel)[0]
        return self._text_only(results["main"])

    # -- governor -------------------------------------------------------------------------------

    def snapshot(self, epoch: int) -> dict[str, Any]:
        """Host and fossils only: cullable seeds and optimizer state never enter a snapshot."""
        fossils = {s: _cpu(self.model.slots[s].seed.state_dict()) for s in sorted(self.fossils)}
        return {"epoch": epoch, "host": _cpu(self.model.host.state_dict()), "fossils": fossils}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.model.host.load_state_dict(snapshot["host"], strict=True)
        if set(snapshot["fossils"]) != self.fossils:
            raise RuntimeError(f"snapshot fossils {sorted(snapshot['fossils'])} != model {sorted(self.fossils)}")
        for slot, state in snapshot["fossils"].items():
            self.model.slots[slot].seed.load_state_dict(state, strict=True)
        self.reset_optimizer_state()
        self.scaler = make_scaler(self.device, self.train.amp)

    def reset_optimizer_state(self) -> None:
        self.optimizer.state.clear()

    def param_counts(self) -> tuple[int, int]:
        return self.model.host.host_param_count(), self.model.seed_param_count()

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        slots = [
            [s, bp, kind, self.model.slots[s].mode, float(self.model.slots[s].alpha), self.model.slots[s].isolated,
             s in self.fossils]
            for s, (bp, kind) in self.seeds.items()
        ]
        return {
            "episode_seed": self.episode_seed, "total_steps": self.total_steps, "step": self.step,
            "slots": slots, "model": _cpu(self.model.state_dict()),
            # A copy: the optimizer hands out its live momentum buffers.
            "optimizer": copy.deepcopy(self.optimizer.state_dict()), "groups": opt.slot_groups(self.optimizer),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the seeds, re-add their groups in the saved order, then load every tensor."""
        for slot, blueprint, kind, mode, alpha, isolated, fossil in state["slots"]:
            self.germinate(slot, blueprint, kind, 0)
            self.set_slot(slot, mode, alpha, isolated, fossil)
        order = state["groups"]
        if opt.slot_groups(self.optimizer) != order:
            raise ValueError(f"checkpoint parameter groups {order} do not match {opt.slot_groups(self.optimizer)}")
        self.model.load_state_dict(state["model"], strict=True)
        opt.load_state(self.optimizer, state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.total_steps = state["step"], state["total_steps"]

    def extend(self, max_epochs: int) -> None:
        """The episode now lasts `max_epochs` (a resume that extends it). The lr schedule reads
        (step, total_steps) afresh at each step, so the cosine stretches over the new total from the
        current step: the lr continues on the longer curve (higher than the old one had reached at
        this step) and reaches the floor at the new last epoch."""
        self.total_steps = max_epochs * self._batches_per_epoch()


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
