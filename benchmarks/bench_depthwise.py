"""How fast the x2z depthwise 7x7 convolutions run for their work, forward and forward + backward.

The x2z of every latent stage adds a depthwise 7x7 convolution of the feature map (the ``dwc`` switch).
Its work is small (49 multiply-adds per pixel and channel), but the CPU runs it, and above all its
backward, at a fraction of the rate of the backbone's dense convolutions. This prints both rates on the
maps of ``--model`` at ``--size`` px, in one process:

    python benchmarks/bench_depthwise.py                     # reg800m_perceiver_t128, 224 px, batch 16
    python benchmarks/bench_depthwise.py --threads 1 --nchw  # one thread, NCHW maps
    python benchmarks/bench_depthwise.py --pooled            # also x2z's pool(dwc(x) + x), plain and strided

Rates are multiply-adds per second, counting a backward as twice the forward's work (input and weight
gradients).

``--pooled`` times, on each map, x2z's pool(dwc(x) + x) computed plainly (the full-size convolution, then
the pooling) and as the one strided depthwise convolution the model runs on maps whose pooling cells are at
least ``MIN_CELL`` pixels (``dynexit/models/pooled_depthwise.py``), forward alone and forward + backward
(autograd's, both), and compares the gradients.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from bench_time_vs_work import interleaved
from torch import nn

from dynexit import create_model
from dynexit.models.pooled_depthwise import MIN_CELL, pooling_cell, strided_pooled_depthwise


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, timed in turn after one warm-up run."""
    return {name: seconds * 1e3 for name, seconds in interleaved(fns, repeats, warmup=1).items()}


def stage_maps(model_name: str, size: int) -> tuple[list[tuple[nn.Conv2d, tuple[int, int, int]]], int]:
    """Each x2z depthwise convolution of the model with the (C, H, W) of the map it reads, and the token
    grid its x2z pools to."""
    model = create_model(model_name, input_size=size).eval()
    shapes: list[tuple[int, int, int]] = []
    convs = [st.x2z.dwc for st in model.latent_stages if st.x2z is not None and st.x2z.dwc is not None]
    handles = [c.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape[1:]))) for c in convs]
    with torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return list(zip(convs, shapes)), model.config.token_grid


def pooled_rows(dwc: nn.Conv2d, shape: tuple[int, int, int], grid: int, batch: int, fmt,
                repeats: int) -> tuple[str, dict[str, float]]:
    """x2z's pool(dwc(x) + x), plain and as one strided convolution, forward (no grad) and forward + backward:
    the printed line and the milliseconds of each."""
    c, h, w = shape
    if h % grid or w % grid:
        return f"{str(shape):>18}   uneven cells: plain path only", {}
    cell = (h // grid, w // grid)
    conv = dwc.train().to(memory_format=fmt)
    x = torch.randn(batch, c, h, w).contiguous(memory_format=fmt).requires_grad_()
    upstream = torch.randn(batch, c, grid, grid)
    ways = {"plain": lambda: F.adaptive_avg_pool2d(conv(x) + x, grid),
            "strided": lambda: strided_pooled_depthwise(x, conv, cell)}
    grads = {n: torch.autograd.grad((f() * upstream).sum(), (x, conv.weight, conv.bias)) for n, f in ways.items()}
    diff = [((a - b).abs().max() / a.abs().max()).item() for a, b in zip(grads["plain"], grads["strided"])]

    def no_grad(f):
        def run():
            with torch.no_grad():
                f()
        return run

    fns = {**{f"{n} fwd": no_grad(f) for n, f in ways.items()},
           **{f"{n} fwd+bwd": lambda f=f: f().backward(upstream) for n, f in ways.items()}}
    ms = median_ms(fns, repeats)
    taken = "yes" if pooling_cell(x, conv, grid) is not None else "no"
    return (f"{str(shape):>18} {str(cell):>8} {taken:>6} {ms['plain fwd']:>9.2f} {ms['strided fwd']:>11.2f} "
            f"{ms['plain fwd+bwd']:>13.1f} {ms['strided fwd+bwd']:>15.1f}   "
            f"{diff[0]:.0e} / {diff[1]:.0e} / {diff[2]:.0e}"), ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reg800m_perceiver_t128")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nchw", action="store_true", help="NCHW maps (default channels_last)")
    parser.add_argument("--pooled", action="store_true",
                        help="also time x2z's pool(dwc(x) + x), plain and as one strided convolution")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.threads} threads, "
          f"{'NCHW' if args.nchw else 'channels_last'}; medians of {args.repeats}; GMAC/s")
    print(f"{'map (C, H, W)':>18} {'conv':>15} {'fwd ms':>8} {'fwd rate':>8} {'fwd+bwd ms':>10} {'fwd+bwd rate':>12}")
    totals = {"depthwise 7x7": [0.0, 0.0], "dense 1x1": [0.0, 0.0]}
    maps, grid = stage_maps(args.model, args.size)
    for dwc, (c, h, w) in maps:
        # A dense 1x1 convolution of the same map: the backbone's kind of work, for comparison.
        for name, conv, macs_per_pixel in (("depthwise 7x7", dwc, 49), ("dense 1x1", nn.Conv2d(c, c, 1), c)):
            conv = conv.train().to(memory_format=fmt)
            x = torch.randn(args.batch, c, h, w).contiguous(memory_format=fmt).requires_grad_()
            macs = args.batch * c * h * w * macs_per_pixel

            def forward(conv=conv, x=x):
                with torch.no_grad():
                    conv(x)

            def forward_backward(conv=conv, x=x):
                y = conv(x)
                y.backward(torch.ones_like(y))

            fwd, both = median_ms({"fwd": forward, "both": forward_backward}, args.repeats).values()
            totals[name][0] += both
            totals[name][1] += 3 * macs
            print(f"{str((c, h, w)):>18} {name:>15} {fwd:>8.1f} {macs / fwd / 1e6:>8.1f} {both:>10.1f} "
                  f"{3 * macs / both / 1e6:>12.1f}")
    for name, (ms, macs) in totals.items():
        print(f"all maps, {name}: forward + backward {ms:.1f} ms at {macs / ms / 1e6:.1f} GMAC/s")
    if args.pooled:
        print(f"\nx2z's pool(dwc(x) + x) to {grid}x{grid} in ms, plain and as one strided convolution (taken: "
              f"whether the model takes it, cells of {MIN_CELL}+ pixels); gradients' largest difference relative "
              f"to the plain path's largest (input / weight / bias)")
        print(f"{'map (C, H, W)':>18} {'cell':>8} {'taken':>6} {'plain fwd':>9} {'strided fwd':>11} "
              f"{'plain fwd+bwd':>13} {'strided fwd+bwd':>15}   differences")
        total: dict[str, float] = defaultdict(float)
        for dwc, shape in maps:
            line, ms = pooled_rows(dwc, shape, grid, args.batch, fmt, args.repeats)
            print(line)
            for name, value in ms.items():
                total[name] += value
        print("all maps with even cells: " + ", ".join(f"{n} {v:.1f} ms" for n, v in total.items()))


if __name__ == "__main__":
    main()
