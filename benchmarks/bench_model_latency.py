"""Eval-mode CPU latency of a Dyn-Perceiver preset against its bare torchvision backbone.

Both models are timed in the same process, interleaved (one timing of each in turn), under
torch.inference_mode with a fixed number of threads; the figure is the median of the repeats after
warm-up, and the ratio compares the two medians. The FLOPs ratio is printed for reference.

    python benchmarks/bench_model_latency.py                      # reg800m_perceiver_t128 vs regnet_y_800mf
    python benchmarks/bench_model_latency.py --batch-sizes 1 32 --threads 2 --repeats 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import dynexit


def time_once(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reg800m_perceiver_t128")
    parser.add_argument("--baseline", default="regnet_y_800mf", help="torchvision model name")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = dynexit.create_model(args.model, input_size=args.input_size).eval()
    base = getattr(torchvision.models, args.baseline)().eval()
    print(f"{args.model} vs torchvision {args.baseline}, {args.input_size} px, {args.threads} threads, "
          f"median of {args.repeats} after {args.warmup} warm-up runs")
    print(f"{'batch':>5} {'dynexit ms':>11} {'baseline ms':>12} {'ratio':>6}")
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.input_size, args.input_size)
            for _ in range(args.warmup):
                ours(x), base(x)
            t_ours, t_base = [], []
            for _ in range(args.repeats):
                t_ours.append(time_once(ours, x))
                t_base.append(time_once(base, x))
            m_ours, m_base = statistics.median(t_ours) * 1e3, statistics.median(t_base) * 1e3
            print(f"{batch:>5} {m_ours:>11.1f} {m_base:>12.1f} {m_ours / m_base:>6.2f}")


if __name__ == "__main__":
    main()
