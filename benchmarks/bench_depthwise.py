"""How fast the x2z depthwise 7x7 convolutions run for their work, forward and forward + backward.

The x2z of every latent stage adds a depthwise 7x7 convolution of the feature map (the ``dwc`` switch).
Its work is small (49 multiply-adds per pixel and channel), but the CPU runs it, and above all its
backward, at a fraction of the rate of the backbone's dense convolutions. This prints both rates on the
maps of ``--model`` at ``--size`` px, in one process:

    python benchmarks/bench_depthwise.py                     # reg800m_perceiver_t128, 224 px, batch 16
    python benchmarks/bench_depthwise.py --threads 1 --nchw  # one thread, NCHW maps

Rates are multiply-adds per second, counting a backward as twice the forward's work (input and weight
gradients).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dynexit import create_model


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def stage_maps(model_name: str, size: int) -> list[tuple[nn.Conv2d, tuple[int, int, int]]]:
    """Each x2z depthwise convolution of the model with the (C, H, W) of the map it reads."""
    model = create_model(model_name, input_size=size).eval()
    shapes: list[tuple[int, int, int]] = []
    convs = [st.x2z.dwc for st in model.latent_stages if st.x2z is not None and st.x2z.dwc is not None]
    handles = [c.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape[1:]))) for c in convs]
    with torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return list(zip(convs, shapes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reg800m_perceiver_t128")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nchw", action="store_true", help="NCHW maps (default channels_last)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.threads} threads, "
          f"{'NCHW' if args.nchw else 'channels_last'}; medians of {args.repeats}; GMAC/s")
    print(f"{'map (C, H, W)':>18} {'conv':>15} {'fwd ms':>8} {'fwd rate':>8} {'fwd+bwd ms':>10} {'fwd+bwd rate':>12}")
    totals = {"depthwise 7x7": [0.0, 0.0], "dense 1x1": [0.0, 0.0]}
    for dwc, (c, h, w) in stage_maps(args.model, args.size):
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

            fwd, both = median_ms(forward, args.repeats), median_ms(forward_backward, args.repeats)
            totals[name][0] += both
            totals[name][1] += 3 * macs
            print(f"{str((c, h, w)):>18} {name:>15} {fwd:>8.1f} {macs / fwd / 1e6:>8.1f} {both:>10.1f} "
                  f"{3 * macs / both / 1e6:>12.1f}")
    for name, (ms, macs) in totals.items():
        print(f"all maps, {name}: forward + backward {ms:.1f} ms at {macs / ms / 1e6:.1f} GMAC/s")


if __name__ == "__main__":
    main()
