"""The training loop: SGD, ABS and ABSA on one process or on a fixed-size Horovod world.

The loop, with its events (E = epochs, G = global batch, b = micro-batch, W = world size):

    setup:    validate config; check out dir; load data; build model (same seed on all ranks);
              broadcast model + optimizer state from rank 0
    for epoch in [start_epoch, E):
        adv_ratio = adv.ratio(epoch)                 # ABSA only; 0 for sgd/abs
        while sampler has a full global batch G:     # short last batch skipped
            lr = lr_schedule.at(controller, epoch, epoch fraction after this batch)
            for micro-batch m of this rank (layout(G, b, W)):   # accumulation steps
                crop/flip m's images (--augment; drawn per sample from seed, epoch, index)
                replace the first round(adv_ratio * |m|) samples of m by FGSM inputs (eval mode,
                    on the BatchNorm statistics of the update's start: the same on any world size)
                (sum of losses over m / G).backward()      # grads accumulate locally
            grads + [loss_sum, correct, count] (+ BatchNorm running-statistics terms, W > 1:
                hvd_abs/running_stats.py) -> comm.allreduce_sum (one fused call)
            optimizer.step(); sampler.advance(G); updates += 1      [EVENT: update_end]
        broadcast buffers from rank 0   # the same already, but for momentum=None BatchNorm
        if abs/absa and controller not at the cap:
            eig = top Hessian eigenvalue on eig_samples training samples
                  (drawn from (seed, epoch); sharded over ranks by the second-order engine)
        evaluate on the test split, each rank its shard, sums allreduced
        write the epoch line to metrics.jsonl          [EVENT: epoch_logged]
        decision = controller.check(eig, epoch)
        if decision.grew: adv.on_growth(...); write a `growth` line   [EVENT: growth]
        sampler.new_epoch()                            [EVENT: epoch_end]
    summary                                            [EVENT: fit_end]

Callbacks (training/events.py) get each event; checkpoints, elastic commits, progress and
time limits are callbacks (training/callbacks.py, elastic/job.py), not part of this loop.

Everything a resize or a restore needs is in `Trainer.state_dict()` (model, optimizer, controller,
adversarial schedule, sampler cursor, counters); none of it depends on the world size, and the LR,
the layout and this rank's samples are recomputed from it at every step.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hvd_abs.adversarial import AdversarialSchedule
from hvd_abs.augment import Augmenter
from hvd_abs.batching.controller import BatchController
from hvd_abs.batching.layout import layout
from hvd_abs.batching.noise_scale import epoch_noise_scale, sq_grad_norm
from hvd_abs.batching.lr import LRSchedule
from hvd_abs.comm import LocalComm, worker_device
from hvd_abs.metrics import MetricsWriter
from hvd_abs.precision import forward_model, grad_scaler
from hvd_abs.running_stats import RunningStats, frozen_stats, running_buffers
from hvd_abs.sampling import EpochSampler, rank_micro_batches
from hvd_abs.training.checkpoint import to_host
from hvd_abs.training.config import TrainConfig
from hvd_abs.training.curvature import Curvature, EigenFn
from hvd_abs.training.events import Callback, Event, fire
from hvd_abs.training.grad_exchange import GradientExchange
from hvd_abs.training.inputs import Inputs
from hvd_abs.training.optimizers import make_optimizer
from hvd_abs.training.resume import resume_trainer, saved_config
from hvd_abs.training.run_data import data_id, run_data
from hvd_abs.training.summary import run_summary
from hvd_abs.training.outputs import LocalOutputs
from hvd_abs.training.user_model import check_model_fits, make_model


class StopRequested(Exception):
    """Raised by a callback to leave the loop as at the end of the run (--stop-at-update)."""


def _new_epoch_clock(samples_seen: int) -> dict[str, Any]:
    return {"start": None, "train_s": 0.0, "samples0": samples_seen, "world": None}


class Trainer:
    """One training job (see the module docstring). `comm` defaults to one process."""

    def __init__(self, cfg: TrainConfig, comm: Any = None, eigen_fn: EigenFn | None = None,
                 data: Any = None, model: nn.Module | Callable[[], nn.Module] | None = None,
                 broadcast: bool = True, callbacks: Sequence[Callback] = ()) -> None:
        """data: a `hvd_abs.data.Splits` (default: cfg.dataset, loaded). model: a module, or a
        function making one, called after seeding with cfg.seed (default: cfg.model, built).
        callbacks: run at each event, in this order (more may be appended to self.callbacks)."""
        cfg.validate()
        self.cfg = cfg
        self.comm = comm if comm is not None else LocalComm()
        self.device = worker_device(cfg.device, self.comm.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # also for what allocates on "cuda" (extension, Horovod)

        self.dataset_name = cfg.dataset if data is None else data.name
        self.own_model = model is not None
        self.data = run_data(cfg, data)
        n_train = int(self.data.train_y.shape[0])
        model, self.model_name = make_model(cfg, self.data, model)
        self.model = model.to(self.device)
        if self.own_model:
            check_model_fits(self.model, self.data, self.device)
        # The training and test forward passes (bf16: under autocast); the Hessian's use self.model.
        self.forward = forward_model(self.model, cfg.precision, self.device)
        self.scaler = grad_scaler(cfg.precision, self.device)  # (fp16's loss scaling; else a pass-through)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)

        adaptive = cfg.method != "sgd"
        self.controller = BatchController(cfg.initial_batch, cfg.max_batch if adaptive else cfg.initial_batch,
                                          cfg.duration, trigger=cfg.growth_trigger)
        self.lr_schedule = LRSchedule(cfg.lr, cfg.lr_decay, cfg.decay_epochs(), cfg.lr_scaling,
                                      cfg.warmup_epochs, cfg.lr_cap, cfg.lr_schedule, cfg.epochs)
        self.adv = AdversarialSchedule(cfg.adv_ratio if cfg.method == "absa" else 0.0, cfg.adv_eps, cfg.epochs,
                                       at_max=self.controller.at_max)
        self.sampler = EpochSampler(int(self.data.train_y.shape[0]), cfg.seed)
        self.inputs = Inputs(self.data, cfg, self.device, cfg.seed)
        self.curvature = Curvature(cfg, self.inputs, self.data.train_y, self.device, eigen_fn)
        self.augment = Augmenter(cfg.augment, cfg.seed, n_train, tuple(self.data.train_x.shape[1:]),
                                 streamed=self.inputs.image_files)
        self.data_id = data_id(self.data)
        self.updates = 0
        self.samples_seen = 0
        self.elapsed_s = 0.0
        self.second_order_total_s = 0.0
        self.history: list[dict[str, Any]] = []  # epoch lines so far (rank 0's summary)
        self.checkpoints: Any = LocalOutputs(cfg.out)  # where save_checkpoint writes (a session's outputs)
        self.growths: list[dict[str, Any]] = []
        # loss_sum, correct, count (global) of the epoch so far. Kept on the device and read once
        # an epoch: reading it every update would stop a GPU's queue from running ahead of Python.
        # loss sum, correct, count; micro-batch 0's squared gradient norms and their count; the
        # global batch's and theirs (the noise scale's inputs, gns trigger only)
        self._epoch_sums = torch.zeros(7, dtype=torch.float64, device=self.device)
        # The epoch so far, also across an elastic reset, which re-enters run_epoch mid-epoch:
        # its start (wall clock, so a reset's stall counts), seconds spent training, samples_seen
        # at its start, and the world size of its latest update.
        self._epoch_clock: dict[str, Any] = _new_epoch_clock(self.samples_seen)
        self._bn_stats: RunningStats | None = None  # made when the world has more than one rank
        self._grad_exchange: GradientExchange | None = None  # likewise
        self._bn_buffers: list[torch.Tensor] | None = None  # BatchNorm running stats, for ABSA's FGSM
        # The growth check skipped after the run's last epoch ({eig, epoch}), for a --resume that
        # extends the run (see fit).
        self._pending_check: dict[str, Any] | None = None
        self.callbacks: list[Callback] = list(callbacks)
        # This rank's micro-batches of the latest update and its epoch (for callbacks that log them).
        self.last_micros: list[torch.Tensor] = []
        self.last_step_epoch = 0
        self.set_threads()

        if broadcast:  # elastic jobs sync from rank 0 inside the elastic loop instead
            self.comm.broadcast_state(self.model, self.optimizer)

    def fire(self, event: Event, **payload: Any) -> None:
        """Run `event` on every callback, in order."""
        fire(self.callbacks, event, self, **payload)

    def set_threads(self) -> None:
        """torch threads for this rank; called again after an elastic resize."""
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        elif self.comm.size > 1:
            # Workers on one machine share its cores: oversubscription makes every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // getattr(self.comm, "workers_here", self.comm.size)))

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue, independent of the world size.

        Like torch's own state dicts it holds references to live tensors: deep-copy it to snapshot.
        """
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "adversarial": self.adv.state_dict(), "sampler": self.sampler.state_dict(),
                "updates": self.updates, "samples_seen": self.samples_seen, "elapsed_s": self.elapsed_s,
                "second_order_total_s": self.second_order_total_s,
                "epoch_sums": self._epoch_sums.tolist(), "epoch_clock": dict(self._epoch_clock),
                "history": list(self.history), "growths": list(self.growths),
                "pending_check": dict(self._pending_check) if self._pending_check else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # (fp16 only; none in checkpoints from before it)
            self.scaler.load_state_dict(state["scaler"])
        self.controller.load_state_dict(state["controller"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.adv.load_state_dict(state["adversarial"])
        self.sampler.load_state_dict(state["sampler"])
        self.updates = int(state["updates"])
        self.samples_seen = int(state["samples_seen"])
        self.elapsed_s = float(state["elapsed_s"])
        self.second_order_total_s = float(state["second_order_total_s"])
        sums = list(state["epoch_sums"]) + [0.0] * 4  # (a checkpoint from before the noise scale: 3)
        self._epoch_sums = torch.tensor(sums[:7], dtype=torch.float64, device=self.device)
        # (Checkpoints from before the clock was kept: the epoch's clock starts now.)
        self._epoch_clock = dict(state.get("epoch_clock") or _new_epoch_clock(self.samples_seen))
        self.history = list(state["history"])
        self.growths = list(state["growths"])
        # (Checkpoints from before it was kept: an extended run skips that one check, as it did.)
        self._pending_check = state.get("pending_check")

    # --- derived quantities ------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def current_lr(self, epoch_fraction: float | None = None) -> float:
        """LR for the next update: a function of the controller state and the epoch progress."""
        frac = self.sampler.epoch_fraction if epoch_fraction is None else epoch_fraction
        return self.lr_schedule.at(self.controller, self.epoch, frac)

    # --- one update --------------------------------------------------------------------------------
    def step(self) -> bool:
        """One parameter update on the next global batch; False (nothing done) at the epoch's end."""
        G = self.controller.global_batch
        idx = self.sampler.next_indices(G)
        if idx is None:
            return False
        lay = layout(G, self.cfg.base_batch, self.comm.size)
        # LR at the end of this batch's share of the epoch: a warm-up never starts at exactly 0.
        lr = self.current_lr((self.sampler.position + G) / self.sampler.num_samples)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # None, not zeros: backward then takes each gradient as it is instead of adding it to a
        # zeroed tensor: 2 kernels a parameter less (118 for ResNet-20), and a GPU update of a
        # model this small is bound by kernel launches.
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        # loss_sum, correct, count on this rank, kept on the device: reading them per micro-batch
        # (.item()) would stall a GPU at every micro-batch (128 stalls per update at G = 16384).
        # (+ for the gns trigger: micro-batch 0's squared gradient norm and 1, on rank 0)
        stats = torch.zeros(5, dtype=torch.float64, device=self.device)
        micros = rank_micro_batches(idx, lay, self.comm.rank)
        ids = lay.micro_ids_for(self.comm.rank)  # their indices j in the update (0..K-1)
        bn = self._running_stats()
        if bn is not None:
            bn.begin(lay.num_micro)
        # FGSM runs in eval mode, on the running statistics: those of the update's start, which
        # every rank holds (within the update a rank has only its own micro-batches' updates).
        adv_stats = None
        if self.adv.ratio(self.epoch) > 0:
            if self._bn_buffers is None:
                self._bn_buffers = running_buffers(self.model)
            adv_stats = torch._foreach_mul(self._bn_buffers, 1.0) if self._bn_buffers else None
        self.last_micros, self.last_step_epoch = micros, self.epoch
        exchange = self._exchange()
        sent = None
        to_sum = lambda: [stats, *([bn.payload()] if bn is not None else [])]  # noqa: E731 (summed over ranks)
        # The noise scale's small batch is micro-batch 0 (rank 0's first, at any world size).
        measure = self.controller.needs_noise_scale and lay.num_micro >= 2
        scaled = self.scaler.is_enabled()  # fp16: losses are scaled before backward (FGSM's too: its sign stays)
        criterion = (lambda out, t: self.scaler.scale(F.cross_entropy(out, t))) if scaled else F.cross_entropy
        upcoming = lambda: self.sampler.upcoming(G, self.cfg.base_batch, self.comm.size, self.comm.rank)  # noqa: E731
        for n, (j, micro) in enumerate(zip(ids, micros)):
            if bn is not None:
                bn.before(j)
            x = self.inputs.train(micro, self.epoch, upcoming)  # (m, C, H, W)
            y = self.data.train_y[micro].to(self.device, non_blocking=True)  # (m,)
            x = self.augment(x, micro, self.epoch)  # (the same crops on any world size)
            if self.adv.initial_ratio > 0:
                with frozen_stats(self._bn_buffers or [], adv_stats):
                    x, _ = self.adv.apply(self.forward, criterion, x, y, self.epoch)  # (only its sign counts)
            logits = self.forward(x)  # (m, classes), float32
            if bn is not None:
                bn.after()
            loss_sum = F.cross_entropy(logits, y, reduction="sum", label_smoothing=self.cfg.label_smoothing)
            stats[0] += loss_sum.detach()
            stats[1] += (logits.argmax(1) == y).sum()
            stats[2] += y.numel()
            small = measure and j == 0
            early = exchange is not None and n == len(micros) - 1 and not small
            if early:  # the statistics are complete: sent while the last pass runs
                sent = exchange.start(to_sum())
            # Divide by the GLOBAL batch: summed over micro-batches and ranks this is the mean.
            with exchange.sending(early) if exchange is not None else contextlib.nullcontext():
                self.scaler.scale(loss_sum / G).backward()  # (the loss itself unless fp16)
            if small:  # .grad holds micro-batch 0's gradient times m / G (and fp16's scale)
                unscale = 1.0 / self.scaler.get_scale() if scaled else 1.0
                stats[3] += sq_grad_norm(self.params) * (G / y.numel() * unscale) ** 2
                stats[4] += 1
        if exchange is not None:  # the gradients are summed in .grad, the statistics returned
            if sent is None:  # (no micro-batch on this rank)
                sent = exchange.start(to_sum())
            summed = exchange.wait(sent)
            if bn is not None:
                bn.finish(summed.pop())
            reduced = [*(p.grad for p in self.params), summed[0]]
        else:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            if self.comm.size > 1:
                reduced = self.comm.allreduce_sum([*grads, *to_sum()])
                if bn is not None:
                    bn.finish(reduced.pop())
            else:  # a world of one has nothing to sum (hvd.DistributedOptimizer skips it too)
                reduced = [*grads, stats]
        for p, g in zip(self.params, reduced[:-1]):
            if g is not p.grad:  # the summed gradient (world > 1) or zeros (unused): take it, no copy
                p.grad = g
        self._epoch_sums[:5] += reduced[-1]
        self.scaler.unscale_(self.optimizer)  # (the summed gradient: every rank sees the same overflow)
        if measure:  # the global batch's mean gradient, the same on every rank
            self._epoch_sums[5] += sq_grad_norm(self.params)
            self._epoch_sums[6] += 1
        if self.cfg.clip_grad_norm is not None:
            # The summed gradient, the same on every rank: clipped as one process clips its batch's.
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)  # (fp16: skipped when the gradient overflowed)
        self.scaler.update()
        self.sampler.advance(G)
        self.updates += 1
        self.samples_seen += G
        return True

    def _exchange(self) -> GradientExchange | None:
        """The overlapped gradient exchange, on more than one rank of a comm that has one."""
        if self.comm.size == 1 or not GradientExchange.supported(self.comm):
            return None
        if self._grad_exchange is None:
            self._grad_exchange = GradientExchange(self.params, self.comm)
        return self._grad_exchange

    def _running_stats(self) -> RunningStats | None:
        """The BatchNorm running-statistics exchange, on more than one rank and with BatchNorm
        layers to keep (a world of one updates them as they should be already)."""
        if self.comm.size == 1:
            return None
        if self._bn_stats is None:
            self._bn_stats = RunningStats(self.model)
        return self._bn_stats if self._bn_stats.layers else None

    # --- epoch-end pieces ----------------------------------------------------------------------------
    def eig_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The estimate's samples at this epoch (training/curvature.py)."""
        return self.curvature.batches(self.epoch)

    def estimate_eig(self) -> tuple[float | None, int, float]:
        """(top eigenvalue, samples used, seconds) or (None, 0, 0.0) when no estimate is needed."""
        if self.cfg.method == "sgd" or not self.controller.needs_estimate:
            # sgd never grows, and at the cap there is nothing left to decide: spend no HVPs.
            return None, 0, 0.0
        return self.curvature.estimate(self.model, self.comm, self.epoch)

    @torch.no_grad()
    def evaluate(self, test: tuple[Any, torch.Tensor] | None = None) -> tuple[float, float]:
        """(test loss, test accuracy) over the whole test split (or `test`, an (x, y) pair), each
        rank its shard, sums allreduced."""
        self.model.eval()
        test_x, y_all = (None, self.data.test_y) if test is None else test
        shard = torch.arange(self.comm.rank, int(y_all.shape[0]), self.comm.size)
        sums = torch.zeros(3, dtype=torch.float64)  # loss_sum, correct, count
        for i in range(0, shard.numel(), self.cfg.eval_batch):
            sel = shard[i:i + self.cfg.eval_batch]
            x, y = self.inputs.test(sel, test_x), y_all[sel].to(self.device)
            logits = self.forward(x)
            sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                                  (logits.argmax(1) == y).sum().item(), y.numel()], dtype=torch.float64)
        (total,) = self.comm.allreduce_sum([sums])
        loss_sum, correct, count = total.tolist()
        return loss_sum / max(count, 1), correct / max(count, 1)

    # --- the loop ----------------------------------------------------------------------------------
    def run_epoch(self, writer: MetricsWriter) -> dict[str, Any]:
        """Train the rest of the current epoch, then estimate, evaluate, log and decide growth."""
        epoch = self.epoch
        G = self.controller.global_batch
        adv_ratio = self.adv.ratio(epoch) if self.cfg.method == "absa" else 0.0
        clock = self._epoch_clock
        if clock["start"] is None:
            clock["start"] = time.time()
        lr = self.current_lr()  # reported as is when the epoch has no full batch left
        mark = time.perf_counter()
        while self.step():
            now = time.perf_counter()
            clock["train_s"] += now - mark  # this update and the previous one's callbacks (commits)
            clock["world"] = self.comm.size
            mark = now
            lr = self.optimizer.param_groups[0]["lr"]  # the LR of the epoch's last update
            self.fire(Event.UPDATE_END)
        clock["train_s"] += time.perf_counter() - mark
        # Running statistics are the same on every rank already (RunningStats), except for layers
        # it leaves alone (momentum=None) and other buffers: rank 0's everywhere.
        self.comm.broadcast_buffers(self.model)
        eig, eig_samples, so_s = self.estimate_eig()
        test_loss, test_acc = self.evaluate()
        sums = self._epoch_sums.tolist()
        loss_sum, correct, count = sums[:3]
        gns = epoch_noise_scale(sums[3:], layout(G, self.cfg.base_batch, 1).micro_sizes()[0], G)
        epoch_s = time.time() - clock["start"]
        self.elapsed_s += epoch_s
        self.second_order_total_s += so_s
        # The world of the epoch's last update: after a resize at the epoch's end, this epoch's
        # updates still ran in the old world.
        world = clock["world"] or self.comm.size
        lay = layout(G, self.cfg.base_batch, world)
        record = writer.epoch(
            epoch=epoch + 1, updates=self.updates, samples_seen=self.samples_seen, global_batch=G,
            world_size=world, per_worker_batch=lay.per_worker_batch, accum_steps=lay.accum_steps,
            lr=lr, eig=eig, eig_samples=eig_samples, adv_ratio=adv_ratio,
            train_loss=loss_sum / max(count, 1), train_acc=correct / max(count, 1),
            test_loss=test_loss, test_acc=test_acc, epoch_s=epoch_s,
            samples_per_s=(self.samples_seen - clock["samples0"]) / max(clock["train_s"], 1e-9),
            second_order_s=so_s)
        self.history.append(record)
        # Before the epoch's end: its commit may raise to resize the job, and the line would then
        # never be shown (it is written to metrics.jsonl already).
        self.fire(Event.EPOCH_LOGGED, record=record)
        # The next epoch starts now, on the clock that the epoch-end commit keeps: a resize at
        # this boundary (the commit raises, the job resets) then stalls inside the next epoch's
        # time instead of between two clocks.
        self._epoch_clock = {**_new_epoch_clock(self.samples_seen), "start": time.time()}
        if self.cfg.method != "sgd":
            if epoch + 1 < self.cfg.epochs:
                self._decide(writer, eig, epoch, gns)
            else:  # a growth after the last epoch would apply to nothing, unless the run is extended
                self._pending_check = {"eig": eig, "epoch": epoch, "noise_scale": gns}
        self._epoch_sums.zero_()
        self.sampler.new_epoch()
        self.fire(Event.EPOCH_END)
        return record

    def _decide(self, writer: MetricsWriter, eig: float | None, epoch: int, noise_scale: float | None = None) -> None:
        """The controller's decision after `epoch` (0-based), with its growth event."""
        decision = self.controller.check(eig, epoch, noise_scale)
        if not decision.grew:
            return
        self.adv.on_growth(self.controller.at_max)
        growth = writer.event("growth", epoch=epoch + 1, updates=self.updates,
                              old_batch=decision.old_batch, new_batch=decision.new_batch,
                              reason=decision.reason, eig=eig, ref=decision.ref,
                              lr=self.lr_schedule.at(self.controller, epoch + 1, 0.0),
                              **({"noise_scale": noise_scale} if noise_scale is not None else {}))
        self.growths.append(growth)
        self.fire(Event.GROWTH, growth=growth)

    def fit(self, writer: MetricsWriter) -> dict[str, Any]:
        """Run the remaining epochs (or until a callback raises StopRequested); returns the
        summary (written to summary.json on rank 0)."""
        try:
            self.fire(Event.FIT_START)
            if self._pending_check is not None and self.epoch < self.cfg.epochs:
                # A finished run resumed with more epochs: its last epoch's check, skipped then,
                # comes now, so it grows as a run planned this long from the start would have.
                self._decide(writer, **self._pending_check)
                self._pending_check = None
                self.fire(Event.EPOCH_END)
            while self.epoch < self.cfg.epochs:
                self.run_epoch(writer)
        except StopRequested:
            pass
        summary = self.summary()
        writer.summary(**summary)
        self.fire(Event.FIT_END, summary=summary)
        return summary

    # --- disk checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, writer: MetricsWriter) -> str | None:
        """Rank 0 writes the whole state (and torch's RNG) atomically to <out>/checkpoints/ (on the
        launcher's host when the outputs are relayed)."""
        if self.comm.rank != 0:
            return None
        t0 = time.perf_counter()
        state = to_host({**self.state_dict(), "rng": torch.get_rng_state(), "config": saved_config(self.cfg),
                         "data": self.data_id})
        path = self.checkpoints.save_checkpoint(state, self.updates, self.cfg.keep_checkpoints)
        writer.event("checkpoint", epoch=self.epoch, updates=self.updates, path=str(path),
                     seconds=time.perf_counter() - t0)
        return path

    def resume(self, run_dir: str | os.PathLike, collective: bool = True) -> Path:
        """Load the newest checkpoint of `run_dir` that verifies (training/resume.py resume_trainer)."""
        return resume_trainer(self, run_dir, collective)

    def summary(self) -> dict[str, Any]:
        """The run's outcome in one flat-ish dict (training/summary.py)."""
        return run_summary(self)
