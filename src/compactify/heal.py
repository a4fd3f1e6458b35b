"""Healing: a short distributed retraining of a (compressed) model, resumable, on CPU or GPU.

The paper retrains the MPO-compressed LLaMA for "less than a single epoch" of chat data on
8 GPUs. Here each rank started by ``torchrun --nproc_per_node=N -m compactify.heal ...`` runs
:func:`train`: load the model (dense or MPO-compressed) and choose what trains
(:func:`select_trainable`); pack the healing text (:mod:`compactify.heal_data`); shard the
model with PyTorch-native FSDP2 (``fully_shard`` on each decoder block, then the root; it runs
on CPU with gloo, whose device mesh may be "cpu") or replicate it with DDP; gloo on CPU, NCCL
on CUDA; bf16 compute with fp32 master weights where the hardware has fast bf16
(:func:`compute_mode`); AdamW with warmup + cosine decay and gradient clipping.

The loss (``heal.loss``) is the paper's next-token loss (``lm``), distillation from the original
model (``kd``: :mod:`compactify.distill`, the teacher online or as stored top-k logits), or a
mix; every step logs the global mean of the loss, its next-token part and its KD part.

Every ``checkpoint_every`` steps a ``torch.distributed.checkpoint`` (DCP) checkpoint holds model
+ optimizer, each rank's RNG state and the data position. It is written into a temporary
directory, marked COMPLETE last and renamed into place, so a killed run never leaves one that
looks whole; a rerun with the same ``out_dir`` resumes from the newest complete checkpoint and
reproduces the uninterrupted loss curve. At the end the full state dict is gathered on rank 0
and saved with ``save_pretrained`` to ``out_dir/model``; ``out_dir/heal.json`` records the loss
curve, tokens/s, wall time and peak memory per rank, with provenance. :func:`launch` runs all
that under ``torchrun`` from Python (the notebook), streaming its output.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from .config import load_config, parse_overrides
from .heal_data import (HealError, ShardedSampler, check_resume, data_path_hint, export_weights, find_checkpoint,
                        load_checkpoint, packed_data, plan_steps, save_checkpoint)
from .heal_guard import acquire_lock, die_with_parent, release_lock
from .progress import ThrottledLines
from .distill import TopKTeacher, kd_loss, load_teacher, precompute_topk, teacher_logits
from .heal_setup import (TRAINABLE_GROUPS, HealConfig, available_devices, check_nproc, compute_mode,  # noqa: F401
                         global_mean, heldout_point, lr_at, model_fingerprint, select_trainable)
from .results import atomic_write_bytes, read_json, save_results, write_json


def error_file(out_dir, rank) -> Path:
    """Where a failing rank records its error (``{rank, type, message, bad_input}``) for :func:`launch`."""
    return Path(out_dir) / "errors" / f"rank{int(rank)}.json"


def _init_distributed(hc: HealConfig) -> torch.device:
    """Join the process group torchrun set up (or start a world of one); pick device and backend."""
    from .models import resolve_device

    device = resolve_device(hc.device)
    check_nproc(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # plain `python -m compactify.heal` or a call from Python: a world of one, in-process store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def wrap_model(model: torch.nn.Module, hc: HealConfig, device: torch.device) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder block then the root (params become sharded DTensors,
    moved to ``device``; bf16 compute with fp32 gradient reduction on GPU). DDP: replicate."""
    from .models import blocks

    bf16 = device.type == "cuda" and hc.mixed_precision == "bf16"
    if hc.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        return fully_shard(model, mesh=mesh, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel

    model.to(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------- training
def _teacher_for(hc, model, tok, data, sampler_rows, out_dir: Path, device, rank):
    """The online teacher model, or the top-k file (rank 0 writes it once), or None for heal.loss=lm."""
    if hc.loss == "lm":
        return None, None
    bf16 = compute_mode(hc, device) != "fp32"  # bf16 teacher weights only where bf16 matmuls are fast
    if hc.teacher_mode == "online":
        return load_teacher(hc.teacher, model, tok, device, bf16), None
    path = Path(hc.teacher_file) if hc.teacher_file else out_dir / f"teacher_top{hc.teacher_topk}.pt"
    if not hc.teacher_file and rank == 0 and not path.is_file():
        teacher = load_teacher(hc.teacher, model, tok, device, bf16)
        precompute_topk(teacher, data, sampler_rows, hc.teacher_topk, path)
        del teacher
    dist.barrier()
    return None, TopKTeacher(path, data, sampler_rows, model.config.vocab_size)


def loss_terms(logits, targets, teacher_logits=None, topk_vals=None, topk_idx=None, temperature: float = 1.0):
    """Next-token cross-entropy of ``logits`` against ``targets`` and, given a teacher (full logits or
    top-k values and ids), the KD term: ``(lm, kd or None)``. ``heal.compile_loss`` runs this through
    ``torch.compile``: over SmolLM2's 49,152-token vocabulary the eager log-softmaxes, KL and their
    backward pass over a 4 x 255-token batch took 1.03 s on this CPU, compiled (fused) 0.25 s
    (``benchmarks/loss_speed.py``)."""
    import torch.nn.functional as F

    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    if teacher_logits is not None:
        return lm, kd_loss(logits, teacher_logits, temperature=temperature)
    if topk_vals is not None:
        return lm, kd_loss(logits, topk=(topk_vals, topk_idx), temperature=temperature)
    return lm, None


def _losses(model, batch, rows, hc, teacher, topk, autocast, terms=loss_terms) -> tuple[torch.Tensor, float, float | None]:
    """The training loss of one batch (heal.loss), with its next-token and KD parts for the curve."""
    with autocast:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        n = logits.shape[1]
        if teacher is not None:
            lm, kd = terms(logits, batch[:, 1:], teacher_logits(teacher, batch)[:, :-1], temperature=hc.kd_temperature)
        elif topk is not None:
            vals, idx = topk.lookup(rows, batch.device)
            lm, kd = terms(logits, batch[:, 1:], None, vals[:, :n], idx[:, :n], temperature=hc.kd_temperature)
        else:
            lm, kd = terms(logits, batch[:, 1:])
    loss = lm if kd is None else kd if hc.loss == "kd" else (1 - hc.kd_weight) * lm + hc.kd_weight * kd
    return loss, lm.detach(), None if kd is None else kd.detach()


def train(model_dir, out_dir, cfg: dict) -> dict | None:
    """Heal ``model_dir`` into ``out_dir`` (each rank runs this); rank 0 returns heal.json's data."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from .evaluate import heldout_ids_for
    from .models import check_seq_len, load_model
    from .progress import progress as tqdm

    hc, out_dir, t_start = HealConfig.from_cfg(cfg), Path(out_dir), time.perf_counter()
    device = _init_distributed(hc)
    rank, world = dist.get_rank(), dist.get_world_size()
    own_lock = rank == 0 and not os.environ.get("COMPACTIFY_HEAL_LOCKED")  # not started by launch(): lock here
    try:
        if own_lock:
            acquire_lock(out_dir)
        torch.manual_seed(hc.seed)
        model, tok = load_model(model_dir)
        model.train()
        model.config.use_cache = False  # no KV cache while training (and no warning about it with checkpointing)
        counts = select_trainable(model, hc.trainable)
        if hc.activation_checkpointing:  # recompute each block's activations in the backward pass
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        check_seq_len(model, hc.seq_len, "heal.seq_len")
        data = packed_data(tok, hc.data, hc.seq_len, hc.seed)
        plan = plan_steps(len(data), hc.seq_len, world, hc.batch_per_rank, hc.tokens, hc.steps, hc.max_epochs)
        fingerprint = {"model": model_fingerprint(model), "data": data_path_hint(hc.data),
                       "data_sha": hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16], "world_size": world,
                       "steps": plan["steps"], **{k: v for k, v in asdict(hc).items() if k in (
                           "strategy", "seq_len", "batch_per_rank", "lr", "min_lr_ratio", "warmup", "weight_decay",
                           "grad_clip", "trainable", "mixed_precision", "seed", "loss", "kd_temperature", "kd_weight",
                           "teacher", "teacher_mode", "teacher_topk")}}
        root = out_dir / "checkpoints"
        ckpt, warnings = find_checkpoint(root)
        if ckpt is not None:
            if not hc.resume:
                raise HealError(f"{root} already holds checkpoints and heal.resume is false. Set heal.resume=true "
                                "to continue that run, or use a new out_dir.")
            check_resume(read_json(ckpt / "meta.json")["fingerprint"], fingerprint, ckpt)
        if rank == 0:
            for w in warnings:
                print(w, file=sys.stderr, flush=True)
            (out_dir / "heal.json").unlink(missing_ok=True)  # its presence means: this run completed
        sampler = ShardedSampler(len(data), hc.batch_per_rank, world, rank, hc.seed)
        all_rows = torch.cat([ShardedSampler(len(data), hc.batch_per_rank, world, r, hc.seed).indices(s)
                              for s in range(plan["steps"]) for r in range(world)])
        teacher, topk = _teacher_for(hc, model, tok, data, all_rows, out_dir, device, rank)
        mode = compute_mode(hc, device)
        model = wrap_model(model, hc, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=hc.lr, weight_decay=hc.weight_decay)
        curve, heldout, seconds_before = [], [], 0.0
        if ckpt is not None:
            meta = load_checkpoint(ckpt, model, optim)
            sampler.load_state_dict(meta["sampler"])
            curve, heldout, seconds_before = meta["curve"], meta.get("heldout", []), meta["train_seconds"]
            if rank == 0:
                print(f"heal: resuming from {ckpt} at step {sampler.position}", file=sys.stderr, flush=True)
        start, total, tps = sampler.position, plan["steps"], plan["tokens_per_step"]
        end = total if hc.stop_after is None else min(total, hc.stop_after)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mode == "autocast-bf16"
                    else contextlib.nullcontext())
        terms = torch.compile(loss_terms, dynamic=False) if hc.compile_loss else loss_terms
        bar = tqdm(total=plan["tokens"], initial=start * tps, unit="tok", unit_scale=True, desc=f"heal ({hc.loss})",
                   disable=rank != 0, mininterval=2.0, file=sys.stderr)
        seconds, texts = 0.0, heldout_ids_for(tok, cfg) if hc.eval_every else {}

        def track(step: int) -> None:  # heal.eval_every: held-out perplexity after `step` steps (not timed)
            heldout.append(heldout_point(model, tok, texts, cfg, step, step * tps))
            bar.write(f"heal: step {step}: " + ", ".join(f"{t} ppl {r['ppl']:,.1f}" for t, r in
                                                         heldout[-1]["perplexity"].items()), file=sys.stderr)

        if texts and start == 0:
            track(0)
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, total, hc)
            for group in optim.param_groups:
                group["lr"] = lr
            rows = sampler.indices(sampler.position)
            batch = sampler.next_batch(data).to(device)
            loss, lm, kd = _losses(model, batch, rows, hc, teacher, topk, autocast, terms)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, hc.grad_clip)
            optim.step()
            optim.zero_grad(set_to_none=True)
            mean_loss, mean_lm, mean_kd = global_mean(loss.detach(), lm, kd)
            dt = time.perf_counter() - t0
            seconds += dt
            curve.append({"step": step + 1, "loss": mean_loss, "lm_loss": mean_lm, "kd_loss": mean_kd, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens": (step + 1) * tps, "seconds": dt})
            bar.update(tps)
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if texts and ((step + 1) % hc.eval_every == 0 or step + 1 == total):
                track(step + 1)
            if (step + 1) % hc.checkpoint_every == 0 or step + 1 == total:
                path = save_checkpoint(root, step + 1, model, optim, {
                    "step": step + 1, "sampler": sampler.state_dict(), "curve": curve, "heldout": heldout,
                    "fingerprint": fingerprint, "train_seconds": seconds_before + seconds}, hc.keep_checkpoints)
                if rank == 0 and step + 1 < total:
                    bar.write(f"heal: saved checkpoint {path}", file=sys.stderr)
        bar.close()
        if end < total:
            if rank == 0:
                print(f"heal: stopped after step {end} of {total} (heal.stop_after); rerun to resume", flush=True)
            return None
        # peak memory of loading + training + checkpoints, before the export's extra copies on rank 0
        peaks = [None] * world
        gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        dist.all_gather_object(peaks, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, gpu))
        full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result = None
        if rank == 0:
            export_weights(model_dir, full_sd, out_dir / "model")
            done = end - start
            steady = curve[max(start, 1):] or curve  # step 1 also allocates the AdamW state
            result = {
                "completed": True, "model_dir": str(model_dir), "healed_model": str(out_dir / "model"),
                "world_size": world, "backend": dist.get_backend(), "strategy": hc.strategy,
                "device": str(device), "compute": mode, "threads_per_rank": torch.get_num_threads(),
                "loss": hc.loss, "teacher": None if hc.loss == "lm" else {
                    "model": hc.teacher, "mode": hc.teacher_mode, "temperature": hc.kd_temperature,
                    "topk": hc.teacher_topk if hc.teacher_mode == "topk" else None},
                "params": counts, "plan": plan, "resumed_from_step": start if ckpt is not None else None,
                "final_checkpoint_kept": bool(hc.keep_final_checkpoint),
                "steps_this_run": done, "tokens_this_run": done * tps, "train_seconds": seconds,
                "tokens_per_s": done * tps / seconds if seconds > 0 else None,
                "tokens_per_s_steady": len(steady) * tps / sum(p["seconds"] for p in steady),
                "train_seconds_all_sessions": seconds_before + seconds,
                "wall_seconds": time.perf_counter() - t_start,
                "peak_rss_mib_per_rank": [p[0] for p in peaks], "peak_gpu_mib_per_rank": [p[1] for p in peaks],
                "first_loss": curve[0]["loss"], "final_loss": curve[-1]["loss"], "loss_curve": curve,
                **({"heldout_curve": heldout} if heldout else {})}
            save_results(out_dir / "heal.json", result, cfg, device=device)
            if not hc.keep_final_checkpoint:  # only now: the healed model and its record are whole
                shutil.rmtree(root, ignore_errors=True)
            print(f"heal: done, {done * tps:,} tokens in {seconds:.1f} s; healed model in {out_dir / 'model'}",
                  flush=True)
        dist.barrier()
        return result
    finally:
        if own_lock:
            release_lock(out_dir)
        dist.destroy_process_group()


# ---------------------------------------------------------------- launching
def launch(model_dir, out_dir, cfg: dict, nproc: int | None = None, stream=None) -> dict:
    """Run :func:`train` under ``torchrun --nproc_per_node=nproc`` in a subprocess, echoing its output
    live to ``stream`` (default stdout); return heal.json's data (or ``{"completed": False}`` after
    ``heal.stop_after``). An error raised in a rank comes back from the file it wrote
    (:func:`error_file`): bad input (a ValueError there) as :class:`HealError`, anything else as
    RuntimeError naming the rank and the error."""
    from .models import resolve_device

    hc = HealConfig.from_cfg(cfg)
    nproc, stream = int(nproc or hc.nproc), stream or sys.stdout
    device = resolve_device(hc.device)
    check_nproc(nproc, device)
    out_dir = Path(out_dir).resolve()
    acquire_lock(out_dir)  # one run per out_dir: a second one is refused while this one lives
    try:
        return _launch(model_dir, out_dir, cfg, nproc, stream, device)
    finally:
        release_lock(out_dir)


def _launch(model_dir, out_dir: Path, cfg: dict, nproc: int, stream, device) -> dict:
    cfg_file = out_dir / "heal_config.yaml"
    atomic_write_bytes(cfg_file, yaml.safe_dump(cfg, sort_keys=False).encode())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "compactify.heal", "--model-dir", str(model_dir), "--out-dir", str(out_dir),
           "--resolved-config", str(cfg_file)]
    shutil.rmtree(out_dir / "errors", ignore_errors=True)  # a previous attempt's
    env = dict(os.environ, COMPACTIFY_HEAL_LOCKED="1")
    if device.type == "cpu":  # one process per core: one thread each, or they fight for the cores
        env["OMP_NUM_THREADS"] = str(max(1, available_devices(device) // nproc))
    text = ""
    # torchrun gets SIGTERM (and stops its ranks) if this process dies, by any signal
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          preexec_fn=lambda: die_with_parent(signal.SIGTERM)) as proc:
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        shown = ThrottledLines(stream)
        try:
            while chunk := proc.stdout.read1(4096):
                piece = decoder.decode(chunk)
                shown.write(piece)
                text = (text + piece)[-100_000:]
            shown.flush()
            rc = proc.wait()
        except BaseException:  # a notebook interrupt (KeyboardInterrupt) or any error here: stop every rank
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        errors = [read_json(f) for f in sorted((out_dir / "errors").glob("rank*.json"))]
        bad = [e for e in errors if e["bad_input"]]
        if bad:
            raise HealError(bad[0]["message"])
        raise RuntimeError(f"healing failed (torchrun exit code {rc}): " + (
            f"rank {errors[0]['rank']}: {errors[0]['type']}: {errors[0]['message']}" if errors else text[-3000:]))
    result = out_dir / "heal.json"
    return read_json(result) if result.is_file() else {"completed": False, "out_dir": str(out_dir)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m compactify.heal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="model to heal: a (compressed) model dir, or 'embedded'")
    ap.add_argument("--out-dir", required=True, help="checkpoints/, model/ and heal.json go here")
    ap.add_argument("--config", default=None, help="config YAML, e.g. configs/smoke.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. heal.steps=5")
    ap.add_argument("--resolved-config", default=None, help=argparse.SUPPRESS)  # launch(): a config validated already
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    if "RANK" in os.environ:  # a torchrun rank: die with its agent, whatever kills it
        die_with_parent(signal.SIGKILL)
    try:
        if args.resolved_config:  # as launch() validated it (defaults may be edited while a run starts)
            cfg = yaml.safe_load(Path(args.resolved_config).read_text())
        else:
            cfg = load_config(args.config, parse_overrides(args.set))
        train(args.model_dir, args.out_dir, cfg)
    except BaseException as e:  # recorded for launch(); bad input (ConfigError, HealError, ModelLoadError) needs no traceback
        if isinstance(e, (SystemExit, KeyboardInterrupt)):  # (BaseException: DCP's CheckpointException is one)
            raise
        bad_input = isinstance(e, ValueError)
        write_json(error_file(args.out_dir, rank), {"rank": int(rank), "type": type(e).__name__, "message": str(e),
                                                    "bad_input": bad_input})
        print(f"heal: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if bad_input:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
