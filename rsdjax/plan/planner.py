"""The planner: every data x stage x fsdp x tensor split of the hardware, checked and ranked.

For each factorisation of the device count it asks the rule resolver whether every parameter divides
(heads, KV heads, MLP width, vocabulary, layers), the cost model whether it fits in device memory,
and ranks the plans that fit by the roofline estimate. A rejected plan keeps its reason.
"""
from __future__ import annotations

import dataclasses
import math

from rsdjax.config import ModelConfig
from rsdjax.hardware import MESH_AXES, HardwareSpec, format_mesh
from rsdjax.parallel.rules import ShardingError
from rsdjax.plan.cost_model import Assumptions, Workload
from rsdjax.plan.estimate import Estimate, estimate

MAX_AUTO_BATCH = 256


@dataclasses.dataclass
class Plan:
    mesh: dict[str, int]
    estimate: Estimate | None  # None when the mesh cannot run the model at all
    reason: str | None = None  # why the plan is rejected; None if it fits

    @property
    def fits(self) -> bool:
        return self.reason is None

    @property
    def mesh_str(self) -> str:
        return format_mesh(self.mesh)

    def layers_per_stage(self, cfg: ModelConfig) -> int:
        return cfg.num_layers // self.mesh["stage"]


def factorizations(n: int) -> list[dict[str, int]]:
    """Every (data, stage, fsdp, tensor) with product n."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    out = []
    for data in divisors:
        for stage in (d for d in divisors if (n // data) % d == 0):
            rest = n // data // stage
            for fsdp in (d for d in divisors if rest % d == 0):
                out.append(dict(zip(MESH_AXES, (data, stage, fsdp, rest // fsdp))))
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def memory_reason(est: Estimate) -> str:
    mem = est.memory
    parts = [(k, getattr(mem, k)) for k in ("weights", "kv_cache", "gradients", "optimizer", "activations")]
    detail = ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in parts if v)
    return f"needs {_gb(mem.total)} per device > {_gb(est.capacity)} usable ({detail})"


def evaluate(cfg: ModelConfig, hw: HardwareSpec, mesh: dict[str, int], wl: Workload,
             assume: Assumptions) -> Plan:
    """One mesh. In inference with batch 0 the batch is the largest (<= 256) that fits ("best batch")."""
    try:
        if wl.mode == "infer" and wl.batch == 0:
            return _best_batch(cfg, hw, mesh, wl, assume)
        est = estimate(cfg, hw, mesh, wl, assume)
    except (ShardingError, ValueError) as e:
        return Plan(mesh, None, str(e))
    return Plan(mesh, est, None if est.fits else memory_reason(est))


def _best_batch(cfg, hw, mesh, wl, assume) -> Plan:
    """Batches are multiples of the stage count, so a pipeline always runs S microbatches and memory
    grows with the batch: bisect for the largest that fits. Plans are rejected only if batch 1 does not."""
    step = mesh["stage"]
    est = lambda k: estimate(cfg, hw, mesh, dataclasses.replace(wl, batch=k * step), assume)  # noqa: E731
    one = estimate(cfg, hw, mesh, dataclasses.replace(wl, batch=1), assume)
    if not one.fits:
        return Plan(mesh, one, memory_reason(one))
    if not est(1).fits:
        return Plan(mesh, one)
    lo, hi = 1, MAX_AUTO_BATCH // step + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if est(mid).fits else (lo, mid)
    return Plan(mesh, est(lo))


OBJECTIVES = ("throughput", "latency", "tps-per-watt")


def rank_key(plan: Plan, objective: str):
    est = plan.estimate
    if objective == "latency":
        return (est.decode_round_s or est.train_step_s, est.ttft_s or 0.0)
    if objective == "tps-per-watt":
        return (-est.tokens_per_s_per_w, -est.tokens_per_s_system)
    return (-est.tokens_per_s_system, est.ttft_s or 0.0, -plan.mesh["data"])


def plan_all(cfg: ModelConfig, hw: HardwareSpec, wl: Workload, assume: Assumptions | None = None,
             objective: str = "throughput") -> list[Plan]:
    """All factorisations of the hardware: those that fit first, best first, then the rejected."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'")
    assume = assume or Assumptions.calibrated()
    plans = [evaluate(cfg, hw, mesh, wl, assume) for mesh in factorizations(hw.num_devices)]
    fitting = sorted((p for p in plans if p.fits), key=lambda p: rank_key(p, objective))
    # rejected: the nearest misses (least memory) first, then the splits the model does not divide
    rejected = sorted((p for p in plans if not p.fits),
                      key=lambda p: (p.estimate is None, p.estimate.memory.total if p.estimate else 0.0))
    return fitting + rejected


def choose(cfg: ModelConfig, hw: HardwareSpec, wl: Workload, assume: Assumptions | None = None,
           objective: str = "throughput", runnable=None) -> tuple[Plan, str]:
    """The best plan a command can run (`runnable(mesh)` -> None, or why it cannot) and the reason, in words.
    Raises ValueError when none fits or none is runnable, naming the nearest."""
    plans = plan_all(cfg, hw, wl, assume, objective)
    fitting = [p for p in plans if p.fits]
    if not fitting:
        near = plans[0] if plans else None
        raise ValueError(f"--hardware {hw.name}: no split of its {hw.num_devices} devices fits {cfg.name}"
                         + (f" (nearest {near.mesh_str}: {near.reason})" if near else ""))
    skipped = []
    for p in fitting:
        why = runnable(p.mesh) if runnable else None
        if why is None:
            break
        skipped.append(f"{p.mesh_str} ({why})")
    else:
        raise ValueError(f"--hardware {hw.name}: the {len(fitting)} splits that fit {cfg.name} cannot run here: "
                         + "; ".join(skipped[:3]))
    e = p.estimate
    speed = f"{e.tokens_per_s_system:,.0f} tok/s predicted" + (f", {e.tokens_per_s_per_w:.3f} tok/s/W"
                                                               if objective == "tps-per-watt" else "")
    reason = (f"best {objective} of {len(fitting)} splits that fit ({len(plans) - len(fitting)} rejected): {speed}, "
              f"{e.memory.total / 1e9:.2f} GB of {e.capacity / 1e9:.2f} GB per device")
    if skipped:
        reason += "; skipped " + "; ".join(skipped[:3])
    return p, reason


# ------------------------------------------------------------------ scaling: 1 card, 1 node, n nodes


def sub_topology(hw: HardwareSpec, devices_per_node: int, nodes: int) -> HardwareSpec:
    """The same devices in a smaller topology; its power is what those devices / nodes draw."""
    one_node = devices_per_node == hw.devices_per_node
    return dataclasses.replace(
        hw, name=f"{hw.name}[{nodes}x{devices_per_node}]", devices_per_node=devices_per_node, nodes=nodes,
        mesh={}, system_power_w=hw.system_power_w if (one_node and nodes == hw.nodes) else None,
        node_power_w=hw.node_power_w if one_node else None)


@dataclasses.dataclass
class ScalingRow:
    label: str
    devices: int
    power_w: float
    best: Plan | None  # None: nothing fits

    def efficiency(self, per_node: float | None, nodes: int) -> float | None:
        if not self.best or not per_node:
            return None
        return self.best.estimate.tokens_per_s_system / (per_node * nodes)


def scaling(cfg: ModelConfig, hw: HardwareSpec, wl: Workload, assume: Assumptions | None = None
            ) -> list[tuple[ScalingRow, int]]:
    """Best plan for 1 device, 1 node and 1, 2, 4, ... nodes up to the whole system: [(row, nodes)]."""
    counts = sorted({n for n in (2 ** k for k in range(int(math.log2(hw.nodes)) + 1))} | {hw.nodes})
    tops = [("1 device", sub_topology(hw, 1, 1), 0)] if hw.devices_per_node > 1 else []
    tops += [(f"{n} node{'s' if n > 1 else ''}", sub_topology(hw, hw.devices_per_node, n), n) for n in counts]
    rows = []
    for label, sub, nodes in tops:
        plans = plan_all(cfg, sub, wl, assume)
        best = plans[0] if plans and plans[0].fits else None
        rows.append((ScalingRow(label, sub.num_devices, sub.total_power_w, best), nodes))
    return rows
