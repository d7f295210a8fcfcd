"""Loss weights searched by training: per-exit cross-entropy weights, self-distillation weight and
temperature.

Each trial is a short training run of the spec's ``base`` run configuration with the trial's values
(``train.loss_weights.<exit>``, ``train.distill_alpha``, ``train.distill_temperature``), trained by
:func:`dynexit.training.train` in its own run folder ``<study folder>/runs/<run id>`` (the run id is
the experiment runner's hash of the configuration, so a trial queued again after its worker died
resumes its checkpoint). Search space (:class:`LossWeightSpace`): the weight of every exit but the last
on a log scale, the last exit's weight fixed at 1 (AdamW is nearly invariant to the scale of the loss,
so only the ratios matter), the distillation weight on a linear scale (0 turns it off) and its
temperature on a log scale. The first trial of a new study is the base configuration's own values (the
``baseline`` column of trials.csv) when they lie in the space; TPE samples the rest (seeded), a median
pruner stops poor trials.

Objective (:func:`budgeted_area`): the area under the calibration split's budgeted accuracy curve over a
fixed cost range, divided by the range's width, i.e. the mean budgeted calibration accuracy (percent)
over ``[lo, hi]`` GMACs. The curve is the upper envelope of the budgeted protocol's operating points
(``eval.grid``, ``eval.criterion`` of the run configuration) and of each exit alone: the best accuracy
reachable within each budget, a step function. The range defaults to [cost of the first exit, cost of
the last]. The score is computed on the calibration split only, after every epoch and reported to the
pruner (``trial.report``), when the trainer offers a per-epoch callback (``on_epoch_end``, see
:func:`search_loss_weights`); otherwise once, after training, and no trial is pruned early.

Outputs in the study folder (``<results_dir>/search/loss_weights`` by default): ``study.db`` (the Optuna
storage, unless ``--storage`` names another), ``trials.csv`` (one row per trial: state, objective,
weights, run id) and ``best_weights.yaml``, a spec fragment the runner accepts::

    variants:
      searched_loss_weights:
        train.loss_weights.early3: 0.7
        ...

Watch it with ``optuna-dashboard sqlite:///<study folder>/study.db``.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import pandas as pd
import yaml

from dynexit.curves import mean_best_within_budget
from dynexit.policies import DEFAULT_GRID, anytime_accuracy, curve_from_scores, scores
from dynexit.search.study import SearchStorage, open_storage, open_study, run_trials
from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.csv"
BEST_FILE = "best_weights.yaml"
STORAGE_FILE = "study.db"
VARIANT = "searched_loss_weights"


@dataclass(frozen=True)
class LossWeightSpace:
    """Ranges of the searched values (low, high)."""

    weight: tuple[float, float] = (0.1, 2.0)  # cross-entropy weight of each exit but the last (log scale)
    distill_alpha: tuple[float, float] = (0.0, 1.5)  # self-distillation weight (linear; 0: off)
    distill_temperature: tuple[float, float] = (1.0, 8.0)  # self-distillation temperature (log scale)

    def check(self) -> None:
        for name in ("weight", "distill_alpha", "distill_temperature"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
                raise ValueError(f"search range {name} must satisfy 0 <= low < high, got ({lo}, {hi})")
        for name in ("weight", "distill_temperature"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"search range {name} is on a log scale: its low end must be > 0")


# ------------------------------------------------------------------------------------------ objective

def budgeted_area(logits, targets, costs: Sequence[float], cost_range: tuple[float, float],
                  criterion: str = "max_softmax", grid=DEFAULT_GRID) -> float:
    """Mean budgeted accuracy (percent) of one split over ``cost_range`` (see the module docstring):
    the integral over [lo, hi] of the best accuracy reachable within each budget, divided by hi - lo."""
    lo, hi = (float(v) for v in cost_range)
    costs = np.asarray(costs, dtype=np.float64)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"cost range must be two increasing finite numbers, got {cost_range}")
    if lo < costs[0]:
        raise ValueError(f"cost range starts at {lo:g}, below the cost of the first exit ({costs[0]:g}), where "
                         "no operating point exists")
    conf, pred = scores(logits, criterion)
    correct = pred == np.asarray(targets)[None, :]
    curve = curve_from_scores(conf, correct, conf, correct, costs, grid)  # calibration on both sides
    single = anytime_accuracy(logits, targets, costs)
    cost = np.concatenate([curve["calib_expected_cost"].to_numpy(float), single["cost"].to_numpy(float)])
    acc = np.concatenate([curve["calib_accuracy"].to_numpy(float), single["accuracy"].to_numpy(float)])
    return mean_best_within_budget(cost, acc, lo, hi)


@dataclass
class CalibrationScore:
    """The objective of a model in a run folder: :func:`budgeted_area` of its calibration logits."""

    costs: Sequence[float]
    cost_range: tuple[float, float]
    _loaders: dict = field(default_factory=dict, repr=False)

    def __call__(self, model, cfg, folder: Path) -> float:
        from dynexit.logits import collect_logits

        loader = self._loader(cfg, folder)
        device = next(model.parameters()).device
        logits, targets = collect_logits(model, loader, device=device)
        return budgeted_area(logits, targets, self.costs, self.cost_range, cfg.eval.criterion, cfg.eval.grid)

    def _loader(self, cfg, folder: Path):
        key = str(folder)
        if key not in self._loaders:  # the calibration split the trainer drew (saved in the folder)
            from dynexit.data import build_datasets, build_loaders

            splits = build_datasets(cfg.data, folder)
            self._loaders = {key: build_loaders(splits, batch_size=cfg.eval.batch_size,
                                                num_workers=cfg.data.num_workers, seed=cfg.seed)["calib"]}
        return self._loaders[key]


# ------------------------------------------------------------------------------------------ search

@dataclass
class LossWeightSearch:
    """Outcome of :func:`search_loss_weights`."""

    study_name: str
    study_dir: Path
    trials: pd.DataFrame  # see trials_table
    best: Optional[dict[str, float]]  # dotted keys -> values of the best complete trial (None: none yet)
    best_number: Optional[int]
    best_value: Optional[float]
    cost_range: tuple[float, float]


def _epoch_callback_param(trainer: Callable) -> Optional[str]:
    try:
        params = inspect.signature(trainer).parameters
    except (TypeError, ValueError):
        return None
    return "on_epoch_end" if "on_epoch_end" in params else None


def search_loss_weights(spec: str | Path, n_trials: int, storage: SearchStorage | str | None = None, seed: int = 0,
                        device: Optional[str] = None, cost_range: Optional[tuple[float, float]] = None,
                        overrides: Optional[list[str]] = None, study_dir: Optional[str | Path] = None,
                        study_name: Optional[str] = None, space: LossWeightSpace = LossWeightSpace(),
                        pruner: Optional[optuna.pruners.BasePruner] = None, trainer: Optional[Callable] = None,
                        scorer: Optional[Callable] = None) -> LossWeightSearch:
    """Searches the loss weights of the spec's ``base`` run configuration until the study holds
    ``n_trials`` finished trials (several processes may share it; see :mod:`dynexit.search.study`), then
    writes ``trials.csv`` and ``best_weights.yaml`` into the study folder.

    ``storage``: None (in memory), a URL, or an open :class:`SearchStorage` (the command defaults to
    ``<study folder>/study.db``). ``overrides``: ``key=value`` items applied to the base (e.g.
    ``train.epochs=3``). ``trainer``: ``dynexit.training.train`` by default; when it accepts
    ``on_epoch_end``, it must call ``on_epoch_end(epoch=..., model=..., ema=...)`` after each epoch's
    checkpoint (``ema``: the EMA model or None) and let an exception from it end training, and each
    epoch's score is reported to the pruner. ``scorer(model, cfg, run_folder) -> float``:
    :class:`CalibrationScore` by default.
    """
    from dynexit.runs.spec import build_run_config, load_spec, run_id, to_plain

    space.check()
    spec = Path(spec)
    experiment = load_spec(spec, overrides)
    raw_base = experiment.raw.get("base") or {}
    cli = to_plain(_parse_overrides(overrides))
    if set(experiment.raw) & {"variants", "grid", "zip", "seeds"}:
        log.info("%s: the search starts from 'base' only (variants, grid, zip and seeds are ignored)", spec)
    base_cfg = build_run_config(raw_base, {}, cli, f"{spec}: base", spec)
    names, costs = _exit_costs(base_cfg)
    if len(names) < 2:
        raise ValueError(f"{spec}: the base model ({base_cfg.model.name}) has one exit: there are no loss weights "
                         "to search")
    if cost_range is None:
        cost_range = (float(costs[0]), float(costs[-1]))
    cost_range = (float(cost_range[0]), float(cost_range[1]))
    if not (cost_range[0] < cost_range[1]) or cost_range[0] < costs[0]:
        raise ValueError(f"cost range {cost_range} must be increasing and start at or above the first exit's cost "
                         f"({costs[0]:g} GMACs; the exits cost {', '.join(f'{c:.4g}' for c in costs)})")

    if study_dir is None:  # inside the experiment's results folder, which must be new or this experiment's
        from dynexit.runs.folders import check_results_folder, mark_results_folder

        check_results_folder(experiment)
        mark_results_folder(experiment)
    study_dir = Path(study_dir) if study_dir is not None else experiment.results_dir / "search" / "loss_weights"
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = storage if isinstance(storage, SearchStorage) else open_storage(storage)
    name = study_name or f"loss-weights-{experiment.name}"
    sampler = trial_sampler(seed, 0)
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    # a study holds the trials of one base configuration, cost range, objective and search space (checked on
    # resume); the run id leaves eval out, and the objective's curve follows eval.criterion and eval.grid
    attrs = {"kind": "loss_weights", "base_run_id": run_id(base_cfg),
             "objective_eval": {"criterion": base_cfg.eval.criterion, "grid": base_cfg.eval.grid},
             "exit_names": list(names), "costs": [float(c) for c in costs], "cost_range": list(cost_range),
             "space": {"weight": list(space.weight), "distill_alpha": list(space.distill_alpha),
                       "distill_temperature": list(space.distill_temperature)}}
    study = open_study(storage, name, ["maximize"], sampler, pruner, attrs)
    if not study.trials:  # a new study: its first trial is the base configuration's own values
        start = baseline_params(base_cfg.train, names, space)
        if start is not None:
            study.enqueue_trial(start, user_attrs={"baseline": True}, skip_if_exists=True)

    trainer = trainer or _default_trainer()
    callback = _epoch_callback_param(trainer)
    if callback is None:
        log.warning("the trainer has no on_epoch_end callback: each trial is scored once, after training, "
                    "and no trial is pruned early")
    scorer = scorer or CalibrationScore(costs, cost_range)

    def objective(trial: optuna.Trial) -> float:
        dotted = trial_overrides(trial, names, space)
        cfg = build_run_config(raw_base, dotted, cli, f"{spec}: trial {trial.number}", spec)
        rid = run_id(cfg)
        folder = study_dir / "runs" / rid
        trial.set_user_attr("run_id", rid)
        return _train_and_score(trial, cfg, folder, trainer, callback, scorer, device)

    run_trials(storage, study, objective, n_trials, desc=f"study {name}",
               sampler_for=lambda number: trial_sampler(seed, number))
    return export(study, study_dir, names, cost_range, storage.url)


def trial_sampler(seed: int, number: int) -> optuna.samplers.TPESampler:
    """The sampler of trial ``number``: TPE over the study's finished trials, its randomness drawn from
    ``(seed, number)``, so that no two trials of a study (resumed, extended or shared by workers) repeat
    one draw, and the same study gives the same trials."""
    trial_seed = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=trial_seed, multivariate=True, constant_liar=True)


def _default_trainer() -> Callable:
    from dynexit.training import train

    return train


def _parse_overrides(overrides: Optional[list[str]]):
    from dynexit.config import parse_set

    return parse_set(overrides) if overrides else {}


def _exit_costs(cfg) -> tuple[tuple[str, ...], np.ndarray]:
    from dynexit.config import build_configured_model
    from dynexit.costs import exit_costs, resolve_handles

    model = build_configured_model(cfg.model)
    if cfg.model.costs is not None:  # a model without segments: its costs come from the spec
        return tuple(model.exit_names), np.asarray(cfg.model.costs, dtype=float)
    table = exit_costs(model, input_size=cfg.data.image_size, handles=resolve_handles(cfg.model.op_handles))
    return tuple(model.exit_names), table["gmacs"].to_numpy(dtype=float)


def trial_overrides(trial: optuna.Trial, exit_names: Sequence[str], space: LossWeightSpace) -> dict[str, float]:
    """Samples the trial's values and returns them as dotted run-configuration keys."""
    dotted = {f"train.loss_weights.{n}": trial.suggest_float(f"weight_{n}", *space.weight, log=True)
              for n in exit_names[:-1]}
    dotted[f"train.loss_weights.{exit_names[-1]}"] = 1.0
    dotted["train.distill_alpha"] = trial.suggest_float("distill_alpha", *space.distill_alpha)
    dotted["train.distill_temperature"] = trial.suggest_float("distill_temperature", *space.distill_temperature,
                                                              log=True)
    return dotted


def baseline_params(train_cfg, exit_names: Sequence[str], space: LossWeightSpace) -> Optional[dict[str, float]]:
    """The base configuration's loss weights as trial parameters (every value divided by the last exit's
    weight, which trials fix at 1: only the ratios matter), or None when they lie outside ``space``."""
    weights = {n: float(train_cfg.loss_weights.get(n, math.nan)) for n in exit_names}  # NaN: not set
    last = weights[exit_names[-1]]
    params = {f"weight_{n}": weights[n] / last if last > 0 else math.nan for n in exit_names[:-1]}
    params.update(distill_alpha=train_cfg.distill_alpha / last if last > 0 else math.nan,
                  distill_temperature=train_cfg.distill_temperature)
    ranges = {**{f"weight_{n}": space.weight for n in exit_names[:-1]},
              "distill_alpha": space.distill_alpha, "distill_temperature": space.distill_temperature}
    outside = [k for k, (lo, hi) in ranges.items() if not (lo <= params[k] <= hi)]
    if outside:
        log.info("the base loss weights are outside the search space (%s): no baseline trial", ", ".join(outside))
        return None
    return params


def _train_and_score(trial: optuna.Trial, cfg, folder: Path, trainer: Callable, callback: Optional[str],
                     scorer: Callable, device: Optional[str]) -> float:
    from dynexit.runs.folders import run_lock

    reported: dict[int, float] = {}

    def on_epoch_end(epoch: int, model, ema=None, **_: Any) -> None:
        chosen = ema if (cfg.eval.use_ema and ema is not None) else model
        value = float(scorer(chosen, cfg, folder))
        reported[int(epoch)] = value
        trial.report(value, int(epoch))
        log.info("trial %d, epoch %d: calibration score %.3f", trial.number, epoch, value)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"epoch {epoch}: score {value}")
        if epoch < cfg.train.epochs and trial.should_prune():  # after the last epoch there is nothing to save
            raise optuna.TrialPruned(f"epoch {epoch}: score {value:.3f} below the median")

    with run_lock(folder) as acquired:
        if not acquired:
            raise RuntimeError(f"run folder {folder} is locked by another process (the same trial twice?)")
        try:
            if callback is not None:
                trainer(cfg, folder, device=device, resume=True, **{callback: on_epoch_end})
            else:  # scored once, after training
                trainer(cfg, folder, device=device, resume=True)
        except FloatingPointError as err:  # diverged: a poor configuration, not a broken search
            trial.set_user_attr("error", str(err))
            raise optuna.TrialPruned(f"training diverged: {err}") from None
    if cfg.train.epochs not in reported:  # no callback, or a finished run folder the trainer left at once
        on_epoch_end(cfg.train.epochs, _load_trained(cfg, folder))
    return reported[cfg.train.epochs]


def _load_trained(cfg, folder: Path):
    from dynexit.models.checkpoint import load_model

    return load_model(folder / "checkpoint.pt", ema=cfg.eval.use_ema, factory=cfg.model.factory)


# ------------------------------------------------------------------------------------------ outputs

def trials_table(study: optuna.Study, exit_names: Sequence[str]) -> pd.DataFrame:
    """One row per trial: number, state, objective, every exit's weight, distillation weight and
    temperature, epochs reported and the last reported score, whether it is the baseline trial (the base
    configuration's own values), run id, duration in seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "objective": t.value}
        for n in exit_names[:-1]:
            row[f"weight_{n}"] = t.params.get(f"weight_{n}", np.nan)
        row[f"weight_{exit_names[-1]}"] = 1.0
        row["distill_alpha"] = t.params.get("distill_alpha", np.nan)
        row["distill_temperature"] = t.params.get("distill_temperature", np.nan)
        steps = sorted(t.intermediate_values)
        row["epochs_reported"] = len(steps)
        row["last_reported"] = t.intermediate_values[steps[-1]] if steps else np.nan
        row["baseline"] = bool(t.user_attrs.get("baseline", False))
        row["run_id"] = t.user_attrs.get("run_id", "")
        row["duration_s"] = t.duration.total_seconds() if t.duration is not None else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def best_fragment(trial: optuna.trial.FrozenTrial, exit_names: Sequence[str]) -> dict[str, float]:
    """Dotted run-configuration keys of a trial's values (every exit's weight included)."""
    out = {f"train.loss_weights.{n}": _round(trial.params[f"weight_{n}"]) for n in exit_names[:-1]}
    out[f"train.loss_weights.{exit_names[-1]}"] = 1.0
    out["train.distill_alpha"] = _round(trial.params["distill_alpha"])
    out["train.distill_temperature"] = _round(trial.params["distill_temperature"])
    return out


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def export(study: optuna.Study, study_dir: Path, exit_names: Sequence[str], cost_range: tuple[float, float],
           storage_url: Optional[str] = None) -> LossWeightSearch:
    """Writes ``trials.csv`` and (once a trial is complete) ``best_weights.yaml`` into ``study_dir``."""
    table = trials_table(study, exit_names)
    atomic_write_text(study_dir / TRIALS_FILE, table.to_csv(index=False))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        log.warning("study %s has no complete trial: no %s written", study.study_name, BEST_FILE)
        return LossWeightSearch(study.study_name, study_dir, table, None, None, None, cost_range)
    best = max(complete, key=lambda t: (t.value, -t.number))
    fragment = best_fragment(best, exit_names)
    where = f" ({storage_url})" if storage_url else ""
    header = (f"# dynexit search loss-weights: the best of {len(complete)} complete trials of study "
              f"{study.study_name}{where}\n"
              f"# trial {best.number}, objective {best.value:.4f} = mean calibration budgeted accuracy (%) "
              f"over {cost_range[0]:.6g}-{cost_range[1]:.6g} GMACs.\n"
              f"# Paste under 'variants' of a spec (or merge into its variants) and run it with dynexit run.\n")
    body = yaml.safe_dump({"variants": {VARIANT: fragment}}, sort_keys=False)
    atomic_write_text(study_dir / BEST_FILE, header + body)
    log.info("best trial %d: %s", best.number, json.dumps(fragment))
    return LossWeightSearch(study.study_name, study_dir, table, fragment, best.number, float(best.value), cost_range)
