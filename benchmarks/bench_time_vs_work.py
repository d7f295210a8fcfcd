"""Does time track work? Dyn-Perceiver against its bare backbone: time ratio / work ratio.

Work is fvcore's multiply-adds of one image (``dynexit.costs``: ``count_costs`` for the Dyn-Perceiver's
full model, ``count_macs`` for the torchvision baseline, the same op handles for both). Both run in turn,
in rounds, in one process: eval under inference_mode at batch 1 (``--eval-batch``), and a training step
(forward, the multi-exit loss, backward, AdamW) at ``--train-batch``. Times printed are medians; the time
ratio is the median of the rounds' ratios, which this VM's drifting speed moves less. A quotient of
1.0 means the Dyn-Perceiver's extra time is exactly its extra work; the target is at most 1.1. With ``--compile``
both models also run through ``torch.compile`` (compilation time printed, outputs checked against eager).

    python benchmarks/bench_time_vs_work.py                       # eager, 224 px, 2 threads
    python benchmarks/bench_time_vs_work.py --compile both        # eager and compiled
    python benchmarks/bench_time_vs_work.py --what eval --compile yes   # compiled eval only (compiling takes minutes)
    python benchmarks/bench_time_vs_work.py --breakdown           # where the eval time goes, per component
    python benchmarks/bench_time_vs_work.py --what eval --caches both   # also eval with the caches evicted
    python benchmarks/bench_time_vs_work.py --x2z both            # also x2z's plain depthwise path, interleaved
    python benchmarks/bench_time_vs_work.py --what eval --eval-batch 1 8     # eval at batch 1 and at batch 8

The model computes x2z's depthwise convolution through its pooling, as one strided convolution, on the maps
where it does so (``dynexit/models/pooled_depthwise.py``); ``--x2z both`` also times, interleaved, every row
with the plain convolution everywhere.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
import torchvision
from bench_train_speed import make_step
from torch import nn

import dynexit.models.pooled_depthwise as pooled_depthwise
from dynexit import create_model
from dynexit.config import TrainConfig
from dynexit.costs import count_costs, count_macs
from dynexit.models.base import State
from dynexit.training import MultiExitLoss

# Read before each timed call with --caches cold, so that what a model reads next comes from memory: 8x the
# 32 MiB last-level cache of the machine the README's figures come from (raise it for a larger cache).
EVICTION_BYTES = 256 * 2**20


def interleaved_times(fns: dict, repeats: int, warmup: int, cold: bool = False) -> dict[str, list[float]]:
    """Seconds of each callable per round, timed in turn so that load from other processes hits all alike.
    With ``cold`` the caches are evicted before each timed call (untimed)."""
    buffer = torch.ones(EVICTION_BYTES // 4) if cold else None
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            if cold:
                buffer.sum()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turn (``interleaved_times``)."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats, warmup).items()}


def row(times: dict[str, list[float]], note: str) -> dict:
    """Medians in ms, and the time ratio of each variant of ours to the baseline as the median of the ratios
    within each round: this VM's speed drifts by up to 2x between seconds, and a round sees one speed."""
    out = {"base_ms": statistics.median(times["base"]) * 1e3, "note": note}
    for name in times:
        if name != "base":
            out[f"{name}_ms"] = statistics.median(times[name]) * 1e3
            out[f"{name}_ratio"] = statistics.median([a / b for a, b in zip(times[name], times["base"])])
    return out


def with_plain_x2z(fn):
    """``fn`` with x2z's depthwise convolution run plainly (full map, then pooling) on every map."""
    def run():
        saved, pooled_depthwise.MIN_CELL = pooled_depthwise.MIN_CELL, float("inf")
        try:
            return fn()
        finally:
            pooled_depthwise.MIN_CELL = saved
    return run


def compiled(model: torch.nn.Module, example: torch.Tensor, train: bool) -> tuple[torch.nn.Module, float]:
    """``torch.compile(model)``, compiled on ``example`` (the seconds that took are returned)."""
    fast = torch.compile(model)
    t0 = time.perf_counter()
    if train:
        out = fast(example)
        sum(o.float().sum() for o in (out if isinstance(out, list) else [out])).backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode():
            fast(example)
    return fast, time.perf_counter() - t0


def eval_row(ours, base, size: int, batch: int, fmt, compile_: bool, repeats: int, warmup: int,
             plain_x2z: bool = False, cold: bool = False) -> dict:
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    note = ""
    if compile_:
        with torch.inference_mode():
            eager = ours(x)
        ours, t_ours = compiled(ours, x, train=False)
        base, t_base = compiled(base, x, train=False)
        with torch.inference_mode():
            diff = max((a - b).abs().max().item() for a, b in zip(eager, ours(x)))
        note = f"compiled in {t_ours:.0f} + {t_base:.0f} s; max |compiled - eager| {diff:.1e}"
    fns = {"ours": lambda: ours(x), "base": lambda: base(x)}
    if plain_x2z:
        fns["plain x2z"] = with_plain_x2z(fns["ours"])
    with torch.inference_mode():
        return row(interleaved_times(fns, repeats, warmup, cold), note)


def train_row(ours, base, size: int, batch: int, fmt, compile_: bool, repeats: int, warmup: int,
              plain_x2z: bool = False) -> dict:
    cfg = TrainConfig()
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,))
    loss = MultiExitLoss(ours.exit_names, cfg.loss_weights, cfg.distill_alpha, cfg.distill_temperature)
    plain = MultiExitLoss(("cnn",))
    ours.train(), base.train()
    note = ""
    if compile_:
        ours_c, t_ours = compiled(ours, images, train=True)
        base_c, t_base = compiled(base, images, train=True)
        note = f"compiled in {t_ours:.0f} + {t_base:.0f} s"
        ours, base = ours_c, base_c
    steps = {"ours": make_step(ours, loss, images, labels, cfg), "base": make_step(base, plain, images, labels, cfg)}
    if plain_x2z:
        steps["plain x2z"] = with_plain_x2z(steps["ours"])
    return row(interleaved_times(steps, repeats, warmup), note)


def op_calls(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Operator calls of one forward under inference_mode, every dispatcher level (torch.profiler)."""
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile() as prof:
            model(x)
    return sum(event.count for event in prof.key_averages())


def forwards_at_batch_1(model: torch.nn.Module, size: int, fmt, repeats: int, reset) -> None:
    """One warm-up eval forward of one image, ``reset()`` (of what hooks recorded), then ``repeats`` more."""
    x = torch.randn(1, 3, size, size).contiguous(memory_format=fmt)
    with torch.inference_mode():
        model(x)
        reset()
        for _ in range(repeats):
            model(x)


def breakdown(model: torch.nn.Module, size: int, fmt, repeats: int) -> None:
    """Eval time at batch 1 per top-level part of the model (forward hooks), against its fvcore work."""
    costs = count_costs(model, size)
    parts = {"cnn stem": model.backbone.stem,
             **{f"cnn stage {k + 1}": st for k, st in enumerate(model.backbone.stages)},
             **{f"latent stage {k + 1}": st for k, st in enumerate(model.latent_stages)},
             **{f"exit {n}": e for n, e in model.exits.items()}}
    spent: dict[str, list[float]] = defaultdict(list)
    starts: dict[str, float] = {}
    for name, module in parts.items():
        module.register_forward_pre_hook(lambda _m, _a, n=name: starts.__setitem__(n, time.perf_counter()))
        module.register_forward_hook(lambda _m, _a, _o, n=name: spent[n].append(time.perf_counter() - starts[n]))
    forwards_at_batch_1(model, size, fmt, repeats, spent.clear)
    total = sum(statistics.median(t) for t in spent.values())
    print(f"\nwhere eval time goes at batch 1 (hooks; {total * 1e3:.1f} ms in these parts); work by component "
          f"(fvcore): " + ", ".join(f"{c} {m / 1e6:.0f}M" for c, m in costs.component_macs.items()))
    print(f"{'part':>18} {'ms':>7} {'share':>6}")
    for name, t in spent.items():
        ms = statistics.median(t) * 1e3
        print(f"{name:>18} {ms:>7.2f} {ms / (total * 1e3):>6.1%}")


def backbone_alone(ours, base, work: float, size: int, fmt, repeats: int, warmup: int) -> None:
    """Eval at batch 1 of the model, of its backbone alone (stem, stages, CNN exit) and of the baseline, in
    turn: what the latent branch adds, against what a time/work of 1.1 would allow it."""
    x = torch.randn(1, 3, size, size).contiguous(memory_format=fmt)

    def cnn_only():
        y = ours.backbone.stem(x)
        for stage in ours.backbone.stages:
            y = stage(y)
        return ours.exits["cnn"](State(y, y.new_zeros(1, 0, 0), ()))

    with torch.inference_mode():
        ms = {n: t * 1e3 for n, t in interleaved({"ours": lambda: ours(x), "backbone": cnn_only,
                                                   "base": lambda: base(x)}, repeats, warmup).items()}
    latent_params = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("backbone."))
    attn_params = sum(p.numel() for st in ours.latent_stages for p in st.self_attn.parameters())
    print(f"\nat batch 1: model {ms['ours']:.1f} ms, its backbone alone {ms['backbone']:.1f} ms, the baseline "
          f"{ms['base']:.1f} ms; the latent branch adds {ms['ours'] - ms['backbone']:.1f} ms where a time/work of "
          f"1.1 allows {(1.1 * work - 1) * ms['base']:.1f} ms; its parameters {latent_params / 1e6:.1f} M "
          f"({latent_params * 4 / 1e6:.0f} MB in float32), {attn_params / 1e6:.1f} M in the self-attention layers")


def time_by_kind(model: torch.nn.Module, size: int, fmt, repeats: int) -> None:
    """Eval time at batch 1 of the latent branch and exits by kind of module: each module's own time (forward
    hooks; the time of its children taken out), summed over modules of a class. The hooks themselves add a few
    microseconds per call."""
    own: dict[str, float] = defaultdict(float)
    starts: list[float] = []
    children_time: list[float] = []

    def pre(_m, _a):
        starts.append(time.perf_counter())
        children_time.append(0.0)

    def post(module, _a, _o):
        spent = time.perf_counter() - starts.pop()
        own[type(module).__name__] += spent - children_time.pop()
        if children_time:
            children_time[-1] += spent

    # Not the backbone, nor x2z's depthwise convolutions: with a hook on them x2z takes its plain path.
    watched = [m for n, m in model.named_modules() if n and "backbone" not in n and not n.endswith(".dwc")]
    handles = [m.register_forward_pre_hook(pre) for m in watched] + [m.register_forward_hook(post) for m in watched]
    forwards_at_batch_1(model, size, fmt, repeats, own.clear)
    for h in handles:
        h.remove()
    total_ms = sum(own.values()) / repeats * 1e3
    print(f"\nlatent branch and exits at batch 1 by kind of module, own time (hooks; {total_ms:.1f} ms in all):")
    for kind, seconds in sorted(own.items(), key=lambda kv: -kv[1])[:10]:
        print(f"{kind:>22} {seconds / repeats * 1e3:>7.2f} ms")


def linear_replay(model: torch.nn.Module, size: int, fmt, repeats: int) -> None:
    """The latent branch's and exits' Linear layers at batch 1, replayed outside the model on the inputs they
    saw: once each in the model's order (weights come from memory, as in the model: the branch's parameters
    exceed the last-level cache), and each run twice in a row, timing the second (weights in cache). The
    difference is what reading the weights costs these small-row matmuls."""
    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("backbone.")]
    handles = [m.register_forward_hook(lambda m, a, _o: calls.append((m, a[0]))) for m in linears]
    forwards_at_batch_1(model, size, fmt, 1, calls.clear)
    for h in handles:
        h.remove()
    in_order, in_cache = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m, x in calls:
                m(x)
            in_order.append(time.perf_counter() - t0)
            total = 0.0
            for m, x in calls:
                m(x)
                t0 = time.perf_counter()
                m(x)
                total += time.perf_counter() - t0
            in_cache.append(total)
    weights = sum(m.weight.numel() * m.weight.element_size() for m in linears) / 1e6
    macs = sum(x.shape[:-1].numel() * m.weight.numel() for m, x in calls) / 1e6
    cold, hot = statistics.median(in_order) * 1e3, statistics.median(in_cache) * 1e3
    print(f"\nlatent branch and exits, {len(calls)} Linear calls at batch 1 ({macs:.0f} M multiply-adds, "
          f"{weights:.0f} MB of weights, {macs / weights:.1f} multiply-adds per weight byte): {cold:.1f} ms in "
          f"the model's order, {hot:.1f} ms with each layer's weights in cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reg800m_perceiver_t128")
    parser.add_argument("--baseline", default="regnet_y_800mf", help="torchvision model name")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, nargs="+", default=[1],
                        help="batch sizes of the eval rows (times are per batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true", help="both models and inputs in channels_last")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    parser.add_argument("--freezing", action="store_true",
                        help="with --compile: inductor's freezing (weights as constants, prepacked for the CPU)")
    parser.add_argument("--what", choices=["eval", "train", "both"], default="both")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of the eval forward")
    parser.add_argument("--caches", choices=["warm", "cold", "both"], default="warm",
                        help="cold: evict the CPU caches before each timed eval call, so that both models read "
                             "their weights from memory")
    parser.add_argument("--x2z", choices=["strided", "both"], default="strided",
                        help="both: also time each eager row with x2z's plain depthwise convolution")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    ours = create_model(args.model, input_size=args.size).to(memory_format=fmt).eval()
    base = getattr(torchvision.models, args.baseline)().to(memory_format=fmt).eval()
    work = count_costs(ours, args.size).gmacs[-1] * 1e9 / count_macs(base, args.size)
    print(f"{args.model} vs torchvision {args.baseline}, {args.size} px, {args.threads} threads, "
          f"{'channels_last' if args.channels_last else 'NCHW'}; work ratio (fvcore MACs) {work:.3f}; "
          f"{args.repeats} rounds after {args.warmup} warm-up rounds")
    print(f"{'setting':>32} {'ours ms':>9} {'base ms':>9} {'time ratio':>10} {'time/work':>9}")
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    for compile_ in modes:
        label = "compiled" if compile_ else "eager"
        plain_x2z = args.x2z == "both" and not compile_
        rows = {}
        if args.what in ("eval", "both"):
            for batch in args.eval_batch:
                for cold in {"warm": [False], "cold": [True], "both": [False, True]}[args.caches]:
                    rows[f"eval, batch {batch}{', cold' if cold else ''}"] = eval_row(
                        ours, base, args.size, batch, fmt, compile_, args.repeats, args.warmup, plain_x2z, cold)
        if args.what in ("train", "both"):
            rows[f"train step, batch {args.train_batch}"] = train_row(
                ours, base, args.size, args.train_batch, fmt, compile_, args.repeats, args.warmup, plain_x2z)
            ours.eval(), base.eval()
        for what, r in rows.items():
            for variant, name in (("ours", what), ("plain x2z", "  same, plain x2z")):
                if f"{variant}_ms" in r:
                    ratio = r[f"{variant}_ratio"]
                    print(f"{name + ', ' + label:>32} {r[f'{variant}_ms']:>9.1f} {r['base_ms']:>9.1f} {ratio:>10.2f} "
                          f"{ratio / work:>9.2f}  {r['note'] if variant == 'ours' else ''}", flush=True)
    if args.breakdown:
        x = torch.randn(1, 3, args.size, args.size).contiguous(memory_format=fmt)
        params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (ours, base)]
        print(f"\nat batch 1: parameters {params[0]:.1f} M vs {params[1]:.1f} M; op calls (torch.profiler, all "
              f"levels) {op_calls(ours.eval(), x)} vs {op_calls(base.eval(), x)}")
        backbone_alone(ours.eval(), base.eval(), work, args.size, fmt, args.repeats, args.warmup)
        time_by_kind(ours, args.size, fmt, args.repeats)
        linear_replay(ours, args.size, fmt, args.repeats)
        breakdown(ours, args.size, fmt, args.repeats)


if __name__ == "__main__":
    main()
