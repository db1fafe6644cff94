"""train(cfg): the one training loop, readable top to bottom.

Runs unchanged as one CPU process, under ``accelerate launch`` on N GPUs, or across
nodes. Each rank builds its own shard stream (split by node and worker, equal batch
counts); Accelerate wraps the model in DDP and handles precision and checkpoints.

Precision: ``train.precision`` bf16/fp16 runs the forward passes under autocast; the
methods compute logits, losses and queued keys in float32. Gradient accumulation
(``train.grad_accum`` micro-batches per optimizer step): the gradients of all micro-batches
are summed (each loss divided by the count) and synchronised once; the keys of every
micro-batch enter the queue together after the optimizer step, so no micro-batch sees
keys of its own step as queued negatives, and in-batch negatives are the micro-batch's own.
Logged every ``train.log_every`` steps besides the method's scalars: ``pairs_per_s``
(training time only), ``data_wait_share`` (the share of wall time spent waiting for the
loader: near 0 when the data path keeps up), ``mem_peak_gb`` (GPU: peak allocated;
CPU: the process's peak resident memory), ``wall_time_s`` (seconds of training since the run
began, resumed runs continuing their checkpoint's count) and ``loss_chance`` (the method's loss
at chance, ``Method.chance_loss``, mean over ranks). The ``train.alert`` rules (sslkit.alerts)
are judged on that row on the main process, which alone decides whether the run stops.
"""

from __future__ import annotations

import inspect
import logging
import os
import resource
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from sslkit import dist
from sslkit.alerts import Alerts
from sslkit.atomic import write_json, write_text
from sslkit.checkpoint import check_writable, load_checkpoint, resolve_resume, save_checkpoint
from sslkit.config import Config, ConfigError, git_sha, run_dir, to_dict, to_yaml
from sslkit.data.augment import build_views
from sslkit.data.loaders import train_loader
from sslkit.data.shardset import ShardSet, resolve_shards
from sslkit.errors import RunStopped
from sslkit.health import embedding_health
from sslkit.methods import build_method, method_class
from sslkit.optim import build_lr_schedule, build_optimizer, build_wd_schedule, set_lr, set_weight_decay
from sslkit.tracking import RunLogger, tracker_backend

log = logging.getLogger(__name__)


def resolve_precision(cfg: Config) -> str:
    """``train.precision``, with ``auto`` taken from the launcher (``accelerate launch --mixed_precision``,
    or its config file), else ``no``. Written back into ``cfg`` so the run's config.yaml records it."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision is fp16, which needs a GPU (Accelerate ignores it on the CPU); use "
                          "train.precision=bf16 or no here, or launch with --mixed_precision no.")
    cfg.train.precision = precision
    return precision


@dataclass
class _NoBufferSyncInForward(DistributedDataParallelKwargs):
    """DDP keywords with ``forward_sync_buffers``, the name torch 2.14 gave ``broadcast_buffers`` (the old
    keyword now warns). Accelerate's handler does not know the new keyword yet; its ``to_kwargs`` passes
    every field that differs from the defaults, so a subclass adds it."""

    forward_sync_buffers: Optional[bool] = None


def _ddp_kwargs() -> DistributedDataParallelKwargs:
    """No buffer broadcast before every forward: the queue and BN statistics are buffers, and
    broadcasting them every step costs and changes nothing (ranks start from the same state)."""
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        return _NoBufferSyncInForward(forward_sync_buffers=False)
    return DistributedDataParallelKwargs(broadcast_buffers=False)  # torch before 2.14


def build_accelerator(cfg: Config, *, out_dir: Path) -> Accelerator:
    # A second train() in one process (a notebook, the tests) may ask for another precision: Accelerate
    # keeps the first one's settings unless reset. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # without this, CPU ranks under a launcher run alone
        mixed_precision=resolve_precision(cfg),
        log_with=tracker_backend(cfg.tracker),
        project_dir=str(out_dir),
        # Each rank streams its own shards: never let Accelerate dispatch or split our batches.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
    )
    # Set after construction: Accelerate looks kwargs handlers up by exact class, and prepare() reads this.
    accelerator.ddp_handler = _ddp_kwargs()
    return accelerator


def batch_stream(shards: ShardSet, cfg: Config, *, batches_per_epoch: int, start: int) -> Iterator[dict[str, Any]]:
    """Batches from micro-batch index ``start`` on; epoch e is seeded by (seed, e), so a resumed
    run sees the batches a straight run would (the skipped part of the epoch is decoded and dropped).
    With the tensor back-end the batches hold uint8 ``image``s; the method's ``prepare`` turns them into its inputs.
    One loader for the whole run: its workers persist, and each pass over it is the next epoch."""
    views = build_views(cfg.data.views, size=cfg.data.size, channels=cfg.data.channels) \
        if cfg.data.views.backend == "pil" else None
    epoch, skip = divmod(start, batches_per_epoch)
    loader = train_loader(shards, cfg.data, views=views, seed=cfg.run.seed,
                          steps_per_epoch=batches_per_epoch, epoch=epoch)
    while True:
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        skip = 0


class _Inputs:
    """The method's ``prepare``: the loader's batch on the device -> the method's inputs (views,
    composites, ...). Micro-batch i on rank r draws from a generator seeded by (seed, r, i), so
    a resumed run makes the inputs a straight run would, and ranks differ."""

    def __init__(self, method: torch.nn.Module, cfg: Config, device: torch.device) -> None:
        self.prepare = method.prepare
        self.seed, self.rank = cfg.run.seed, dist.rank()
        self.generator = torch.Generator(device=device)

    def __call__(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
        self.generator.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + index) % 2**63)
        return self.prepare(batch, self.generator)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for name, value in batch.items()}


def _channels_last(batch: dict[str, Any]) -> dict[str, Any]:
    return {name: value.contiguous(memory_format=torch.channels_last) if torch.is_tensor(value) and value.ndim == 4
            else value for name, value in batch.items()}


def resolve_from_data(cfg: Config, shards: ShardSet, *, batches_per_epoch: int) -> int:
    """Fill in what the shards decide, in place (the run's config.yaml records the result):
    ``train.max_steps`` from ``train.epochs`` and ``method.num_classes`` from the manifest.
    Returns optimizer steps per epoch."""
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.grad_accum)
    if cfg.train.epochs > 0:
        cfg.train.max_steps = cfg.train.epochs * steps_per_epoch
    if method_class(cfg.method.name).needs_class_count and cfg.method.num_classes == 0:
        if not shards.classes:
            raise ConfigError(f"Method '{cfg.method.name}' needs the number of classes, and the manifest of "
                              f"'{cfg.data.shards}' names none; set method.num_classes.")
        cfg.method.num_classes = len(shards.classes)
    return steps_per_epoch


def milestones_in_epochs(cfg: Config) -> bool:
    unit = cfg.optim.milestone_unit
    return unit == "epochs" or (unit == "auto" and cfg.train.epochs > 0)


def _build_model(cfg: Config, accelerator: Accelerator, *, init: bool) -> torch.nn.Module:
    """The method, laid out and (optionally) synchronised across ranks and compiled, before DDP wraps it.
    ``init``: load the first weights the config names (a new run; a resumed one loads its checkpoint)."""
    model = build_method(cfg, init=init)
    if cfg.model.sync_bn:
        if accelerator.device.type != "cuda":
            raise ConfigError("model.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); on CPU set "
                              "model.sync_bn=false and, for ccrl or supcam, method.shuffle_bn=true.")
        if accelerator.num_processes > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()  # in place: state_dict keys, checkpoints and export stay as they are
    return model


def _record_init(accelerator: Accelerator, model: torch.nn.Module, out_dir: Path) -> None:
    """Say where a new run's backbone weights came from, and keep the key report as ``init.json``."""
    report = getattr(model, "init_report", None)
    if report is None:
        return
    accelerator.print(f"Backbone initialised from {report['key']}={report['source']}: {report['loaded']} of "
                      f"{report['of']} tensors (key report in init.json).")
    if accelerator.is_main_process:
        write_json(out_dir / "init.json", report)


class _Meter:
    """Throughput, the share of wall time spent waiting for data, and peak memory between two logs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def pause(self, seconds: float) -> None:
        """Leave out time that is neither training nor loading (online evaluation)."""
        self.start += seconds

    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        return batch

    def read(self, *, pairs_per_step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:  # ru_maxrss is in KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"pairs_per_s": self.steps * pairs_per_step / elapsed, "data_wait_share": self.wait / elapsed,
                "mem_peak_gb": peak}


@dataclass
class _Session:
    """What one training run holds between its steps."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (possibly DDP-wrapped): what forward and backward run
    method: torch.nn.Module  # the unwrapped method: its hooks, checkpoints and evaluation
    optimizer: torch.optim.Optimizer
    lrs: Any  # learning rate of every optimizer step
    wds: Any  # weight decay of every optimizer step (None: optim.weight_decay throughout)
    tracker: RunLogger
    batches_per_epoch: int
    ckpt_root: Path
    step: int
    data_faults: dict[str, Any]  # the bad-data counts of the checkpoint resumed from (empty for a new run)
    started: float  # time.perf_counter() at which the run, with the time its checkpoint had trained, began
    alerts: Alerts  # the train.alert rules, judged on the main process

    def wall_time(self) -> float:
        """Seconds of training so far, the resumed checkpoint's included (not the time between)."""
        return time.perf_counter() - self.started


def _open_shards(cfg: Config) -> ShardSet:
    """The training shards, resolved before any file is written (a missing or bad set fails first)."""
    shards = resolve_shards(cfg.data.shards, manifest=cfg.data.manifest,
                            skip_missing=True)  # a few missing shards count as bad data (data.max_bad_fraction)
    if shards.num_samples is None:
        raise ConfigError(f"Shards at '{cfg.data.shards}' have no manifest.json with num_samples; "
                          "write one with `sslkit shard ...` or point data.manifest at it.")
    return shards


def _start(cfg: Config, shards: ShardSet, out_dir: Path) -> _Session:
    """Accelerator, model, optimizer and schedule, resumed from the newest checkpoint if any; the
    tracker started and config.yaml written."""
    accelerator = build_accelerator(cfg, out_dir=out_dir)
    set_seed(cfg.run.seed)  # identical initial weights on every rank
    batches_per_epoch = max(1, shards.num_samples // (cfg.data.batch_size * accelerator.num_processes))
    requested_steps = cfg.train.max_steps
    steps_per_epoch = resolve_from_data(cfg, shards, batches_per_epoch=batches_per_epoch)

    ckpt_root = out_dir / "checkpoints"
    resume_from = resolve_resume(cfg.run.resume, root=ckpt_root)
    model = _build_model(cfg, accelerator, init=resume_from is None)
    _record_init(accelerator, model, out_dir)
    model.set_run_length(cfg.train.max_steps, steps_per_epoch)
    optimizer = build_optimizer(cfg.optim, model=model)
    lrs = build_lr_schedule(cfg.optim, total_steps=cfg.train.max_steps,
                            steps_per_epoch=steps_per_epoch if milestones_in_epochs(cfg) else None)
    wds = build_wd_schedule(cfg.optim, total_steps=cfg.train.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state: dict[str, Any] = {"step": 0, "run_id": None}
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        accelerator.print(f"Resuming from {resume_from} at step {state['step']}.")
    if cfg.train.epochs and cfg.train.max_steps != requested_steps:
        accelerator.print(f"train.epochs={cfg.train.epochs} x {steps_per_epoch} steps per epoch: training "
                          f"{cfg.train.max_steps} steps (train.max_steps={requested_steps} is not used; "
                          "set train.epochs=0 to use it).")
    tracker = RunLogger(accelerator, cfg, run_dir=out_dir, run_id=state.get("run_id"))
    tracker.start()
    if accelerator.is_main_process:
        write_text(out_dir / "config.yaml", f"# git: {git_sha() or 'unknown'}\n" + to_yaml(cfg))
    faults = state.get("data_faults", {})
    return _Session(cfg, accelerator, model, accelerator.unwrap_model(model), optimizer, lrs, wds, tracker,
                    batches_per_epoch, ckpt_root, int(state["step"]), faults,
                    time.perf_counter() - float(state.get("wall_time_s", 0.0)),
                    Alerts(cfg.train.alert, step=int(state["step"]), skipped=int(faults.get("skipped_steps", 0))))


def _optimizer_step(s: _Session, batches: Iterator[dict[str, Any]], make_inputs: _Inputs, meter: _Meter,
                    guard: _Guard) -> tuple[Any, torch.Tensor]:
    """One optimizer step over ``train.grad_accum`` micro-batches; a step with a non-finite loss or
    gradient is skipped (the schedule and the data move on). Returns the last micro-batch's output and
    the gradient norm."""
    cfg, accelerator, model, step = s.cfg, s.accelerator, s.model, s.step
    accum = cfg.train.grad_accum
    set_lr(s.optimizer, float(s.lrs[step]))
    if s.wds is not None:
        set_weight_decay(s.optimizer, float(s.wds[step]))
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    for micro in range(accum):
        batch = guard.count(meter.next_batch(batches))
        batch = make_inputs(_to_device(batch, accelerator.device), step * accum + micro)
        if cfg.model.channels_last:
            batch = _channels_last(batch)
        sync = nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
        with sync:
            out = model(batch)
            accelerator.backward(out.loss / accum)
        finite &= torch.isfinite(out.loss.detach())
    grad_norm = _grad_norm(accelerator, model, clip=cfg.optim.grad_clip)
    # Without a loss scaler a non-finite gradient is ours to skip. With fp16's scaler it is the scaler's:
    # it skips that step itself and lowers the scale, so only the loss is checked here.
    if accelerator.scaler is None:
        finite &= torch.isfinite(grad_norm)
    ok = guard.step_ok(finite, step=step + 1, loss=out.loss, grad_norm=grad_norm)
    if not ok:
        s.tracker.log({"skipped_steps": guard.skipped}, step=step + 1)
    apply_step(s.optimizer, s.method, step=step, ok=ok)
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    meter.steps += 1
    return out, grad_norm


def _log_step(s: _Session, out: Any, grad_norm: torch.Tensor, meter: _Meter, guard: _Guard,
              progress: tqdm) -> None:
    """Loss (mean over ranks), learning rate, gradient norm, throughput, data faults and the health/
    signals of this step (from this rank's batch: sslkit.health)."""
    cfg, step = s.cfg, s.step
    pairs_per_step = cfg.train.grad_accum * cfg.data.batch_size * s.accelerator.num_processes
    loss, chance = _mean_over_ranks(s.accelerator, out.loss, s.method.chance_loss())
    logs = {**{k: float(v) for k, v in out.logs.items()}, "loss": loss, "lr": float(s.lrs[step - 1]),
            "grad_norm": float(grad_norm), **meter.read(pairs_per_step=pairs_per_step), **guard.data_logs(),
            **(embedding_health(*out.views) if out.views is not None else {}), **s.method.health(),
            **({"loss_chance": chance} if chance is not None else {}), "wall_time_s": s.wall_time()}
    s.tracker.log(logs, step=step)
    progress.set_postfix(loss=f"{loss:.3f}", pairs_s=f"{logs['pairs_per_s']:.0f}")
    meter.reset()
    _judge(s, logs, guard)


def _mean_over_ranks(accelerator: Accelerator, loss: torch.Tensor, chance: Optional[float]
                     ) -> tuple[float, Optional[float]]:
    """The step's loss and chance loss (None: the method has none, on every rank), averaged over ranks
    in one reduction."""
    values = loss.detach().float().reshape(1)
    if chance is not None:
        values = torch.cat([values, torch.tensor([chance], dtype=values.dtype, device=values.device)])
    values = accelerator.reduce(values, reduction="mean").tolist()
    return values[0], (values[1] if chance is not None else None)


def _judge(s: _Session, logs: dict[str, Any], guard: _Guard) -> None:
    """The alert rules on this logged row. Only the main process judges (it holds the row it logged,
    health/ from its own batch); with ``train.alert.action=stop`` every rank receives its verdict
    and all raise RunStopped together, so no rank waits in a collective for one that stopped."""
    fired = s.alerts.update(s.step, logs, skipped=guard.skipped) if s.accelerator.is_main_process else []
    for alert in fired:
        s.tracker.alert(alert)
    if s.cfg.train.alert.action != "stop":
        return
    message = dist.broadcast_object(fired[0].message if fired else None)
    if message is not None:
        raise RunStopped(f"{message.rstrip('.')}; stopped at step {s.step} by train.alert.action=stop "
                         "(train.alert.action=warn only warns): the checkpoints saved before are intact.")


def _save(s: _Session, guard: _Guard) -> None:
    state = {"step": s.step, "run_id": s.tracker.run_id, "world_size": s.accelerator.num_processes,
             "config": to_dict(s.cfg), "git": git_sha(), "data_faults": guard.state(), "wall_time_s": s.wall_time()}
    save_checkpoint(s.accelerator, root=s.ckpt_root, state=state, keep=s.cfg.train.keep_ckpts)


def train(cfg: Config) -> Path:
    """Pretrain ``cfg.method.name`` for ``cfg.train.max_steps`` optimizer steps; returns the run directory."""
    out_dir = run_dir(cfg)
    shards = _open_shards(cfg)
    check_writable(out_dir)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    s = _start(cfg, shards, out_dir)
    try:
        _train_steps(s, shards)
    except RunStopped:
        s.tracker.finish(stopped=True)  # the tracker keeps the rows and the alert that stopped the run
        raise
    _check_replicas(s.method, s.tracker, step=s.step)
    s.tracker.finish()
    s.accelerator.wait_for_everyone()
    return out_dir


def _train_steps(s: _Session, shards: ShardSet) -> None:
    """Steps from ``s.step`` to ``train.max_steps``: logging, online evaluation and checkpoints on their schedules."""
    cfg = s.cfg
    batches = batch_stream(shards, cfg, batches_per_epoch=s.batches_per_epoch, start=s.step * cfg.train.grad_accum)
    make_inputs = _Inputs(s.method, cfg, s.accelerator.device)
    online = None
    if cfg.train.eval_every:
        from sslkit.evaluate.online import OnlineEval  # faiss is imported only for evaluation

        online = OnlineEval(cfg, device=s.accelerator.device)
    progress = tqdm(total=cfg.train.max_steps, initial=s.step, desc=cfg.method.name, unit="step",
                    disable=not s.accelerator.is_local_main_process, dynamic_ncols=True)
    s.model.train()
    meter, guard = _Meter(s.accelerator.device), _Guard(cfg, s.accelerator)
    guard.restore(s.data_faults)
    last = cfg.train.max_steps
    try:
        guard.missing(shards)
        while s.step < last:
            out, grad_norm = _optimizer_step(s, batches, make_inputs, meter, guard)
            progress.update(1)
            if s.step % cfg.train.log_every == 0 or s.step == last:
                _log_step(s, out, grad_norm, meter, guard, progress)
            if online is not None and (s.step % cfg.train.eval_every == 0 or s.step == last):
                scores = online(s.method)
                s.tracker.log(scores, step=s.step)
                meter.pause(scores.get("online/seconds", 0.0))  # throughput counts training time only
            if s.step % cfg.train.ckpt_every == 0 or s.step == last:
                _save(s, guard)
    finally:
        progress.close()


def apply_step(optimizer: torch.optim.Optimizer, method: torch.nn.Module, *, step: int, ok: bool) -> bool:
    """Update the weights, then the method's momentum encoder and queue, when ``ok``; True when that happened.

    Otherwise, and when fp16's loss scaler (``optimizer.scaler``, accelerate's wrapper) itself skips the
    update for inf gradients, neither happens and the method drops the keys it staged. A step the engine
    skips under fp16 backs the loss scale off and clears what the scaler recorded (gradient clipping
    unscales), as the scaler's own skip would: without that the next step's unscale fails."""
    scaler = getattr(optimizer, "scaler", None)
    if ok:
        getattr(method, "before_optimizer_step", lambda step: None)(step)
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):  # accelerate's flag for the scaler's skip
            method.after_optimizer_step(step)
            return True
    elif scaler is not None:
        scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
    getattr(method, "skip_step", lambda: None)()
    return False


def _grad_norm(accelerator: Accelerator, model: torch.nn.Module, *, clip: Optional[float]) -> torch.Tensor:
    """The total gradient norm (clipped to ``clip`` when set); 0 under fp16 without clipping (its loss scaler
    checks the gradients itself)."""
    if clip:
        return torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), clip))
    if accelerator.scaler is not None:
        return torch.zeros((), device=accelerator.device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)


class _Guard:
    """What training skipped and when to give up: corrupt samples and shards (all ranks together, against
    ``data.max_bad_fraction`` of what was read, once at least ten global batches were read) and steps with
    a non-finite loss or gradient (``train.max_bad_steps`` in a row)."""

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.corrupt, self.read = 0, 0  # this rank's
        self.skipped, self.in_a_row = 0, 0  # steps, the same on every rank
        self.resumed = False
        self.judge_after = 10 * cfg.data.batch_size * accelerator.num_processes

    def count(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.corrupt += int(batch.pop("corrupt", 0))
        self.read += len(batch["label"]) if "label" in batch else self.cfg.data.batch_size
        return batch

    def totals(self) -> tuple[float, float]:
        """(corrupt, read) summed over ranks; every rank must call this."""
        counts = torch.tensor([self.corrupt, self.read], dtype=torch.float64, device=self.accelerator.device)
        return tuple(self.accelerator.reduce(counts, reduction="sum").tolist())

    def state(self) -> dict[str, float]:
        """What a checkpoint keeps, so the counts of a resumed run continue; every rank must call this."""
        corrupt, read = self.totals()
        return {"corrupt_samples": corrupt, "samples_read": read, "skipped_steps": self.skipped}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the counts of the checkpoint's run (held by rank 0, so the sums over ranks stay right)."""
        self.skipped, self.resumed = int(state.get("skipped_steps", 0)), bool(state)
        if self.accelerator.is_main_process:
            self.corrupt, self.read = int(state.get("corrupt_samples", 0)), int(state.get("samples_read", 0))

    def missing(self, shards: ShardSet) -> None:
        """Shards the manifest lists but that are gone count as bad data; too many stop the run now."""
        if not shards.missing:
            return
        share = shards.missing_samples / max(shards.missing_samples + (shards.num_samples or 0), 1)
        if share > self.cfg.data.max_bad_fraction:
            raise RunStopped(
                f"{len(shards.missing)} shards of '{self.cfg.data.shards}' are missing ({shards.missing[0]} first), "
                f"{shards.missing_samples} samples or {share:.1%} of the set, above data.max_bad_fraction="
                f"{self.cfg.data.max_bad_fraction}; restore them, or raise data.max_bad_fraction to train on the rest.")
        if self.accelerator.is_main_process and not self.resumed:  # a resumed run's count holds them already
            self.corrupt += shards.missing_samples

    def data_logs(self) -> dict[str, float]:
        """All ranks' ``corrupt_samples`` and their share of what was read; raises RunStopped past the limit."""
        corrupt, read = self.totals()
        share = corrupt / max(corrupt + read, 1.0)
        if corrupt + read >= self.judge_after and share > self.cfg.data.max_bad_fraction:
            raise RunStopped(
                f"{int(corrupt)} corrupt or unreadable samples and shards against {int(read)} good samples "
                f"({share:.1%}, above data.max_bad_fraction={self.cfg.data.max_bad_fraction}) in "
                f"'{self.cfg.data.shards}'; the warnings above name them: check the shards with `sslkit shard "
                "verify`, or raise data.max_bad_fraction to train on the rest. The last checkpoint is intact.")
        return {"corrupt_samples": corrupt, "bad_fraction": share}

    def step_ok(self, ok: torch.Tensor, *, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether every rank's loss and the gradients were finite; counts and stops on repeated failures."""
        if dist.all_true(ok):
            self.in_a_row = 0
            return True
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        loss, grad_norm = float(loss.detach()), float(grad_norm)
        log.warning("Step %d skipped: loss %s, gradient norm %s (non-finite on some rank).", step, loss, grad_norm)
        if self.in_a_row >= self.cfg.train.max_bad_steps:
            cause = ("bf16/fp16 overflow is likely: try train.precision=no, " if self.cfg.train.precision != "no"
                     else "")
            raise RunStopped(
                f"Steps {step - self.in_a_row + 1} to {step} all gave a non-finite loss or gradient "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps} in a row; last loss {loss}, gradient "
                f"norm {grad_norm}); {cause}lower optim.lr (now {self.cfg.optim.lr}) or set optim.grad_clip, "
                "and resume: the last checkpoint is intact.")
        return False


def _check_replicas(method: torch.nn.Module, tracker: RunLogger, *, step: int) -> None:
    """Every rank must end with the same weights and queue (DDP keeps them in step); say so, or shout."""
    if dist.world_size() == 1:
        return
    digests = dist.gather_objects(dist.replica_digest(method))
    agree = len(set(digests)) == 1
    tracker.log({"replicas_identical": float(agree), "replicas": float(len(digests))}, step=step)
    if not agree:
        log.error("The %d ranks ended with different weights (digests %s): the run is not a valid data-parallel "
                  "run; check that every rank ran the same sslkit version and config.", len(digests), digests)
