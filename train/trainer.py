"""The training loop: one file, plain ``python`` or ``torchrun`` (nanoGPT-style), every task.

``run(cfg)`` trains one seed into ``cfg["out"]`` and returns a summary dict. What differs
between classification, segmentation and depth is behind :class:`asg_train.tasks.Task`; this
loop has no task branches. Process 0 logs and saves; every process computes the same batch
plan, so DDP steps stay in lock-step, and metrics are summed over processes before logging.

A run directory holds ``config.yaml``, ``command.txt``, ``train_state.pt`` (resumable),
``metrics.{jsonl,csv}``, ``eval.json`` (+ ``eval.csv``), ``model.safetensors`` (inference),
the task's exports, ``summary.json`` and, with a snapshot schedule, ``snapshots/``.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from asg_probe.files import atomic_write_text, remove_stale_temporaries

from . import config as config_mod
from .build import (build_guidance_head, build_model, gather_rng_states, param_groups, pick_device,
                    pick_precision, ranks_in_sync, seed_everything)
from .data import BatchPlan, iterate_batches
from .dist import all_reduce_sum, any_process, barrier, init_distributed
from .evaluate import num_eval_batches
from .rundir import RunLock, claim
from .runlog import MetricsLog, progress_bar
from .schedule import guidance_lambda, lr_at
from .snapshots import Snapshots, list_snapshots
from .state import STATE_FILE, load_train_state, save_train_state, set_rng_state
from .tasks import make_task

EXIT_NONFINITE = 3
# Settings that may change on --resume: they do not change what is trained.
RESUMABLE_CHANGES = ("device", "progress", "num_workers", "log_every", "threads", "eval.enabled", "eval.sizes",
                     "eval.batch_size", "seeds", "out")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _configure_torch(cfg):
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _finished_summary(run_dir: Path, saved) -> dict | None:
    """The summary of a run that already trained to its last step and exported its model."""
    done = saved is not None and saved["step"] >= saved["scheduler"]["total_steps"]
    if done and (run_dir / "model.safetensors").is_file() and (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    return None


class Trainer:
    """One seed's run: built from a resolved config, then :meth:`train`, :meth:`evaluate`, :meth:`finish`."""

    def __init__(self, cfg: dict, saved: dict | None, command: str | None, device, ctx):
        self.cfg, self.saved, self.command, self.device, self.ctx = cfg, saved, command, device, ctx
        self.run_dir = Path(cfg["out"])
        self.precision = pick_precision(cfg, device)
        self.task = make_task(cfg)
        # Data before the model: a missing folder is reported before anything heavy happens.
        self.splits = self.task.build_splits()
        seed_everything(cfg["seed"])
        self.model = build_model(cfg, self.task.num_classes(self.splits))
        self.guidance = build_guidance_head(cfg, self.model)
        self.module = self.task.build_module(self.model, self.guidance).to(device)
        # Initial weights are the same on every process (seeded above); from here on drop-path and
        # other noise differ per process, as they would with independent GPUs.
        torch.manual_seed(cfg["seed"] * 1000 + ctx.rank)
        # The normalisation the model was trained with travels with it (probes need it to feed
        # images the way the model saw them, e.g. the scenes' own mean/std).
        self.data_config = {"mean": list(self.splits.mean), "std": list(self.splits.std),
                            "img_size": cfg["model"]["img_size"], "interpolation": cfg["data"]["interpolation"],
                            "crop_pct": 1 / cfg["data"]["eval_crop_ratio"]}
        self.model.pretrained_cfg = {**(getattr(self.model, "pretrained_cfg", None) or {}),
                                     "mean": tuple(self.splits.mean), "std": tuple(self.splits.std)}
        self._check_sizes()
        self._build_optimizer()
        self._build_plan()
        self._restore()
        self.train_module = self.module
        if cfg["compile"]:
            self.train_module = torch.compile(self.module)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_module = DDP(self.train_module, device_ids=[device.index] if device.type == "cuda" else None)

    # ----------------------------------------------------------------------- building

    def _check_sizes(self):
        patch = self.model.patch_embed.patch_size[0]
        self.train_size = self.cfg["model"]["img_size"]
        self.eval_sizes = self.task.eval_sizes(self.train_size, patch)
        for s in [self.train_size] + list(self.cfg["data"]["multires_sizes"] or []) + list(self.eval_sizes):
            if s % patch:
                raise config_mod.ConfigError(f"image size {s} (model.img_size, data.multires_sizes or eval.sizes) "
                                             f"is not a multiple of the patch size {patch}")

    def _build_optimizer(self):
        optim = self.cfg["optim"]
        groups = param_groups(self.model, self.guidance, optim["weight_decay"], self.task.head)
        self.optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]),
                                           fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=(self.precision == "fp16"))
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _build_plan(self):
        cfg, ctx = self.cfg, self.ctx
        self.plan = BatchPlan(len(self.splits.train), cfg["batch_size"], seed=cfg["seed"], rank=ctx.rank,
                              world_size=ctx.world_size, sizes=cfg["data"]["multires_sizes"],
                              base_size=self.train_size, pixel_budget=cfg["data"]["pixel_budget"])
        accum = cfg["grad_accum"]
        self.steps_per_epoch = [self.plan.num_batches(e) // accum for e in range(cfg["epochs"])]
        if self.steps_per_epoch[0] == 0:
            raise config_mod.ConfigError(
                f"{len(self.splits.train)} training images are fewer than one batch of "
                f"{cfg['batch_size']}×{ctx.world_size} processes×{accum} accumulation")
        self.total_steps = sum(self.steps_per_epoch)
        if cfg["max_steps"]:
            self.total_steps = min(self.total_steps, cfg["max_steps"])

    def _restore(self):
        """Loop state: fresh, or everything a checkpoint saved (weights, optimiser, RNG, windows, clocks)."""
        self.step = self.epoch = self.batch_in_epoch = 0
        self.unreadable, self.time_before = 0, 0.0
        # Running sums of the current log window on the device (no host sync per step):
        # loss_task·n, loss_coord·n, correct, n; then unreadable and images seen, window seconds.
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.window = {"unreadable": 0, "images": 0, "seconds": 0.0}
        self.last_row: dict = {}
        self.last_good = (None, None)
        saved = self.saved
        if saved is None:
            return
        self.model.load_state_dict(saved["model"])
        if self.guidance is not None:
            self.guidance.load_state_dict(saved["guidance_head"])
        extra = saved["extra"]
        self.task.load_head_state(extra.get("task_head", extra.get("dense_head")))
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        self.step = saved["step"]
        self.epoch, self.batch_in_epoch = saved["sampler"]["epoch"], saved["sampler"]["batch_in_epoch"]
        rng = saved["rng"]
        set_rng_state(rng[self.ctx.rank] if isinstance(rng, list) and len(rng) == self.ctx.world_size else
                      rng[0] if isinstance(rng, list) else rng)
        self.unreadable = int(extra.get("unreadable", 0))
        self.time_before = float(extra.get("train_time_s", 0.0))
        self.last_row = dict(extra.get("last_row", {}))
        window = extra.get("window")
        if window is not None and self.ctx.is_main:  # the window's sums over all processes, kept once
            self.sums += torch.tensor(window["sums"], dtype=torch.float64, device=self.device)
            self.window = {k: window[k] for k in ("unreadable", "images", "seconds")}
        self.last_good = (self.run_dir / STATE_FILE, self.step)

    # ----------------------------------------------------------------------- saving

    def elapsed(self) -> float:
        """Training seconds of the whole run, across resumes (up to each checkpoint)."""
        return self.time_before + time.perf_counter() - self.t_start

    def save_state(self, at_epoch: int, at_batch: int):
        rngs = gather_rng_states(self.ctx)
        now = time.perf_counter()
        sums = all_reduce_sum(self.sums.tolist() + [self.window["unreadable"], self.window["images"]], self.device)
        window = {"sums": sums[:4], "unreadable": int(sums[4]), "images": int(sums[5]),
                  "seconds": self.window["seconds"] + now - self.t_window}
        if self.ctx.is_main:
            extra = {"unreadable": self.unreadable, "train_time_s": self.elapsed(), "window": window,
                     "last_row": self.last_row}
            head_state = self.task.head_state()
            if head_state is not None:
                extra["task_head"] = head_state
            path = save_train_state(self.run_dir, rng=rngs, model=self.model, head=self.guidance,
                                    optimizer=self.optimizer, scaler=self.scaler, step=self.step, epoch=at_epoch,
                                    batch_in_epoch=at_batch, total_steps=self.total_steps, config=self.cfg,
                                    extra=extra)
            self.last_good = (path, self.step)
        barrier()

    def check_finite(self):
        local_bad = int(self.bad_step.item())
        if not any_process(local_bad >= 0, self.device):
            return
        where = f"at step {local_bad}" if local_bad >= 0 else "on another process"
        path, at = self.last_good
        ckpt = f"last good checkpoint: {path} (step {at})" if path is not None else "no checkpoint was written yet"
        raise NonFiniteLoss(f"non-finite loss {where}; run stopped without saving the bad state; {ckpt}. "
                            "Lower optim.lr or guidance.rc_lambda, or use precision=fp32.")

    # ----------------------------------------------------------------------- training

    def prepare_run_dir(self):
        """Process 0: the run directory, leftovers of killed writes removed, config and command recorded."""
        if not self.ctx.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.run_dir)
        atomic_write_text(self.run_dir / "config.yaml", config_mod.dump(self.cfg))
        if self.command:  # one line per invocation (the first command, then each --resume)
            commands = self.run_dir / "command.txt"
            before = commands.read_text() if commands.is_file() else ""
            atomic_write_text(commands, before + self.command + "\n")

    def train(self):
        cfg, g = self.cfg, self.cfg["guidance"]
        self.log = MetricsLog(self.run_dir, self.ctx.is_main, self.step if self.saved is not None else None)
        self.snapshots = snapshots = Snapshots(self.run_dir, cfg, self.ctx.is_main, self.total_steps,
                                               meta={"data_config": self.data_config})
        snapshots.start(self.step, self.model)
        bar = progress_bar(self.ctx, cfg["progress"], total=self.total_steps, initial=self.step,
                           desc=f"{config_mod.run_label(cfg)} seed {cfg['seed']}")
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.t_start = self.t_window = time.perf_counter()
        grad_norm = torch.zeros((), device=self.device)
        accum = cfg["grad_accum"]
        self.module.train()
        done = self.step >= self.total_steps
        while not done and self.epoch < len(self.steps_per_epoch):
            n_micro = self.steps_per_epoch[self.epoch] * accum
            if n_micro == 0:
                break
            batches = self.plan.batches(self.epoch, start_batch=self.batch_in_epoch)[: n_micro - self.batch_in_epoch]
            loader = iterate_batches(self.splits.train, batches, num_workers=cfg["num_workers"],
                                     seed=cfg["seed"] * 100_003 + self.epoch, pin_memory=self.device.type == "cuda")
            for x, y, n_bad in loader:
                lam = guidance_lambda(self.step, lambda_min=g["lambda_min"], rc_lambda=g["rc_lambda"],
                                      warmup_steps_for_aux=g["warmup_steps_for_aux"])
                last_micro = (self.batch_in_epoch + 1) % accum == 0
                self.micro_step(x, y, n_bad, lam, sync=last_micro)
                if not last_micro:
                    continue
                lr = lr_at(self.step, lr=cfg["optim"]["lr"], min_lr=cfg["optim"]["min_lr"],
                           warmup_steps=cfg["optim"]["warmup_steps"], total_steps=self.total_steps)
                grad_norm = self.optimizer_step(lr)
                self.step += 1
                if bar is not None:
                    bar.update(1)
                at_end = self.step >= self.total_steps
                if self.step % cfg["log_every"] == 0 or at_end:
                    self.log_window(lr, lam if self.guidance is not None else 0.0, grad_norm, bar)
                end_of_epoch = self.batch_in_epoch >= n_micro
                if self.step % cfg["ckpt_every"] == 0 or end_of_epoch or at_end:
                    self.check_finite()
                    self.save_state(*((self.epoch + 1, 0) if end_of_epoch else (self.epoch, self.batch_in_epoch)))
                snapshots.maybe_save(self.step, self.model)
                if at_end:
                    done = True
                    break
            if self.batch_in_epoch >= n_micro:
                self.epoch += 1
                self.batch_in_epoch = 0
                every = cfg["eval"]["every_epochs"]
                if every and self.epoch % every == 0 and not done:
                    metrics, _ = self.run_eval([self.train_size])
                    self.log.write({"step": self.step, "epoch": self.epoch,
                                    f"val_{self.task.primary}": metrics[self.task.primary]})
        if bar is not None:
            bar.close()
        self.train_time = self.elapsed()

    def micro_step(self, x, y, n_bad, lam: float, sync: bool):
        """Forward and backward of one micro-batch; statistics added to the window on the device."""
        self.window["unreadable"] += n_bad
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        no_sync = self.ctx.enabled and not sync  # accumulate locally; DDP syncs on the last micro-step
        with self.train_module.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                loss, loss_task, loss_coord, correct, n = self.train_module(x, y, torch.tensor(lam, device=self.device))
            self.scaler.scale(loss / self.cfg["grad_accum"]).backward()
        self.sums += torch.stack([loss_task * n, loss_coord * n, correct, n]).double()
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss),
                                    torch.full_like(self.bad_step, self.step), self.bad_step)
        self.window["images"] += int(x.shape[0])
        self.batch_in_epoch += 1

    def optimizer_step(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg["optim"]["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def log_window(self, lr: float, lam: float, grad_norm, bar):
        """One metrics row: means over the steps since the previous row (across a resume too)."""
        self.check_finite()
        s_task, s_coord, s_correct, s_n, s_bad, images = all_reduce_sum(
            self.sums.tolist() + [self.window["unreadable"], self.window["images"]], self.device)
        self.unreadable += int(s_bad)
        now = time.perf_counter()
        seconds = self.window["seconds"] + now - self.t_window
        row = {"step": self.step, "epoch": self.epoch, "lr": lr, "lambda": lam,
               "loss_task": s_task / max(s_n, 1), "loss_coord": s_coord / max(s_n, 1),
               "train_acc": s_correct / max(s_n, 1), "grad_norm": float(grad_norm),
               "images_per_s": images / max(seconds, 1e-9), "unreadable": self.unreadable,
               "elapsed_s": self.elapsed()}
        row["loss"] = row["loss_task"] + row["lambda"] * row["loss_coord"]
        self.last_row = row
        self.log.write(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
        self.sums.zero_()
        self.window = {"unreadable": 0, "images": 0, "seconds": 0.0}
        self.t_window = now

    # ----------------------------------------------------------------------- evaluation and export

    def run_eval(self, sizes) -> tuple[dict, dict]:
        cfg = self.cfg
        kwargs = dict(train_size=self.train_size, base_batch=cfg["eval"]["batch_size"], ctx=self.ctx)
        bar = progress_bar(self.ctx, cfg["progress"], total=num_eval_batches(self.splits.val, sizes, **kwargs),
                           desc=f"eval {','.join(map(str, sizes))} px" if len(sizes) < 4 else f"eval {len(sizes)} sizes")
        try:
            return self.task.evaluate(self.module, self.splits.val, sizes, device=self.device, amp=self.autocast,
                                      num_workers=cfg["num_workers"], bar=bar, **kwargs)
        finally:
            if bar is not None:
                bar.close()

    def finish(self) -> dict:
        """Final evaluation, the exported model, ``summary.json`` and the one-line report."""
        cfg, ctx = self.cfg, self.ctx
        metrics = {"steps": self.step, "train_time_s": round(self.train_time, 2), "unreadable": self.unreadable,
                   "final_loss": self.last_row.get("loss"), "final_loss_coord": self.last_row.get("loss_coord")}
        eval_doc = None
        if cfg["eval"]["enabled"]:
            results, eval_doc = self.run_eval(self.eval_sizes)
            metrics.update(results)
            if ctx.is_main:
                self.task.write_eval(self.run_dir, eval_doc)
        if ctx.enabled:
            metrics["ranks_in_sync"] = ranks_in_sync(self.module)
        g = cfg["guidance"]
        summary = {"out": str(self.run_dir), "seed": cfg["seed"], "pos": cfg["model"]["pos"],
                   "guidance": g["target"] if g["enabled"] else None, **metrics}
        if ctx.is_main:
            from asg_probe import save_checkpoint

            save_checkpoint(self.run_dir / "model.safetensors", self.model, config=cfg, metrics=metrics,
                            data_config=self.data_config, train={"command": self.command, "eval": eval_doc})
            self.task.export(self.run_dir)
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            evaluation = self.task.headline(metrics) if eval_doc is not None else "no eval"
            loss = f"loss {metrics['final_loss']:.4f}" if metrics["final_loss"] is not None else ""
            extra = f", {self.unreadable} unreadable images skipped" if self.unreadable else ""
            if self.snapshots.enabled:
                extra += f", {len(list_snapshots(self.run_dir))} snapshots in {self.snapshots.folder}"
            # model kwargs too: sdt-decay's decay_form=hybrid is a different model from the default
            kwargs = "".join(f" {k}={v}" for k, v in (cfg["model"].get("kwargs") or {}).items())
            print(f"[asg-train] {cfg['model']['name']} pos={cfg['model']['pos']}{kwargs} "
                  f"guidance={summary['guidance'] or 'off'} seed={cfg['seed']}: {self.step} steps in "
                  f"{_fmt_time(self.train_time)}, {loss}, {evaluation}{extra} → {self.run_dir / 'model.safetensors'}")
        barrier()
        return summary


def run(cfg: dict, resume: bool = False, command: str | None = None, overwrite: bool = False) -> dict:
    """Train one seed into ``cfg["out"]``; returns the summary (also in ``summary.json``).

    With ``resume``, continue from ``train_state.pt`` when there is one; a run that already
    finished is reported and left unchanged (its summary is returned). Without it, a folder
    that already holds a run is refused unless ``overwrite`` (then the old run's files are
    removed before training starts); a folder another live ``asg-train`` writes is refused
    (:mod:`asg_train.rundir`).

    Raises
    ------
    ConfigError
        Bad data folder, device or resume mismatch, before any training work.
    NonFiniteLoss
        The loss became NaN/inf; the last good checkpoint is left in place.
    """
    config_mod.check_output(cfg["out"])
    device = pick_device(cfg)
    ctx = init_distributed(device.type)
    if device.type == "cuda" and cfg["device"] in ("auto", "cuda"):
        device = torch.device("cuda", ctx.local_rank)
    _configure_torch(cfg)
    run_dir = Path(cfg["out"])
    claim(run_dir, resume=resume, overwrite=overwrite)  # read-only here: refuse before any work

    saved = load_train_state(run_dir) if resume else None
    if resume and saved is None and ctx.is_main:
        print(f"[asg-train] --resume: no {STATE_FILE} in {run_dir} yet; starting from scratch", file=sys.stderr)
    if saved is not None:
        changed = [k for k in config_mod.changed_keys(saved["config"], cfg) if k not in RESUMABLE_CHANGES]
        if changed:
            raise config_mod.ConfigError(
                f"--resume: the config differs from the saved run in {', '.join(changed)}; "
                "resume with the same settings or start a new out=")
        finished = _finished_summary(run_dir, saved)
        if finished is not None:
            if ctx.is_main:
                print(f"[asg-train] {run_dir} already finished ({saved['step']} steps); nothing to do",
                      file=sys.stderr)
            return finished

    trainer = Trainer(cfg, saved, command, device, ctx)
    lock = RunLock(run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        if ctx.is_main:  # again under the lock (a run may have started meanwhile), and now removing
            claim(run_dir, resume=resume, overwrite=overwrite, remove=True)
        barrier()
        trainer.prepare_run_dir()
        trainer.train()
        return trainer.finish()
    finally:
        lock.release()
