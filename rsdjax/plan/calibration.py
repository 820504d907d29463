"""The cost model against published measurements (configs/measurements/*.yaml): predict, compare, fit.

Each point names a model, a hardware topology (preset + overrides), a workload and a metric:
  system_output_tok_s     output tokens/s of the whole system at the planner's best split (or the given mesh)
  stream_output_tok_s     output tokens/s of one sequence (1 / decode step), time to first token excluded
  train_tok_s_per_device  training tokens/s per device at the best split
Roles: `fit` points set the constants, `holdout` points only check them, `excluded` points are shown with
the reason they are left out. The fit moves the constants in cost_model.FITTED (log-space least squares on
log(predicted / measured)); the split and batch each plan runs are chosen by memory alone, so they are
found once and only the times are recomputed while fitting.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from rsdjax.config import CONFIG_ROOT, ConfigError, apply_overrides, load_model_config, load_yaml
from rsdjax.hardware import complete_mesh_shape, load_hardware
from rsdjax.plan.cost_model import FITTED, Assumptions, Workload
from rsdjax.plan.estimate import estimate
from rsdjax.plan.planner import evaluate, plan_all

METRICS = ("system_output_tok_s", "stream_output_tok_s", "train_tok_s_per_device")
ROLES = ("fit", "holdout", "excluded")
# bounds of each fitted term: physical ranges, so the fit cannot buy accuracy with nonsense
BOUNDS = {"compute_efficiency": (0.05, 1.0), "memory_efficiency": (1e-3, 1.0), "layer_latency_us": (0.1, 500.0),
          "step_latency_us": (1.0, 1e5), "intra_latency_us": (0.1, 200.0)}


def label(key: tuple[str | None, str]) -> str:
    device, name = key
    return name if device is None else f"{name}[{device}]"


def get_term(assume: Assumptions, key: tuple[str | None, str]) -> float:
    device, name = key
    default = getattr(assume, name)
    return default if device is None else float(assume.device_terms.get(device, {}).get(name, default))


def with_terms(assume: Assumptions, values: dict) -> Assumptions:
    """A copy of `assume` with {(device | None, term): value} applied."""
    devices = {k: dict(v) for k, v in assume.device_terms.items()}
    flat = {}
    for (device, name), v in values.items():
        if device is None:
            flat[name] = float(v)
        else:
            devices.setdefault(device, {})[name] = float(v)
    return dataclasses.replace(assume, **flat, device_terms=devices)


@dataclasses.dataclass
class Point:
    id: str
    what: str
    model: str
    hardware: str
    workload: dict
    metric: str
    measured: float
    role: str
    file: str = ""
    source: str = ""
    mesh: dict | None = None
    model_overrides: list[str] = dataclasses.field(default_factory=list)
    hardware_overrides: list[str] = dataclasses.field(default_factory=list)
    cost_overrides: list[str] = dataclasses.field(default_factory=list)
    unconfirmed: bool = False
    note: str = ""
    _candidates: list = dataclasses.field(default_factory=list, repr=False)


def load_points(directory: str | Path | None = None) -> list[Point]:
    directory = Path(directory) if directory else CONFIG_ROOT / "measurements"
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(f"no measurement files (*.yaml) in {directory}")
    fields = {f.name for f in dataclasses.fields(Point)} - {"file", "_candidates"}
    points = []
    for path in files:
        data = load_yaml(path)
        defaults = data.get("defaults", {})
        for i, raw in enumerate(data.get("points") or []):
            entry = {"source": data.get("source", ""), **defaults, **raw}
            where = f"{path}: point {raw.get('id', i)}"
            unknown = sorted(set(entry) - fields)
            missing = [k for k in ("id", "what", "model", "hardware", "workload", "metric", "measured", "role")
                       if k not in entry]
            if unknown or missing:
                problem = f"unknown key '{unknown[0]}'" if unknown else f"missing '{missing[0]}'"
                raise ConfigError(f"{where}: {problem}")
            p = Point(file=path.name, **entry)
            if p.metric not in METRICS:
                raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}, got '{p.metric}'")
            if p.role not in ROLES:
                raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}, got '{p.role}'")
            if not p.measured > 0:
                raise ConfigError(f"{where}: measured must be positive, got {p.measured}")
            points.append(p)
    ids = [p.id for p in points]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise ConfigError(f"{directory}: measurement id '{dup}' appears twice")
    return points


def _setup(p: Point, assume: Assumptions):
    cfg = load_model_config(p.model, p.model_overrides)
    hw = load_hardware(p.hardware, p.hardware_overrides)
    wl = Workload(**p.workload)
    return cfg, hw, wl, apply_overrides(dataclasses.replace(assume), p.cost_overrides)


def candidates(p: Point, assume: Assumptions) -> list[tuple[dict, Workload]]:
    """(mesh, workload with its batch) of every plan that fits: fixed by memory, so computed once."""
    if not p._candidates:
        cfg, hw, wl, a = _setup(p, assume)
        if p.mesh is not None and wl.batch > 0:
            # the measured system ran this split and batch: only its time is predicted (rsdjax's own memory
            # layout, e.g. a dense KV cache, may not fit where the measured stack's did)
            p._candidates = [(complete_mesh_shape(p.mesh, hw.num_devices), wl)]
            return p._candidates
        if p.mesh is not None:
            plans = [evaluate(cfg, hw, complete_mesh_shape(p.mesh, hw.num_devices), wl, a)]
        else:
            plans = plan_all(cfg, hw, wl, a)
        p._candidates = [(q.mesh, q.estimate.workload) for q in plans if q.fits]
        if not p._candidates:
            raise ValueError(f"measurement {p.id}: no split of {hw.name} fits {cfg.name} "
                             f"({plans[0].reason if plans else 'no plans'})")
    return p._candidates


def predict(p: Point, assume: Assumptions) -> tuple[float, str]:
    """(the metric at the best fitting plan, its mesh) under these constants."""
    cfg, hw, _, a = _setup(p, assume)
    best, best_mesh = 0.0, ""
    for mesh, wl in candidates(p, assume):
        est = estimate(cfg, hw, mesh, wl, a)
        if p.metric == "system_output_tok_s":
            value = est.tokens_per_s_system
        elif p.metric == "stream_output_tok_s":
            value = 1.0 / est.decode_round_s
        else:
            value = est.tokens_per_s_system / hw.num_devices
        if value > best:
            best, best_mesh = value, ",".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"
    return best, best_mesh


def fit(points: list[Point], assume: Assumptions | None = None) -> Assumptions:
    """Least squares on log(predicted / measured) over the `fit` points, constants in log space."""
    import numpy as np
    from scipy.optimize import least_squares

    assume = assume or Assumptions.calibrated()
    train = [p for p in points if p.role == "fit"]
    lo = np.log([BOUNDS[name][0] for _, name in FITTED])
    hi = np.log([BOUNDS[name][1] for _, name in FITTED])
    x0 = np.clip(np.log([get_term(assume, k) for k in FITTED]), lo + 1e-9, hi - 1e-9)

    def with_x(x) -> Assumptions:
        return with_terms(assume, {k: math.exp(v) for k, v in zip(FITTED, x)})

    def residuals(x):
        a = with_x(x)
        return np.array([math.log(predict(p, a)[0] / p.measured) for p in train])

    # a few starts (the given constants, then points inside each range): the cost surface has kinks where the
    # best split changes, so one start can stop in a poor local minimum
    starts = [x0, lo + (hi - lo) / 2, lo + (hi - lo) / 4]
    best = min((least_squares(residuals, x, bounds=(lo, hi), diff_step=1e-2, max_nfev=200) for x in starts),
               key=lambda r: r.cost)
    return with_x(best.x)


def write(assume: Assumptions, path: str | Path) -> None:
    """The fitted terms as configs/cost/calibrated.yaml reads them."""
    import yaml

    data = {"global": {}, "devices": {}}
    for key in FITTED:
        device, name = key
        target = data["global"] if device is None else data["devices"].setdefault(device, {})
        target[name] = float(f"{get_term(assume, key):.4g}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("# written by `rsdjax plan --calibration --fit --write` from configs/measurements/*.yaml;\n"
                          "# each term is explained in docs/cost_model.md\n" + yaml.safe_dump(data, sort_keys=False))


@dataclasses.dataclass
class Row:
    point: Point
    predicted: float
    mesh: str

    @property
    def error(self) -> float:
        return self.predicted / self.point.measured - 1.0


def compare(points: list[Point], assume: Assumptions) -> list[Row]:
    """Every point's prediction; an excluded point rsdjax cannot run is shown with the reason."""
    rows = []
    for p in points:
        try:
            rows.append(Row(p, *predict(p, assume)))
        except ValueError as e:
            if p.role != "excluded":
                raise
            rows.append(Row(p, float("nan"), str(e).split(": ", 1)[-1]))
    return rows


def table(rows: list[Row], assume: Assumptions) -> str:
    cols = f"{'point':<40}{'role':<9}{'metric':<24}{'measured':>10}{'predicted':>11}{'error':>8}  best split"
    out = [cols, "-" * (len(cols) + 20)]
    for r in rows:
        flag = " (unconfirmed)" if r.point.unconfirmed else ""
        pred = f"{r.predicted:>11,.0f}{r.error:>+8.0%}" if r.predicted == r.predicted else f"{'-':>11}{'-':>8}"
        out.append(f"{r.point.id:<40}{r.point.role:<9}{r.point.metric:<24}{r.point.measured:>10,.0f}"
                   f"{pred}  {r.mesh}{flag}")
    for role, limit in (("fit", 0.15), ("holdout", 0.30)):
        errs = [abs(r.error) for r in rows if r.point.role == role]
        if errs:
            worst = max(errs)
            out.append(f"{role}: {len(errs)} points, worst |error| {worst:.0%} "
                       f"({'within' if worst <= limit else 'OUTSIDE'} the {limit:.0%} target)")
    values = ", ".join(f"{label(k)}={get_term(assume, k):.4g}" for k in FITTED)
    out.append(f"constants ({len(FITTED)} fitted): {values}")
    return "\n".join(out)
