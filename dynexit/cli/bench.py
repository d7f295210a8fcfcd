"""dynexit bench: measured latency of each exit and of early exit, against the counted costs."""
from __future__ import annotations

import logging

from dynexit.cli.options import (
    MODEL_RULE,
    SET_RULE,
    HelpFormatter,
    add_criterion,
    add_device,
    add_model,
    build_model,
)

log = logging.getLogger(__name__)

EPILOG = """examples:
  dynexit bench results/quickstart --threads 1 --batch-sizes 1,32
  dynexit bench reg800m_perceiver_t128 --threads 2
  dynexit bench resnet50_0375_perceiver_t128 --batch-size 64 --input-size 96 --shares 0.5,0,0,0.5 --repeats 5
  dynexit bench tiny_perceiver_t16 --set model.z2x=false
  dynexit bench tiny_perceiver_t16 --policy policy.json
  dynexit bench tiny_perceiver_t16 --curve curve.csv --budget 0.02

Latency to reach exit k: the median time of running segments 0..k on one random batch (the work of a
sample leaving at exit k), after warm-up, under torch.inference_mode in eval mode; all exits are timed
interleaved so that load from other work hits them alike. 'spread' is the interquartile range over the
median: large values mean a noisy machine.

Operating points: for each --shares (target fraction leaving at each exit), thresholds are set on the
benchmark images' own confidences with the budgeted protocol (dynexit.policies.find_thresholds), so
that these shares leave at each exit; early exit (with compaction of the samples still running) is
then timed against the full model on the same batches. Expected gain = full cost / expected cost
(sum of measured shares x per-exit GMACs); measured gain = full-model time / early-exit time.
Default shares: half at the first exit and the rest at the last, and equal shares at every exit.

--policy (a JSON file of dynexit.policies.ExitPolicy) or --curve with --budget or --point (a curve CSV of
'dynexit curve', 'dynexit search thresholds' or a run's curve.csv; --budget takes the row of highest
calibration accuracy whose calibration expected cost is within it) time early exit at that policy's own
thresholds, criterion and temperatures instead (plus any --shares given); its exits must be the model's.
The shares printed are those measured on the benchmark images.

NAME may be an experiment's results folder: then every configuration's latency to reach each exit is measured
on an untrained copy of its architecture (the model section of one of its runs' config.yaml; weights do not
change latency), at each of --batch-sizes, and written to RESULTS_DIR/latency.csv with the machine, device,
threads and torch version; 'dynexit report RESULTS_DIR' then adds the expected latency of every operating
point (report/latency.csv) and a figure of accuracy against latency.

Unless --default-malloc is given, glibc's malloc is told to keep freed memory for reuse
(dynexit.timing.reuse_freed_memory): otherwise every large CPU activation is fresh memory whose
pages fault in again on each run, a cost of the allocator that would be timed as the model's.
Weights are random: only timing matters here.

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="latency of each exit and of early exit, against the counted costs",
        description="Measure the latency of reaching each exit and of early exit at operating points, "
                    "and compare them with the per-exit costs counted by fvcore; "
                    f"{MODEL_RULE}.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    add_model(p)
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per batch (default: 1)")
    p.add_argument("--batch-sizes", default="1,32", metavar="B,B",
                   help="with a results folder: the batch sizes to time (default: 1,32)")
    p.add_argument("--threads", type=int, metavar="T", help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed runs per figure; the median is reported (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default: 2)")
    p.add_argument("--images", type=int, metavar="N",
                   help="images for the operating points (default: the batch size, at least 16)")
    p.add_argument("--shares", action="append", metavar="S1,S2,...",
                   help="target share of images leaving at each exit (repeatable; see below)")
    add_criterion(p)
    p.add_argument("--policy", metavar="POLICY.json", help="time early exit with this exit policy (see below)")
    p.add_argument("--curve", metavar="CURVE.csv", help="time early exit at one row of this curve (with --budget "
                   "or --point)")
    p.add_argument("--budget", type=float, metavar="B", help="with --curve: the row of highest calibration "
                   "accuracy whose calibration expected cost is <= B")
    p.add_argument("--point", type=int, metavar="I", help="with --curve: the row of this point")
    p.add_argument("--run-id", metavar="ID", help="with --curve of an experiment's curves.csv: the run")
    add_device(p, default="cpu")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default: keep freed memory for reuse, see below)")
    p.set_defaults(func=run)


def parse_shares(items: list[str] | None, num_exits: int) -> list[tuple[float, ...]]:
    """The --shares settings; defaults: half at the first exit and the rest at the last, then equal
    shares. Shares must be one non-negative number per exit, summing to 1."""
    if not items:
        half = (0.5,) + (0.0,) * (num_exits - 2) + (0.5,)
        return [half, (1.0 / num_exits,) * num_exits]
    settings = []
    for item in items:
        try:
            shares = tuple(float(v) for v in item.split(","))
        except ValueError:
            raise ValueError(f"--shares {item!r}: expected comma-separated numbers") from None
        if len(shares) != num_exits:
            raise ValueError(f"--shares {item!r}: {len(shares)} values for {num_exits} exits")
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"--shares {item!r}: shares must be non-negative and sum to 1")
        settings.append(shares)
    return settings


def read_policy(args):
    """The policy of --policy, or of --curve with --budget or --point; None when neither is given."""
    from dynexit.policies import ExitPolicy

    if args.policy and args.curve:
        raise ValueError("give --policy or --curve, not both")
    if args.curve is None and (args.budget is not None or args.point is not None or args.run_id is not None):
        raise ValueError("--budget, --point and --run-id choose a row of --curve; give --curve too")
    if args.policy:
        return ExitPolicy.load(args.policy)
    if args.curve:
        if (args.budget is None) == (args.point is None):
            raise ValueError("--curve needs exactly one of --budget and --point")
        return ExitPolicy.from_curve(args.curve, budget=args.budget, point=args.point, run_id=args.run_id)
    return None


def _shares(values) -> str:
    return ",".join(f"{v:.2f}" for v in values)


def run_results(args) -> int:
    """``dynexit bench RESULTS_DIR``: latency of every configuration's exits into RESULTS_DIR/latency.csv."""
    from pathlib import Path

    import torch

    from dynexit.analysis.latency import LATENCY_FILE, measure_latency
    from dynexit.utils import atomic_write

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers") from None
    table = measure_latency(args.name, batch_sizes, args.repeats, args.warmup, args.device)
    path = Path(args.name) / LATENCY_FILE
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    first = table.iloc[0]
    print(f"{first['machine']}; {first['device']}, {torch.get_num_threads()} threads, torch {first['torch']}; "
          f"median of {args.repeats} runs after {args.warmup} warm-up runs, untrained copies of each architecture; "
          f"load average {table['load'].min():.1f}-{table['load'].max():.1f} while timing")
    print(f"\n  {'configuration':<24} {'exit':<10} {'GMACs':>8} {'batch':>5} {'ms/image':>9} {'spread':>7}")
    for row in table.itertuples():
        print(f"  {row.configuration:<24} {row.exit:<10} {row.gmacs:>8.4g} {row.batch_size:>5} {row.latency_ms:>9.3f} "
              f"{row.spread:>7.2f}")
    print(f"\nwrote {path}")
    return 0


def run(args) -> int:
    import torch

    from dynexit.costs import UNIT, count_costs
    from dynexit.inference import check_policy_fits
    from dynexit.timing import exit_latencies, operating_point, policy_point, reuse_freed_memory

    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.images is not None and args.images < 1:
        raise ValueError(f"--images must be at least 1, got {args.images}")
    from pathlib import Path

    if Path(args.name).is_dir():
        return run_results(args)
    malloc = "default"
    if not args.default_malloc:
        malloc = "tuned" if reuse_freed_memory() else "default (tuning unavailable)"
    from dynexit.models.interface import check_multi_exit_model, model_setting

    policy = read_policy(args)
    model = build_model(args, "bench").eval()
    check_multi_exit_model(model, need_segments=True, purpose="dynexit bench")
    size = model_setting(model, "input_size")
    if size is None:
        raise ValueError(f"{args.name} does not say its input size: give --input-size")
    if policy is not None:
        check_policy_fits(policy, model)
    costs = count_costs(model, size)
    exits = len(model.exit_names)
    shares_list = []
    if exits > 1 and (policy is None or args.shares):
        shares_list = parse_shares(args.shares, exits)
    device = torch.device(args.device)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, size, size, generator=gen).to(device)

    print(f"{args.name} at {size}x{size}, batch {args.batch_size}, {torch.get_num_threads()} threads, {device}; "
          f"median of {args.repeats} runs after {args.warmup} warm-up runs (torch.inference_mode, eval mode); "
          f"malloc {malloc}")
    print(f"costs in {UNIT}")
    timings = exit_latencies(model, x, args.repeats, args.warmup)
    full_ms = timings[-1].median * 1e3
    print("\nlatency to reach each exit:")
    print(f"  {'#':>2} {'exit':<10} {'GMACs':>8} {'cost share':>10} {'ms':>9} {'spread':>7} {'latency share':>13}")
    for k, (name, t) in enumerate(zip(model.exit_names, timings)):
        print(f"  {k:>2} {name:<10} {costs.gmacs[k]:>8.4f} {costs.gmacs[k] / costs.gmacs[-1]:>10.3f} "
              f"{t.median * 1e3:>9.2f} {t.spread:>7.2f} {t.median * 1e3 / full_ms:>13.3f}")

    if shares_list or policy is not None:
        n = args.images or max(args.batch_size, 16)
        images = torch.randn(n, 3, size, size, generator=gen).to(device)
    if policy is not None:
        source = args.policy or f"{args.curve}, " + (f"budget {args.budget:g}" if args.budget is not None
                                                    else f"point {args.point}")
        temps = "none" if policy.temperatures is None else ",".join(f"{t:.3f}" for t in policy.temperatures)
        point = policy_point(model, images, policy, costs.gmacs, args.batch_size, args.repeats, args.warmup)
        print(f"\npolicy ({source}): criterion {policy.criterion}, temperatures {temps}, thresholds "
              + ",".join(f"{t:.6g}" for t in policy.thresholds))
        print(f"  {n} images in batches of {args.batch_size}")
        print(f"  {'measured shares':<24} {'exp. GMACs':>10} {'exp. gain':>9} {'full ms':>9} {'early ms':>9} "
              f"{'gain':>6} {'gain/exp.':>9}")
        print(f"  {_shares(point.shares):<24} {point.expected_gmacs:>10.4f} {point.expected_gain:>8.3f}x "
              f"{point.full.median * 1e3:>9.2f} {point.early.median * 1e3:>9.2f} {point.measured_gain:>5.3f}x "
              f"{point.efficiency:>9.3f}")
    if shares_list:
        print(f"\noperating points: {n} images in batches of {args.batch_size}; thresholds set on these images "
              f"({args.criterion}) for the target shares")
        print(f"  {'target shares':<24} {'measured shares':<24} {'exp. GMACs':>10} {'exp. gain':>9} "
              f"{'full ms':>9} {'early ms':>9} {'gain':>6} {'gain/exp.':>9}")
        for shares in shares_list:
            point = operating_point(model, images, shares, costs.gmacs, args.batch_size, args.repeats, args.warmup,
                                    args.criterion)
            print(f"  {_shares(point.target_shares):<24} {_shares(point.shares):<24} {point.expected_gmacs:>10.4f} "
                  f"{point.expected_gain:>8.3f}x {point.full.median * 1e3:>9.2f} {point.early.median * 1e3:>9.2f} "
                  f"{point.measured_gain:>5.3f}x {point.efficiency:>9.3f}")
            log.debug("timing spread: full %.2f, early %.2f", point.full.spread, point.early.spread)
    return 0
