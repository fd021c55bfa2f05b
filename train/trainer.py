"""The training loop: one file, plain ``python`` or ``torchrun`` (nanoGPT-style).

``run(cfg)`` trains one seed into ``cfg["out"]`` and returns a summary dict.
Process 0 logs and saves; every process computes the same batch plan, so DDP
steps stay in lock-step, and metrics are summed over processes before logging.
"""
from __future__ import annotations

import contextlib
import csv
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import config as config_mod
from .data import BatchPlan, build_splits, iterate_batches
from .dist import all_reduce_sum, any_process, barrier, init_distributed
from .evaluate import evaluate, transfer_sizes, write_eval
from .schedule import guidance_lambda, lr_at
from .state import STATE_FILE, load_train_state, save_train_state

EXIT_NONFINITE = 3
METRIC_FIELDS = ["step", "epoch", "lr", "lambda", "loss", "loss_task", "loss_coord", "train_acc",
                 "grad_norm", "images_per_s", "unreadable", "elapsed_s"]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class TrainModule(nn.Module):
    """Model + optional guidance head as one module, so that one DDP wrapper syncs both.

    ``forward(x, y, lam)`` returns ``(loss, loss_task, loss_coord, correct, n)``: the total
    loss and detached statistics (the contract :class:`train.dense.DenseModule` shares).
    ``lam`` is a tensor so that a changing λ does not recompile under ``torch.compile``.
    """

    def __init__(self, model, head=None):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x, y, lam):
        feats = self.model.forward_features(x)                     # (B, P+N, D), after the final norm
        logits = self.model.forward_head(feats)                    # (B, classes)
        valid = (y >= 0).float()                                   # label -1: unreadable placeholder
        ce = F.cross_entropy(logits.float(), y.clamp(min=0), reduction="none")
        n_valid = valid.sum()
        loss_cls = (ce * valid).sum() / n_valid.clamp(min=1)
        correct = ((logits.argmax(-1) == y).float() * valid).sum()
        if self.head is not None:
            p = self.model.patch_embed.patch_size[0]
            grid = (x.shape[-2] // p, x.shape[-1] // p)
            patch_tokens = feats[:, self.model.num_prefix_tokens:]  # (B, N, D)
            loss_coord = self.head(patch_tokens, grid) * (n_valid > 0).float()
        else:
            loss_coord = torch.zeros((), device=x.device)
        loss = loss_cls + lam * loss_coord
        return loss, loss_cls.detach(), loss_coord.detach(), correct.detach(), n_valid.detach()


# --------------------------------------------------------------------------- building blocks

def pick_device(cfg) -> torch.device:
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise config_mod.ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    return torch.device(want)


def pick_precision(cfg, device) -> str:
    precision = cfg["precision"]
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise config_mod.ConfigError("precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
    return precision


def build_model(cfg, num_classes: int):
    """The model to train; a separate function so that tests can wrap it."""
    from asg_probe import create_model

    m = cfg["model"]
    return create_model(m["name"], pos=m["pos"], num_classes=num_classes, img_size=m["img_size"], **m["kwargs"])


def build_head(cfg, model):
    g = cfg["guidance"]
    if not g["enabled"]:
        return None
    from asg_probe import GuidanceHead

    return GuidanceHead(embed_dim=model.embed_dim, hidden_dim=g["hidden_dim"], target=g["target"], seed=cfg["seed"])


def param_groups(model, head, weight_decay: float, dense_head=None) -> list[dict]:
    """AdamW groups: decay only on ≥2-d weights not named by ``no_weight_decay()``.

    Biases, norms, other 1-d tensors, tokens/position tables (timm's list) and the whole
    guidance head get weight decay 0 (SPEC §1). A dense head decays its ≥2-d weights.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or name.split(".")[0] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if dense_head is not None:
        for p in dense_head.parameters():
            (decay if p.ndim > 1 else no_decay).append(p)
    if head is not None:
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0, "name": "guidance_head"})
    return [g for g in groups if g["params"]]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class MetricsLog:
    """``metrics.jsonl`` + ``metrics.csv`` on process 0; a resume drops rows past the checkpoint."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.jsonl.is_file():
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r.get("step", 0) <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict):
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore").writerow(row)


def gather_rng_states(ctx) -> list:
    """Every process's RNG state, in rank order (rank 0 saves them all)."""
    from .state import rng_state

    mine = rng_state()
    if not ctx.enabled:
        return [mine]
    import torch.distributed as dist

    states = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


@torch.no_grad()
def ranks_in_sync(module) -> bool:
    """True when every process holds bit-identical parameters (DDP's promise, checked)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------- the run

def run(cfg: dict, resume: bool = False, command: str | None = None) -> dict:
    """Train one seed into ``cfg["out"]``; returns the summary (also in ``summary.json``).

    Raises
    ------
    ConfigError
        Bad data folder, device or resume mismatch, before any training work.
    NonFiniteLoss
        The loss became NaN/inf; the last good checkpoint is left in place.
    """
    device = pick_device(cfg)
    ctx = init_distributed(device.type)
    if device.type == "cuda" and cfg["device"] in ("auto", "cuda"):
        device = torch.device("cuda", ctx.local_rank)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = pick_precision(cfg, device)
    run_dir = Path(cfg["out"])

    saved = load_train_state(run_dir) if resume else None
    if resume and saved is None and ctx.is_main:
        print(f"[asg-train] --resume: no {STATE_FILE} in {run_dir} yet; starting from scratch", file=sys.stderr)
    if saved is not None:
        changed = [k for k in config_mod.changed_keys(saved["config"], cfg)
                   if k not in ("device", "progress", "num_workers", "log_every", "threads", "eval.enabled",
                                "eval.sizes", "eval.batch_size", "seeds", "out")]
        if changed:
            raise config_mod.ConfigError(
                f"--resume: the config differs from the saved run in {', '.join(changed)}; "
                "resume with the same settings or start a new out=")

    # Data before the model: a missing folder is reported before anything heavy happens.
    splits = build_splits(cfg)
    seed_everything(cfg["seed"])
    dense = cfg["task"] != "classification"
    model = build_model(cfg, 0 if dense else splits.num_classes)
    head = build_head(cfg, model)
    dense_head = None
    if dense:
        from .dense import DenseModule, build_dense_head

        dense_head = build_dense_head(cfg, model)
        module = DenseModule(model, dense_head, cfg["task"], cfg["dense"]["layers"], head,
                             cfg["dense"]["ignore_index"]).to(device)
    else:
        module = TrainModule(model, head).to(device)
    # Initial weights are the same on every process (seeded above); from here on drop-path and
    # other noise differ per process, as they would with independent GPUs.
    torch.manual_seed(cfg["seed"] * 1000 + ctx.rank)
    patch = model.patch_embed.patch_size[0]
    train_size = cfg["model"]["img_size"]
    sizes = cfg["data"]["multires_sizes"]
    eval_sizes = cfg["eval"]["sizes"] or transfer_sizes(train_size, patch)
    if train_size not in eval_sizes:
        eval_sizes = sorted(set(eval_sizes) | {train_size})
    for s in [train_size] + list(sizes or []) + list(eval_sizes):
        if s % patch:
            raise config_mod.ConfigError(f"image size {s} (model.img_size, data.multires_sizes or eval.sizes) "
                                         f"is not a multiple of the patch size {patch}")

    optim = cfg["optim"]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, head, optim["weight_decay"], dense_head), lr=optim["lr"],
                                  betas=tuple(optim["betas"]), fused=fused)
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "fp16"))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    plan = BatchPlan(len(splits.train), cfg["batch_size"], seed=cfg["seed"], rank=ctx.rank,
                     world_size=ctx.world_size, sizes=sizes, base_size=train_size,
                     pixel_budget=cfg["data"]["pixel_budget"])
    accum = cfg["grad_accum"]
    steps_per_epoch = [plan.num_batches(e) // accum for e in range(cfg["epochs"])]
    if steps_per_epoch[0] == 0:
        raise config_mod.ConfigError(
            f"{len(splits.train)} training images are fewer than one batch of "
            f"{cfg['batch_size']}×{ctx.world_size} processes×{accum} accumulation")
    total_steps = sum(steps_per_epoch)
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])

    step, epoch, batch_in_epoch = 0, 0, 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        if head is not None:
            head.load_state_dict(saved["guidance_head"])
        if dense_head is not None:
            dense_head.load_state_dict(saved["extra"]["dense_head"])
        optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"] is not None:
            scaler.load_state_dict(saved["scaler"])
        step = saved["step"]
        epoch, batch_in_epoch = saved["sampler"]["epoch"], saved["sampler"]["batch_in_epoch"]
        from .state import set_rng_state

        rng = saved["rng"]
        set_rng_state(rng[ctx.rank] if isinstance(rng, list) and len(rng) == ctx.world_size else
                      rng[0] if isinstance(rng, list) else rng)
    last_good = (run_dir / STATE_FILE, step) if saved is not None else (None, None)

    train_module = module
    if cfg["compile"]:
        train_module = torch.compile(module)
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(train_module, device_ids=[device.index] if device.type == "cuda" else None)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
        if command:
            with open(run_dir / "command.txt", "a") as f:
                f.write(command + "\n")
    log = MetricsLog(run_dir, ctx.is_main, step if saved is not None else None)
    g = cfg["guidance"]

    def save(at_step, at_epoch, at_batch):
        nonlocal last_good
        rngs = gather_rng_states(ctx)
        if ctx.is_main:
            path = save_train_state(run_dir, rng=rngs, model=model, head=head, optimizer=optimizer, scaler=scaler,
                                    step=at_step, epoch=at_epoch, batch_in_epoch=at_batch,
                                    total_steps=total_steps, config=cfg,
                                    extra={"unreadable": unreadable,
                                           **({"dense_head": dense_head.state_dict()} if dense else {})})
            last_good = (path, at_step)
        barrier()

    bar = None
    if ctx.is_main and cfg["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"{cfg['model']['pos']} seed {cfg['seed']}",
                   dynamic_ncols=True, leave=False)

    # Running sums on the device (no host sync per step): loss_task·n, loss_coord·n, correct, n.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    unreadable = int(saved["extra"].get("unreadable", 0)) if saved is not None else 0
    unreadable_window = 0
    images_window = 0
    t_window = t_start = time.perf_counter()
    last_row: dict = {}
    grad_norm = torch.zeros((), device=device)

    def check_finite():
        local_bad = int(bad_step.item())
        if not any_process(local_bad >= 0, device):
            return
        where = f"at step {local_bad}" if local_bad >= 0 else "on another process"
        ckpt = (f"last good checkpoint: {last_good[0]} (step {last_good[1]})" if last_good[0] is not None
                else "no checkpoint was written yet")
        raise NonFiniteLoss(f"non-finite loss {where}; run stopped without saving the bad state; {ckpt}. "
                            "Lower optim.lr or guidance.rc_lambda, or use precision=fp32.")

    module.train()
    done = step >= total_steps
    while not done:
        n_micro = steps_per_epoch[epoch] * accum if epoch < len(steps_per_epoch) else 0
        if n_micro == 0:
            break
        batches = plan.batches(epoch, start_batch=batch_in_epoch)[: n_micro - batch_in_epoch]
        loader = iterate_batches(splits.train, batches, num_workers=cfg["num_workers"],
                                 seed=cfg["seed"] * 100_003 + epoch, pin_memory=device.type == "cuda")
        for x, y, n_bad in loader:
            unreadable_window += n_bad
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            lam = guidance_lambda(step, lambda_min=g["lambda_min"], rc_lambda=g["rc_lambda"],
                                  warmup_steps_for_aux=g["warmup_steps_for_aux"])
            last_micro = (batch_in_epoch + 1) % accum == 0
            sync = contextlib.nullcontext() if (last_micro or not ctx.enabled) else train_module.no_sync()
            with sync:
                with autocast():
                    loss, loss_task, loss_coord, correct, n = train_module(
                        x, y, torch.tensor(lam, device=device))
                scaler.scale(loss / accum).backward()
            sums += torch.stack([loss_task * n, loss_coord * n, correct, n]).double()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), torch.full_like(bad_step, step), bad_step)
            images_window += int(x.shape[0])
            batch_in_epoch += 1
            if not last_micro:
                continue

            lr = lr_at(step, lr=optim["lr"], min_lr=optim["min_lr"], warmup_steps=optim["warmup_steps"],
                       total_steps=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), optim["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if bar is not None:
                bar.update(1)

            at_end = step >= total_steps
            if step % cfg["log_every"] == 0 or at_end:
                check_finite()
                s_task, s_coord, s_correct, s_n, s_bad = all_reduce_sum(sums.tolist() + [unreadable_window], device)
                unreadable += int(s_bad)
                now = time.perf_counter()
                imgs = all_reduce_sum([images_window], device)[0]
                last_row = {
                    "step": step, "epoch": epoch, "lr": lr, "lambda": lam if head is not None else 0.0,
                    "loss_task": s_task / max(s_n, 1), "loss_coord": s_coord / max(s_n, 1),
                    "train_acc": s_correct / max(s_n, 1), "grad_norm": float(grad_norm),
                    "images_per_s": imgs / max(now - t_window, 1e-9), "unreadable": unreadable,
                    "elapsed_s": now - t_start,
                }
                last_row["loss"] = last_row["loss_task"] + last_row["lambda"] * last_row["loss_coord"]
                log.write(last_row)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_row['loss']:.3f}", lr=f"{lr:.2e}")
                sums.zero_()
                unreadable_window = images_window = 0
                t_window = now
            end_of_epoch = batch_in_epoch >= n_micro
            if step % cfg["ckpt_every"] == 0 or end_of_epoch or at_end:
                check_finite()
                if end_of_epoch:
                    save(step, epoch + 1, 0)
                else:
                    save(step, epoch, batch_in_epoch)
            if at_end:
                done = True
                break
        if batch_in_epoch >= n_micro:
            epoch += 1
            batch_in_epoch = 0
            if cfg["eval"]["every_epochs"] and epoch % cfg["eval"]["every_epochs"] == 0 and not done and not dense:
                rows = evaluate(model, splits.val, [train_size], train_size=train_size,
                                base_batch=cfg["eval"]["batch_size"], device=device, ctx=ctx, amp=autocast,
                                num_workers=cfg["num_workers"])
                log.write({"step": step, "epoch": epoch, "val_top1": rows[0]["top1"]})
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t_start

    # Evaluation: top-1 at the training size and the transfer sweep.
    metrics = {"steps": step, "train_time_s": round(train_time, 2), "unreadable": unreadable,
               "final_loss": last_row.get("loss"), "final_loss_coord": last_row.get("loss_coord")}
    eval_doc = None
    if cfg["eval"]["enabled"] and dense:
        from .dense import evaluate_dense

        row = evaluate_dense(module, splits.val, train_size, base_batch=cfg["eval"]["batch_size"], device=device,
                             ctx=ctx, amp=autocast, num_workers=cfg["num_workers"])
        if ctx.is_main:
            eval_doc = {"train_size": train_size, **row}
            (run_dir / "eval.json").write_text(json.dumps(eval_doc, indent=2))
        metrics.update({k: v for k, v in row.items() if k not in ("size", "n", "unreadable")})
    elif cfg["eval"]["enabled"]:
        rows = evaluate(model, splits.val, eval_sizes, train_size=train_size, base_batch=cfg["eval"]["batch_size"],
                        device=device, ctx=ctx, amp=autocast, num_workers=cfg["num_workers"])
        if ctx.is_main:
            eval_doc = write_eval(run_dir, rows, train_size)
        metrics["top1"] = next(r["top1"] for r in rows if r["size"] == train_size)
        metrics["transfer"] = {str(r["size"]): r["top1"] for r in rows}

    if ctx.enabled:
        metrics["ranks_in_sync"] = ranks_in_sync(module)
    summary = {"out": str(run_dir), "seed": cfg["seed"], "pos": cfg["model"]["pos"],
               "guidance": cfg["guidance"]["target"] if g["enabled"] else None, **metrics}
    if ctx.is_main:
        from asg_probe import save_checkpoint

        # The normalisation the model was trained with travels with it (probes need it to
        # feed images the way the model saw them, e.g. the scenes' own mean/std).
        data_config = {"mean": list(splits.mean), "std": list(splits.std), "img_size": train_size,
                       "interpolation": cfg["data"]["interpolation"], "crop_pct": 1 / cfg["data"]["eval_crop_ratio"]}
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": tuple(splits.mean),
                                "std": tuple(splits.std)}
        save_checkpoint(run_dir / "model.safetensors", model, config=cfg, metrics=metrics,
                        data_config=data_config, train={"command": command, "eval": eval_doc})
        if dense:
            from .state import atomic_safetensors_save

            atomic_safetensors_save(dense_head.state_dict(), run_dir / "dense_head.safetensors",
                                    {"task": cfg["task"], "layers": json.dumps(cfg["dense"]["layers"])})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        top1 = (f"top1@{train_size} {metrics['top1']:.4f}" if "top1" in metrics
                else f"mIoU {metrics['miou']:.4f}" if "miou" in metrics
                else f"AbsRel {metrics['abs_rel']:.4f} δ1 {metrics['delta1']:.4f}" if "abs_rel" in metrics
                else "no eval")
        loss = f"loss {metrics['final_loss']:.4f}" if metrics["final_loss"] is not None else ""
        extra = f", {unreadable} unreadable images skipped" if unreadable else ""
        print(f"[asg-train] {cfg['model']['name']} pos={cfg['model']['pos']} "
              f"guidance={summary['guidance'] or 'off'} seed={cfg['seed']}: {step} steps in "
              f"{_fmt_time(train_time)}, {loss}, {top1}{extra} → {run_dir / 'model.safetensors'}")
    barrier()
    return summary

