"""Cost of reaching each exit: multiply-adds counted by fvcore, and parameters.

Units: fvcore counts one fused multiply-add as one FLOP, so every "GMACs" figure here is fvcore's
"GFLOPs" (10^9 multiply-adds per image), the unit of the official Dynamic Perceiver counts.

How the count is made. Each segment of the model (``model.run_segment(k, state)``, the code that
``forward`` and early exit run) is traced by fvcore as its own function of the state, returning the
whole new state (a state is a NamedTuple whose fields are tensors or tuples of tensors: the
Dyn-Perceiver's features, latents and logits, MSDNet's per-scale feature maps and logits). Returning
everything matters: tracing drops work whose result is unused, so tracing
"the model up to exit k" would miss the latent work that runs before exit k but only feeds later exits
(the official ResNet count at exit 3 is 1.022 G instead of the 1.138 G really spent). The cost of
exit k is the sum of segments 0..k: the work an early-exit run does to get there, including every
earlier exit head that ran and was rejected. One trace per segment, one image, eval mode.

What is counted: convolutions, linear layers and matmuls, attention (``scaled_dot_product_attention``:
Q.K^T and attention.V, a handle registered here, since fvcore has none), batch and layer norms and
adaptive average pooling (fvcore's default handles), and whatever ``init_state`` computes (in the first
exit). Element-wise work counts as zero (:data:`ELEMENTWISE_OPS`: activations, residual adds, plain means,
pooling); any other op fvcore cannot count is an error, so a new kind of layer cannot go silently uncounted:
give it a handle (``handles={"aten::op": function or None}``).

Parameters of exit k: every parameter of every module that runs up to exit k (cumulative), found by
hooks during the same traces, plus the model's own parameters (the learned latent array, used when
the state is created); at the last exit of a Dyn-Perceiver this is the whole model.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from math import prod
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from dynexit.models.base import MultiExitModel
from dynexit.models.interface import check_multi_exit_model, model_setting
from dynexit.models.state import flatten
from dynexit.utils import atomic_write_text, eval_mode

with warnings.catch_warnings():
    # fvcore's import scripts a loss function with torch.jit.script, which torch deprecates.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

log = logging.getLogger(__name__)

UNIT = "GMACs (fvcore counts one multiply-add as one FLOP)"

# Element-wise, reduction and pooling ops that fvcore has no handle for, counted as zero multiply-adds:
# fvcore's own convention for add and mul, and what the official hand counter leaves out as well (residual
# adds, activations, squeeze-excitation gates, token means, pooling). Any other op fvcore cannot count is an
# error unless the caller gives a handle for it (``handles=``).
ELEMENTWISE_OPS: frozenset[str] = frozenset(f"aten::{op}{suffix}" for op in (
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "pow", "sqrt", "rsqrt", "exp", "log", "reciprocal", "sign",
    "maximum", "minimum", "where", "clamp_min", "clamp_max", "erf", "tanh", "sigmoid", "hardsigmoid", "hardswish",
    "hardtanh", "relu6", "leaky_relu", "elu", "gelu", "silu", "mish", "softmax", "log_softmax", "mean", "sum",
    "amax", "var", "std", "max_pool2d", "avg_pool2d", "max_pool1d", "avg_pool1d", "adaptive_max_pool2d",
    "fill", "zero", "repeat", "tile", "roll", "flip", "pad",
) for suffix in ("", "_"))
Handle = Callable[[list[Any], list[Any]], int] | None  # fvcore's handle signature; None counts zero

# Components of a model, for the breakdown; see component_of.
COMPONENTS = ("cnn", "latent", "x2z", "z2x", "last_ca", "heads")


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention``: the multiply-adds of Q.K^T and of
    attention.V, batch and head axes included (softmax and scaling are not counted, as for the other
    element-wise ops)."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    if q is None or k is None or v is None:
        raise ValueError("scaled_dot_product_attention traced without complete input shapes")
    *batch, length, width = q
    keys = k[-2]
    return prod(batch) * length * keys * (width + v[-1])


def component_of(name: str) -> str | None:
    """Component of the module or parameter called ``name`` in a model made by ``create_model``:
    ``cnn`` (stem and stages; MSDNet's blocks), ``latent`` (latent array, token mixers and expanders, self-attention),
    ``x2z`` (feature-to-latent cross-attention with its depthwise convolution), ``z2x`` (latent-to-feature
    cross-attention of stages 2-4), ``last_ca`` (the last cross-attention), ``heads`` (every classifier
    with its isc; MSDNet's classifiers), ``other`` (anything else); None for containers that hold several components."""
    parts = name.split(".") if name else []
    if not parts:
        return None
    if parts[0] in ("backbone", "blocks"):  # blocks: MSDNet's
        return "cnn"
    if parts[0] == "classifier":  # MSDNet's exit heads
        return "heads"
    if parts[0] == "latent":
        return "latent"
    if parts[0] == "latent_stages":
        return None if len(parts) < 3 else {"x2z": "x2z", "z2x": "z2x"}.get(parts[2], "latent")
    if parts[0] == "exits":
        if len(parts) < 2 or (parts[1] == "merge" and len(parts) < 3):
            return None
        return "last_ca" if parts[1:3] == ["merge", "cross"] else "heads"
    return "other"


@dataclass(frozen=True)
class ExitCosts:
    """Per-image costs of a multi-exit model at one input size.

    ``segment_macs[k]``: multiply-adds of segment k alone; ``macs``: cumulative (exit k = segments
    0..k); ``params[k]``: parameters of everything that runs up to exit k (cumulative);
    ``component_macs`` / ``component_params``: the whole model split by component (see
    :func:`component_of`).
    """

    exit_names: tuple[str, ...]
    segment_macs: tuple[int, ...]
    params: tuple[int, ...]
    component_macs: dict[str, int]
    component_params: dict[str, int]
    input_size: int

    @property
    def macs(self) -> tuple[int, ...]:
        return tuple(accumulate(self.segment_macs))

    @property
    def gmacs(self) -> tuple[float, ...]:
        return tuple(m / 1e9 for m in self.macs)

    def table(self) -> pd.DataFrame:
        """One row per exit, in exit order: ``exit`` (name), ``index``, ``gmacs`` (cumulative),
        ``segment_gmacs``, ``cost_share`` (of the last exit), ``params`` (cumulative), ``input_size``,
        ``unit``."""
        total = self.macs[-1]
        return pd.DataFrame({
            "exit": list(self.exit_names),
            "index": range(len(self.exit_names)),
            "gmacs": self.gmacs,
            "segment_gmacs": [m / 1e9 for m in self.segment_macs],
            "cost_share": [m / total if total else float("nan") for m in self.macs],
            "params": list(self.params),
            "input_size": self.input_size,
            "unit": UNIT,
        })

    def component_table(self) -> pd.DataFrame:
        """One row per component (in :data:`COMPONENTS` order, then any other), with ``params`` and
        ``gmacs`` of the whole model (all segments), and a ``total`` row."""
        names = [c for c in COMPONENTS if c in self.component_params or c in self.component_macs]
        names += sorted((set(self.component_params) | set(self.component_macs)) - set(names))
        rows = [{"component": c, "params": self.component_params.get(c, 0),
                 "gmacs": self.component_macs.get(c, 0) / 1e9} for c in names]
        rows.append({"component": "total", "params": sum(self.component_params.values()),
                     "gmacs": sum(self.component_macs.values()) / 1e9})
        return pd.DataFrame(rows)

    def to_csv(self, path: str | Path) -> None:
        """Writes :meth:`table` as CSV, atomically."""
        atomic_write_text(path, self.table().to_csv(index=False))


class _Segment(nn.Module):
    """Segment ``k`` of ``model`` (or, with ``k`` None, its ``init_state``) as a function of the input
    state's tensors (the image) that returns all tensors of the new state, so that tracing keeps all its
    work; keeps the output for the next segment."""

    def __init__(self, model: MultiExitModel, k: int | None, s: Any):
        super().__init__()
        self.model = model
        self.k = k
        if k is None:
            self.inputs, self.rebuild = [s], lambda tensors: tensors[0]
        else:
            self.inputs, self.rebuild = flatten(s)
        self.output: Any = None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = self.rebuild(tensors)
        s = self.model.init_state(given) if self.k is None else self.model.run_segment(self.k, given)
        out, rebuild = flatten(s)
        self.output = rebuild(tuple(t.detach() for t in out))
        return tuple(out)


def _flop_counter(module: nn.Module, inputs: tuple, handles: Mapping[str, Handle] | None = None) -> FlopCountAnalysis:
    """fvcore's counter of ``module(*inputs)`` with dynexit's handles (SDPA counted, ELEMENTWISE_OPS as zero)
    and the caller's ``handles`` (op name -> fvcore handle, or None for zero), which win."""
    counter = FlopCountAnalysis(module, inputs)
    counter.set_op_handle(**dict.fromkeys(ELEMENTWISE_OPS))  # None: fvcore skips them without a warning
    counter.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    if handles:
        counter.set_op_handle(**check_handles(handles))
    # Each segment runs only part of the model by design; unsupported ops are checked below instead.
    counter.uncalled_modules_warnings(False).unsupported_ops_warnings(False)
    return counter


def resolve_handles(named: Mapping[str, str] | None, import_functions: bool = True) -> dict[str, Handle]:
    """Op handles as a spec (``model.op_handles``) or ``--op-handle`` names them: ``{"aten::op": "zero"}``
    (counted as zero) or ``{"aten::op": "package.module:function"}`` (fvcore's handle signature), imported
    unless ``import_functions`` is False (then only the names' form is checked)."""
    from dynexit.models.interface import check_factory_name, load_factory

    handles: dict[str, Handle] = {}
    for op, name in (named or {}).items():
        if not isinstance(name, str):
            raise ValueError(f"op handle for {op}: 'zero' or 'package.module:function', got {name!r}")
        if name == "zero":
            handles[op] = None
        elif import_functions:
            handles[op] = load_factory(name, what=f"op handle for {op}")
        else:
            check_factory_name(name)
            handles[op] = None
    return check_handles(handles)


def check_handles(handles: Mapping[str, Handle]) -> dict[str, Handle]:
    """``handles`` checked: op names of the form ``aten::name``, values callables or None."""
    for op, handle in handles.items():
        if not isinstance(op, str) or "::" not in op:
            raise ValueError(f"op handle {op!r}: name the op as the trace does, e.g. 'aten::rsub'")
        if handle is not None and not callable(handle):
            raise TypeError(f"op handle for {op}: a function (inputs, outputs) -> multiply-adds, or None for "
                            f"zero; got {type(handle).__name__}")
    return dict(handles)


def count_costs(model: MultiExitModel, input_size: int | None = None,
                handles: Mapping[str, Handle] | None = None) -> ExitCosts:
    """Counts the per-image cost of every exit of ``model`` (see the module docstring): any model with
    segments (:mod:`dynexit.models.interface`); TypeError naming what a model without them lacks.
    ``handles``: fvcore handles for ops it cannot count (``{"aten::op": fn(inputs, outputs) -> int}``; None
    counts an op as zero), beside dynexit's own.

    ``input_size`` defaults to the model's configured one. The model is counted in eval mode (its mode
    is restored after) on one random image, without touching the global random state. Raises
    ValueError naming any op fvcore cannot count that has no handle.
    """
    exit_names = check_multi_exit_model(model, need_segments=True, purpose="counting per-exit costs")
    size = model_setting(model, "input_size") if input_size is None else input_size
    if size is None:
        raise ValueError(f"{type(model).__name__} does not say its input size (no config.input_size or "
                         f"input_size): give input_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"input_size must be a positive int, got {size!r}")
    first = next(model.parameters())
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(first)

    called: set[nn.Module] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _args: called.add(mod)) for m in model.modules()]
    seen: set[int] = {id(p) for p in model.parameters(recurse=False)}  # used by init_state
    segment_macs, params = [], []
    component_macs: dict[str, int] = {}
    try:
        with eval_mode(model), torch.no_grad():
            s, init_macs = images, 0
            for k in [None, *range(len(exit_names))]:  # init_state's work counts in the first exit
                segment = _Segment(model, k, s)
                counter = _flop_counter(segment, tuple(segment.inputs), handles)
                macs = int(counter.total())  # runs the analysis
                unsupported = counter.unsupported_ops()
                if unsupported:
                    ops = ", ".join(f"{op} (x{n})" for op, n in sorted(unsupported.items()))
                    where = "init_state" if k is None else f"segment {k}"
                    raise ValueError(f"fvcore cannot count {ops} in {where} of {type(model).__name__}: give a "
                                     f"handle for it (count_costs(..., handles={{op: function or None}}), "
                                     f"--op-handle on the command line; None counts it as zero)")
                _add_component_macs(component_macs, counter, model)
                s = segment.output
                if k is None:
                    init_macs = macs
                    continue
                segment_macs.append(macs + (init_macs if k == 0 else 0))
                for module in called:
                    seen.update(id(p) for p in module.parameters(recurse=False))
                params.append(sum(p.numel() for p in model.parameters() if id(p) in seen))
    finally:
        for h in hooks:
            h.remove()

    component_params: dict[str, int] = {}
    for name, p in model.named_parameters():
        c = component_of(name) or "other"
        component_params[c] = component_params.get(c, 0) + p.numel()
    costs = ExitCosts(exit_names, tuple(segment_macs), tuple(params), component_macs,
                      component_params, size)
    log.debug("costs at %d px: %s GMACs", size, ", ".join(f"{g:.4f}" for g in costs.gmacs))
    return costs


def count_macs(model: nn.Module, input_size: int, handles: Mapping[str, Handle] | None = None) -> int:
    """Multiply-adds of one forward pass of any module on one ``input_size`` image, counted like
    :func:`count_costs` (the same fvcore handles): the work of a single-exit baseline such as a
    torchvision classifier. The model is counted in eval mode; its mode is restored after."""
    first = next(model.parameters())
    images = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(first)
    with eval_mode(model):
        with torch.no_grad():
            return int(_flop_counter(model, (images,), handles).total())


def exit_costs(model: MultiExitModel, input_size: int | None = None,
               handles: Mapping[str, Handle] | None = None) -> pd.DataFrame:
    """:func:`count_costs` as its per-exit table (:meth:`ExitCosts.table`: ``exit``, ``gmacs``, ``params``, ...)."""
    return count_costs(model, input_size, handles).table()


def _add_component_macs(totals: dict[str, int], counter: FlopCountAnalysis, model: nn.Module) -> None:
    """Adds one segment's count to ``totals`` by component: each module whose component is known and
    whose parent spans several counts once; ops outside any component go to ``other``."""
    counted = 0
    for name, _ in model.named_modules():
        c = component_of(name)
        parent = name.rpartition(".")[0]
        if c is None or (parent and component_of(parent) is not None):
            continue
        macs = int(counter.total(f"model.{name}"))
        if macs:
            totals[c] = totals.get(c, 0) + macs
            counted += macs
    rest = int(counter.total()) - counted
    if rest:
        totals["other"] = totals.get("other", 0) + rest


def format_costs(costs: ExitCosts, title: str = "") -> str:
    """The exit and component tables as text (for the command line)."""
    lines = [f"{title + ': ' if title else ''}cost per image at {costs.input_size}x{costs.input_size}, "
             f"cumulative along the exits; {UNIT}"]
    lines.append(f"  {'#':>2} {'exit':<10} {'GMACs':>9} {'segment':>9} {'share':>6} {'params (M)':>11}")
    for row in costs.table().itertuples():
        lines.append(f"  {row.index:>2} {row.exit:<10} {row.gmacs:>9.4f} {row.segment_gmacs:>9.4f} "
                     f"{row.cost_share:>6.3f} {row.params / 1e6:>11.3f}")
    lines.append("")
    lines.append("components (whole model):")
    lines.append(f"  {'component':<10} {'GMACs':>9} {'params (M)':>11}")
    for row in costs.component_table().itertuples():
        lines.append(f"  {row.component:<10} {row.gmacs:>9.4f} {row.params / 1e6:>11.3f}")
    return "\n".join(lines)
