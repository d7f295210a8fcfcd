"""Training-step throughput of Dyn-Perceiver against its bare backbone, on the CPU, in one process.

A step is forward + loss + backward + AdamW step. The Dyn-Perceiver step uses the training loss of
``dynexit.training`` (four exits, README weights, self-distillation); the baseline is torchvision's
``regnet_y_800mf`` with cross-entropy on its single exit and the same optimizer. The figure of merit is
the ratio baseline img/s / Dyn-Perceiver img/s (official code: 2.09 at 224 px, batch 16; 3.31 at 64 px,
batch 64; target: 1.7 or less). The two models are timed in alternation, step by step, so that load
from other processes hits both alike; medians are reported.

    python benchmarks/bench_train_speed.py                      # both settings, channels_last and NCHW
    python benchmarks/bench_train_speed.py --sizes 64 --steps 8 --profile
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from dynexit import create_model
from dynexit.config import TrainConfig
from dynexit.training import MultiExitLoss
from dynexit.training.optim import build_optimizer

BATCH = {224: 16, 64: 64}
OFFICIAL = {224: 2.09, 64: 3.31}
MODEL = "reg800m_perceiver_t128"


def make_step(model, loss_fn, images, labels, cfg):
    optimizer = build_optimizer(model, cfg)

    def step() -> None:
        out = model(images)
        loss = loss_fn(out if isinstance(out, list) else [out], labels).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(size: int, batch: int, steps: int, channels_last: bool) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = TrainConfig()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,))
    perceiver = create_model(MODEL, input_size=size).to(memory_format=fmt).train()
    baseline = torchvision.models.regnet_y_800mf().to(memory_format=fmt).train()
    loss = MultiExitLoss(perceiver.exit_names, cfg.loss_weights, cfg.distill_alpha, cfg.distill_temperature)
    plain = MultiExitLoss(("cnn",))
    runs = {"perceiver": make_step(perceiver, loss, images, labels, cfg),
            "baseline": make_step(baseline, plain, images, labels, cfg)}
    for step in runs.values():  # warm-up: allocator, oneDNN primitive caches
        step()
        step()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, step in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ips = {name: batch / statistics.median(t) for name, t in wall.items()}
    cpu_s = {name: statistics.median(t) for name, t in cpu.items()}
    return {"perceiver_ips": ips["perceiver"], "baseline_ips": ips["baseline"],
            "ratio": ips["baseline"] / ips["perceiver"], "cpu_ratio": cpu_s["perceiver"] / cpu_s["baseline"]}


def flop_ratio(size: int) -> float:
    """Forward FLOPs of Dyn-Perceiver / regnet_y_800mf for one image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randn(1, 3, size, size)
    flops = []
    for model in (create_model(MODEL, input_size=size), torchvision.models.regnet_y_800mf()):
        with FlopCounterMode(display=False) as counter:
            model.eval()(images)
        flops.append(counter.get_total_flops())
    return flops[0] / flops[1]


def profile(size: int, batch: int, channels_last: bool, steps: int = 3) -> None:
    """The operators that dominate a Dyn-Perceiver step, and the step time without each component."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = TrainConfig()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,))
    model = create_model(MODEL, input_size=size).to(memory_format=fmt)
    loss = MultiExitLoss(model.exit_names, cfg.loss_weights, cfg.distill_alpha, cfg.distill_temperature)
    step = make_step(model, loss, images, labels, cfg)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=36, max_shapes_column_width=70))
    print(f"step time without one component ({size} px, batch {batch}):")
    for label, overrides in [("full model", {}), ("no dwc", {"dwc": False}), ("no z2x", {"z2x": False}),
                             ("no x2z", {"x2z": False}), ("no last CA", {"last_ca": False}),
                             ("backbone only (static)", {"static": True})]:
        torch.manual_seed(0)
        variant = create_model(MODEL, input_size=size, **overrides).to(memory_format=fmt)
        names = variant.exit_names
        fn = MultiExitLoss(names, {k: v for k, v in cfg.loss_weights.items() if k in names}, cfg.distill_alpha)
        run = make_step(variant, fn, images, labels, cfg)
        run()
        t = []
        for _ in range(steps):
            t0 = time.perf_counter()
            run()
            t.append(time.perf_counter() - t0)
        print(f"  {label:24s} {statistics.median(t) * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64], choices=sorted(BATCH))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--format", choices=["channels_last", "nchw", "both"], default="both")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also profile the Dyn-Perceiver step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = {"both": [True, False], "channels_last": [True], "nchw": [False]}[args.format]
    print(f"{MODEL} vs torchvision regnet_y_800mf, training step on CPU ({torch.get_num_threads()} threads)")
    print("ratio = regnet img/s / perceiver img/s (wall clock); cpu ratio = the same from CPU time per step,")
    print("which is steadier when other processes share the machine")
    print(f"{'size':>4} {'batch':>5} {'format':>13} {'perceiver img/s':>16} {'regnet img/s':>13} "
          f"{'ratio':>6} {'cpu ratio':>9} {'flop ratio':>10} {'official':>8}")
    for size in args.sizes:
        flops = flop_ratio(size)
        for channels_last in formats:
            r = measure(size, BATCH[size], args.steps, channels_last)
            print(f"{size:>4} {BATCH[size]:>5} {'channels_last' if channels_last else 'nchw':>13} "
                  f"{r['perceiver_ips']:>16.1f} {r['baseline_ips']:>13.1f} {r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f} "
                  f"{flops:>10.2f} {OFFICIAL[size]:>8.2f}",
                  flush=True)
    if args.profile:
        for size in args.sizes:
            profile(size, BATCH[size], channels_last=formats[0])


if __name__ == "__main__":
    main()
