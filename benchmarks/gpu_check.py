"""GPU check for the fusion model: speed, fractional trials, DDP, CPU/GPU agreement.

Needs a CUDA GPU; without one it says so and exits 0 (so CI can call it). One run takes a few
minutes on an H200 and prints a JSON line last with every figure:

(d) agreement: the same weights on CPU and GPU (eval, fp32, TF32 off) score one fixed batch;
    the max abs difference of the logits must stay under ``--tolerance``.
(a) throughput: AMP (bf16 where supported, else fp16 + GradScaler) + channels_last training
    of the dual ResNet-18 late-fusion model at 224 and 512 px on random tensors: pairs/s and
    achieved FLOP/s = 3 × forward FLOPs (counted by torch's FlopCounterMode) × pairs/s,
    as a fraction of the device's dense bf16 peak (table below; "unknown" elsewhere).
(b) fractional GPUs: 4 Ray Tune trials × 0.25 GPU, each a short timed training run; reports
    the wall time and how many trials ran at once (4 means all shared the one GPU).
(c) Ray Train: a TorchTrainer with the NCCL backend on every GPU present (even 1): a few DDP
    steps plus an all-reduce check.

Each section is independent: a failure (or Ray missing) is recorded in the JSON and the others
still run. ``--deadline`` (default 480 s) stops the run and prints what was measured so far.
``--dry-run-cpu`` runs every section on the CPU at toy sizes (gloo instead of NCCL, no GPU
fractions): for checking the script itself on a machine without a GPU, not for figures.
Ray is not in every GPU image: without it (b) and (c) report ``skipped``. Nothing is
downloaded (random tensors, random-init weights). Expected on an H200: ~3 minutes, most of it
process and Ray start-up.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --sizes 224 --steps 10 --skip-ray
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")
sys.path.insert(0, PLATFORM)

# Dense bf16 tensor-core peaks (vendor datasheets, FLOP/s, no sparsity). First match wins, so
# more specific names come first.
BF16_PEAKS = [
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


class Deadline(Exception):
    """Raised by SIGALRM when ``--deadline`` seconds have passed."""


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAKS if key in name), None)


def build_fusion():
    from breastfusion.models.fusion import build_model

    return build_model("fusion", "resnet18", "resnet18", fusion="sum")


def amp_setup(device):
    """(autocast dtype, GradScaler or None): bf16 needs no loss scaling; fp16 does."""
    import torch

    if device.type != "cuda":
        return torch.bfloat16, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def train_steps(model, opt, batch, steps: int, device, dtype, scaler) -> None:
    """``steps`` AMP training steps on one fixed batch (random tensors: speed, not learning)."""
    import torch

    dm, us, y = batch
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(dm, us), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()


def random_batch(n: int, size: int, device, channels_last: bool, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dm, us = (torch.rand(n, 1, size, size, generator=g) for _ in range(2))
    y = torch.arange(n) % 2
    return (
        dm.to(device, memory_format=fmt),
        us.to(device, memory_format=fmt),
        y.to(device),
    )


def forward_flops(model, size: int, device) -> int:
    """FLOPs of one forward pass of one pair (multiply-add = 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dm, us, _ = random_batch(1, size, device, channels_last=False)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()  # BatchNorm refuses a batch of one in training mode; FLOPs are the same
    with torch.no_grad(), counter:
        model(dm, us)
    model.train(was_training)
    return int(counter.get_total_flops())


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(size: int, batch: int, steps: int, device) -> dict:
    """(a) one size: pairs/s of AMP + channels_last training and its share of the bf16 peak."""
    import torch

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_fusion().to(device).to(memory_format=torch.channels_last).train()
    flops = forward_flops(model, size, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype, scaler = amp_setup(device)
    data = random_batch(batch, size, device, channels_last=True)
    train_steps(model, opt, data, max(3, steps // 3), device, dtype, scaler)  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train_steps(model, opt, data, steps, device, dtype, scaler)
    sync(device)
    seconds = time.perf_counter() - t0
    pairs_s = batch * steps / seconds
    achieved = 3 * flops * pairs_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = bf16_peak(name)
    return {
        "size": size,
        "batch": batch,
        "steps": steps,
        "amp_dtype": str(dtype).replace("torch.", ""),
        "grad_scaler": scaler is not None,
        "channels_last": True,
        "seconds": seconds,
        "pairs_per_s": pairs_s,
        "forward_gflop_per_pair": flops / 1e9,
        "achieved_tflop_s": achieved / 1e12,
        "bf16_peak_tflop_s": peak / 1e12 if peak else "unknown",
        "fraction_of_bf16_peak": achieved / peak if peak else "unknown",
        "max_memory_gb": (
            torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        ),
    }


def agreement(size: int, batch: int, tolerance: float, device) -> dict:
    """(d) CPU vs ``device`` logits on one fixed batch, same weights, eval mode, fp32."""
    import copy

    import torch

    torch.manual_seed(0)
    model = build_fusion().eval()
    dm, us, _ = random_batch(batch, size, torch.device("cpu"), channels_last=False, seed=1)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            cpu = model(dm, us)
            other = copy.deepcopy(model).to(device)(dm.to(device), us.to(device)).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff = float((cpu - other).abs().max())
    score_diff = float((cpu.softmax(1)[:, 1] - other.softmax(1)[:, 1]).abs().max())
    return {
        "size": size,
        "batch": batch,
        "max_abs_logit_diff": diff,
        "max_abs_score_diff": score_diff,
        "logit_scale": float(cpu.abs().max()),
        "tolerance": tolerance,
        "agree": diff <= tolerance,
    }


# --- driver -------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="224,512", help="throughput sizes, px (comma-separated)")
    p.add_argument("--batches", default="256,64", help="batch per throughput size")
    p.add_argument("--steps", type=int, default=50, help="timed steps per throughput size")
    p.add_argument("--trials", type=int, default=4, help="fractional trials (GPU 1/trials each)")
    p.add_argument("--trial-size", type=int, default=224)
    p.add_argument("--trial-batch", type=int, default=64)
    p.add_argument("--trial-seconds", type=float, default=20.0, help="training time per trial")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs logit diff (d)")
    p.add_argument("--skip-ray", action="store_true", help="only sections (a) and (d)")
    p.add_argument("--deadline", type=int, default=480, help="seconds before stopping")
    p.add_argument("--dry-run-cpu", action="store_true", help="toy sizes on the CPU, no figures")
    args = p.parse_args(argv)
    if args.dry_run_cpu:
        args.sizes, args.batches, args.steps = "32", "4", 2
        args.trial_size, args.trial_batch, args.trial_seconds = 32, 4, 2.0
    return args


def section(report: dict, key: str, fn, *a) -> None:
    """Run one section; record its result or its error (the other sections still run)."""
    t0 = time.perf_counter()
    try:
        report[key] = fn(*a)
        print(f"{key}: {json.dumps(report[key], default=str)}", flush=True)
    except Deadline:
        raise
    except Exception as exc:
        traceback.print_exc()
        report[key] = {"error": f"{type(exc).__name__}: {exc}"}
    report.setdefault("section_seconds", {})[key] = time.perf_counter() - t0


def run_sections(args: argparse.Namespace, report: dict, device, gpu: bool) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    section(report, "d_cpu_gpu_agreement", agreement, 224 if gpu else 32, 8, args.tolerance, device)
    for size, batch in zip(sizes, batches, strict=True):
        section(report, f"a_throughput_{size}", throughput, size, batch, args.steps, device)
    if args.skip_ray:
        report["b_fractional_trials"] = report["c_ray_train_nccl"] = {"skipped": "--skip-ray"}
        return
    from gpu_check_ray import fractional_trials, ray_train_ddp, start_ray

    try:
        start_ray()
    except ImportError as exc:
        report["b_fractional_trials"] = report["c_ray_train_nccl"] = {
            "skipped": f"ray is not installed ({exc})"
        }
        return
    import ray

    with tempfile.TemporaryDirectory(prefix="bf-gpu-check-") as storage:
        try:
            section(report, "b_fractional_trials", fractional_trials, args, gpu, storage)
            section(report, "c_ray_train_nccl", ray_train_ddp, args, gpu, storage)
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.dry_run_cpu:
        print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
        print(json.dumps({"cuda": False, "skipped": "no CUDA GPU"}))
        return 0
    device = torch.device("cuda" if gpu else "cpu")
    report: dict = {
        "cuda": gpu,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "bf16_supported": bool(gpu and torch.cuda.is_bf16_supported()),
    }

    def on_alarm(signum, frame):
        raise Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.deadline)
    t0 = time.perf_counter()
    try:
        run_sections(args, report, device, gpu)
    except Deadline:
        report["deadline_hit"] = f"stopped after {args.deadline} s; later sections not run"
    finally:
        signal.alarm(0)
    report["total_s"] = time.perf_counter() - t0
    print(json.dumps(report, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
