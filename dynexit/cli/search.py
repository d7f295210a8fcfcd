"""dynexit search: Optuna searches for exit thresholds (on saved logits) and loss weights (by training)."""
from __future__ import annotations

from pathlib import Path

from dynexit.cli.options import (
    MODEL_RULE,
    SET_RULE,
    HelpFormatter,
    add_criterion,
    add_device,
    add_logits_inputs,
    add_out,
    add_set,
    add_temperature,
    read_inputs,
)
from dynexit.policies import DEFAULT_GRID, GRIDS

EPILOG = """examples:
  dynexit search thresholds --calib run/logits_calib.npz --test run/logits_test.npz --costs run/costs.csv \\
      --grid official --out run/search_curve.csv
  dynexit search thresholds --calib c.npz --test t.npz --costs 0.46,1.06,1.23,1.30 --pareto --trials 3000 \\
      --out pareto.csv
  dynexit search loss-weights experiments/quickstart.yaml --trials 20 --set train.epochs=2

Studies are kept in an Optuna storage (SQLite by default), so a search killed midway resumes when the
same command runs again, and several processes (on several machines with --storage postgresql://...)
can run the same command to share one study. Watch a study: optuna-dashboard sqlite:///path/study.db"""

THRESHOLDS_EPILOG = """examples:
  dynexit search thresholds --calib run/logits_calib.npz --test run/logits_test.npz --costs run/costs.csv \\
      --grid official --out run/search_curve.csv
  dynexit search thresholds --calib c.npz --test t.npz --costs costs.csv --budgets 0.5,0.8,1.1 --trials 300 \\
      --criterion margin --out budgets.csv
  dynexit search thresholds --calib c.npz --test t.npz --costs costs.csv --pareto --seed 1 --out pareto.csv \\
      --storage postgresql://user@db-host/optuna

The search space is one share per exit but the last: the fraction of calibration samples whose
confidence at that exit reaches its threshold. Thresholds are searched on the calibration logits only
and applied once to the test logits. --budgets: one TPE study per budget (highest calibration accuracy
with expected calibration cost within the budget). --grid alone: the same at the calibration costs of that
protocol grid's points; with --budgets or --pareto, the grid the search is compared with. --pareto: one
NSGA-II study, its Pareto front of calibration accuracy against cost. --trials counts finished trials per
study (default 200 per budget, 3000 for --pareto).

Writes CURVE.csv (the columns of 'dynexit curve'; target_share_<exit> holds the calibration shares the
searched thresholds give), CURVE.trials.csv (every trial: parameters, thresholds, calibration
accuracy and cost, and the curve point it became, if any) and CURVE.figure.png (the searched curve
against the protocol's, and the Pareto front with --pareto; its points in CURVE.figure.csv).
The study lives in --storage (default: search.db next to CURVE.csv); running the command again
resumes or, when done, only rewrites the files."""

LOSS_EPILOG = """examples:
  dynexit search loss-weights experiments/quickstart.yaml --trials 20
  dynexit search loss-weights experiments/quickstart.yaml --trials 40 --set train.epochs=3 \\
      --cost-range 0.012,0.015 --devices cuda:0
  dynexit search loss-weights experiments/quickstart.yaml --trials 100 --storage postgresql://user@db-host/optuna

Each trial trains the spec's base configuration with its own loss weights (every exit but the last; the
last stays 1), distillation weight and temperature, in <study folder>/runs/<run id>; the objective is
the mean calibration budgeted accuracy over --cost-range GMACs (default: first to last exit's cost),
scored after every epoch so that a median pruner stops poor trials. Outputs in the study folder
(default <results_dir>/search/loss_weights): study.db, trials.csv, best_weights.yaml (a spec fragment
under 'variants' for 'dynexit run'), optimization_history.png (objective over trials, best so far) and
param_importances.png (fANOVA, from 4 complete trials on), each with its data as CSV.
With --storage naming a shared database, run the same command on each machine to share the study.

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="Optuna searches: exit thresholds on saved logits, loss weights by training",
        description="Search exit thresholds for cost budgets or a Pareto front, or search training loss weights, "
                    "with Optuna studies that resume and can be shared by several processes.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="search_command", metavar="SEARCH")

    t = sub.add_parser("thresholds", help="exit thresholds on saved per-exit logits",
                       description="Search exit thresholds on calibration logits (per budget, or a Pareto front), "
                                   "apply them to test logits, and write the curve and the trials.",
                       epilog=THRESHOLDS_EPILOG, formatter_class=HelpFormatter)
    add_logits_inputs(t)
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--budgets", metavar="B1,B2,...", help="cost budgets in GMACs: one study per budget")
    mode.add_argument("--pareto", action="store_true", help="one multi-objective study: the Pareto front")
    t.add_argument("--trials", type=int, default=None,
                   help="finished trials per study (default 200; 3000 with --pareto)")
    t.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///<CURVE folder>/search.db)")
    t.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    add_criterion(t)
    add_temperature(t)
    t.add_argument("--grid", choices=GRIDS, default=None,
                   help="alone: one study per point of this protocol grid, at its calibration costs; with "
                        f"--budgets or --pareto: the grid the search is compared with (default: {DEFAULT_GRID})")
    t.add_argument("--population", type=int, default=50, help="NSGA-II population with --pareto (default 50)")
    t.add_argument("--study-name", default="thresholds", help="prefix of the study names (default: thresholds)")
    add_out(t, "CURVE.csv", "curve CSV to write (trials: CURVE.trials.csv)", required=True)
    t.set_defaults(func=run_thresholds)

    w = sub.add_parser("loss-weights", help="per-exit loss weights and self-distillation, by training",
                       description="Search per-exit loss weights, self-distillation weight and temperature of a "
                                   "spec's base configuration; each trial is a short training run; "
                                   f"{MODEL_RULE}.",
                       epilog=LOSS_EPILOG, formatter_class=HelpFormatter)
    w.add_argument("spec", help="experiment spec (YAML); its 'base' is the configuration searched")
    w.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    w.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///<study folder>/study.db)")
    w.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    add_set(w)
    w.add_argument("--cost-range", metavar="LO,HI", help="GMACs range of the objective (default: first to last exit)")
    add_device(w)
    add_out(w, "DIR", "study folder (default: <results_dir>/search/loss_weights)", kind=Path, old=("--study-dir",))
    w.add_argument("--study-name", default=None, help="study name (default: loss-weights-<spec name>)")
    w.set_defaults(func=run_loss_weights)


def _quiet_optuna(args) -> None:
    import optuna

    if not getattr(args, "verbose", False):
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _budgets(spec: str, problem) -> list[float]:
    from dynexit.search import protocol_budgets

    if spec in GRIDS:  # --grid NAME alone, or its old spelling --budgets NAME
        return protocol_budgets(problem, spec)
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--budgets {spec!r} is neither {' nor '.join(map(repr, GRIDS))} nor a comma-separated "
                         "list of numbers") from None
    if not values:
        raise ValueError("--budgets is empty")
    return values


def run_thresholds(args) -> int:
    import numpy as np

    from dynexit.search import (
        budget_verdict,
        compare_at_budgets,
        compare_with_protocol,
        open_storage,
        protocol_curve,
        search_budgets,
        search_pareto,
        sqlite_url,
        threshold_problem,
    )
    from dynexit.search.thresholds import BUDGET_TRIALS, PARETO_TRIALS
    from dynexit.utils import atomic_write_text

    _quiet_optuna(args)
    if not args.pareto and args.budgets is None and args.grid is None:
        raise ValueError("give --budgets B1,B2,..., --grid NAME (one study per point of a protocol grid) or --pareto")
    if not args.pareto and args.budgets is None:
        args.budgets = args.grid
    if args.trials is not None and args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    calib_logits, calib_targets, test_logits, test_targets, costs, names = read_inputs(args)
    num_exits = calib_logits.shape[0]
    problem = threshold_problem(calib_logits, calib_targets, test_logits, test_targets, costs, args.criterion,
                                "fit" if args.temperature else None, names)
    out = Path(args.out)
    url = args.storage or sqlite_url(out.parent / "search.db")
    storage = open_storage(url)
    if args.pareto:
        result = search_pareto(problem, args.trials or PARETO_TRIALS, storage, args.seed, args.population,
                               args.study_name)
    else:
        result = search_budgets(problem, _budgets(args.budgets, problem), args.trials or BUDGET_TRIALS, storage,
                                args.seed, args.study_name)
    trials_path = out.with_name(out.stem + ".trials.csv")
    atomic_write_text(out, result.curve.to_csv(index=False))
    atomic_write_text(trials_path, result.trials.to_csv(index=False))

    temperatures = ("temperatures " + ", ".join(f"{t:.3f}" for t in problem.temperatures)
                    if problem.temperatures is not None else "no temperature")
    mode = "Pareto front" if args.pareto else f"{len(set(result.trials['study']))} budget studies"
    print(f"{mode}, criterion {args.criterion}, {temperatures}, {len(result.trials)} trials; calibration "
          f"{calib_logits.shape[1]} samples, test {test_logits.shape[1]} samples, {num_exits} exits; storage {url}")
    print(f"\n  {'point':>5} {'calib cost':>10} {'calib acc %':>11} {'test cost':>10} {'test acc %':>10}")
    for row in result.curve.itertuples():
        print(f"  {row.point:>5} {row.calib_expected_cost:>10.4g} {row.calib_accuracy:>11.2f} "
              f"{row.test_expected_cost:>10.4g} {row.test_accuracy:>10.2f}")
    grid = args.grid or (args.budgets if not args.pareto and args.budgets in GRIDS else DEFAULT_GRID)
    protocol = protocol_curve(problem, grid)
    figure = _threshold_figure(out, result, protocol, grid, args.pareto)
    print(f"\nagainst the {grid} protocol ({len(protocol)} points; the same criterion and calibration split):")
    if not args.pareto:  # per budget: the test accuracy of the point each picks within it on the calibration split
        for row in compare_at_budgets(result, protocol).to_dict("records"):
            print(f"  budget {row['budget']:.4g}: {budget_verdict(row)}")
    cmp = compare_with_protocol(result.curve, protocol).attrs
    if cmp["points_in_range"]:
        area = (f"; over the shared test-cost range {cmp['area_difference']:+.2f} points"
                if np.isfinite(cmp["area_difference"]) else "")
        print(f"  at the protocol's {cmp['points_in_range']} points within the searched curve's test costs: mean "
              f"{cmp['mean_difference']:+.2f}, min {cmp['min_difference']:+.2f} points{area}")
    elif args.pareto:
        print("  no protocol point lies within the searched curve's test-cost range")
    print(f"\nwrote {out}, {trials_path} and {figure} (data: {figure.with_suffix('.csv')})")
    return 0


def _threshold_figure(out: Path, result, protocol, grid: str, pareto: bool) -> Path:
    """CURVE.figure.png: the searched curve against the protocol's (and the Pareto front), its points in
    CURVE.figure.csv."""
    import matplotlib

    matplotlib.use("Agg")
    from dynexit.analysis import save_figure
    from dynexit.analysis.search_figures import plot_threshold_search, threshold_search_points
    from dynexit.utils import atomic_write_text

    points = threshold_search_points(result.curve, protocol, grid, result.trials, pareto)
    path = out.with_name(out.stem + ".figure.png")
    kind = "Pareto front" if pareto else "budget studies"
    save_figure(plot_threshold_search(points, f"threshold search ({kind}) against the {grid} protocol"), path,
                ("png",))
    atomic_write_text(path.with_suffix(".csv"), points.to_csv(index=False))
    return path


def write_loss_weight_figures(trials, folder: Path) -> list[Path]:
    """optimization_history and (with enough complete trials) param_importances, PNG and CSV, in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    from dynexit.analysis import save_figure
    from dynexit.analysis.search_figures import loss_weight_figures
    from dynexit.utils import atomic_write_text

    written = []
    for name, (fig, data) in loss_weight_figures(trials).items():
        written += save_figure(fig, Path(folder) / name, ("png",))
        atomic_write_text(Path(folder) / f"{name}.csv", data.to_csv(index=False))
        written.append(Path(folder) / f"{name}.csv")
    return written


def run_loss_weights(args) -> int:
    from dynexit.runs.spec import load_spec
    from dynexit.search import open_storage, sqlite_url
    from dynexit.search.loss_weights import STORAGE_FILE, search_loss_weights

    _quiet_optuna(args)
    cost_range = None
    if args.cost_range:
        try:
            lo, hi = (float(v) for v in args.cost_range.split(","))
        except ValueError:
            raise ValueError(f"--cost-range {args.cost_range!r}: expected LO,HI (two numbers, GMACs)") from None
        cost_range = (lo, hi)
    study_dir = args.out
    if study_dir is None:
        study_dir = load_spec(args.spec, args.set).results_dir / "search" / "loss_weights"
    storage = open_storage(args.storage or sqlite_url(Path(study_dir) / STORAGE_FILE))
    result = search_loss_weights(args.spec, args.trials, storage, seed=args.seed, device=args.device,
                                 cost_range=cost_range, overrides=args.set, study_dir=study_dir,
                                 study_name=args.study_name)
    table = result.trials
    print(f"study {result.study_name}: {len(table)} trials "
          f"({', '.join(f'{n} {s.lower()}' for s, n in table['state'].value_counts().items())}); objective = mean "
          f"calibration budgeted accuracy (%) over {result.cost_range[0]:.4g}-{result.cost_range[1]:.4g} GMACs")
    weights = [c for c in table.columns if c.startswith("weight_")]
    head = "  ".join(f"{c[7:]:>8}" for c in weights)
    print(f"\n  {'trial':>5} {'state':>8} {'objective':>9}  {head}  {'alpha':>6} {'T':>5}")
    for _, row in table.iterrows():
        values = "  ".join(f"{row[c]:>8.3f}" for c in weights)
        objective = row["objective"] if row["objective"] == row["objective"] else row["last_reported"]
        print(f"  {row['number']:>5} {row['state'].lower():>8} {objective:>9.3f}  {values}  "
              f"{row['distill_alpha']:>6.3f} {row['distill_temperature']:>5.2f}")
    if result.best is not None:
        print(f"\nbest: trial {result.best_number}, objective {result.best_value:.3f}; "
              f"spec fragment in {Path(study_dir) / 'best_weights.yaml'}")
    figures = write_loss_weight_figures(table, Path(study_dir))
    print(f"wrote {Path(study_dir) / 'trials.csv'}" + (f" and {', '.join(str(p) for p in figures)}" if figures else ""))
    return 0
