"""Tables and JSON for the planner's results (what `rsdjax plan` prints)."""
from __future__ import annotations

from rsdjax.config import ModelConfig
from rsdjax.hardware import HardwareSpec
from rsdjax.plan.cost_model import Assumptions, Workload
from rsdjax.plan.planner import Plan, ScalingRow


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def header(cfg: ModelConfig, hw: HardwareSpec, wl: Workload, assume: Assumptions) -> str:
    nbytes = assume.dtype_bytes(hw)
    params = cfg.num_params()
    count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
    lines = [f"model {cfg.name}: {count} params x {nbytes} B = {gb(params * nbytes)}   "
             f"hardware {hw.name}: {hw.nodes} x {hw.devices_per_node} {hw.device.name}, "
             f"{gb(hw.device.usable_bytes)} usable each, {hw.total_power_w / 1e3:.1f} kW"]
    if wl.mode == "infer":
        batch = "best that fits (<= 256)" if wl.batch == 0 else str(wl.batch)
        lines.append(f"inference: batch {batch} per replica, KV cache {wl.seq} tokens, prompt {wl.prompt_len} "
                     f"(prefill chunks of {wl.chunk_len}); speeds calibrated on published "
                     "measurements (plan --calibration)")
    else:
        lines.append(f"training: global batch {wl.batch} x {wl.seq} tokens, AdamW, remat={cfg.remat}; "
                     "speeds calibrated on published measurements (plan --calibration)")
    return "\n".join(lines)


def plan_table(cfg: ModelConfig, plans: list[Plan], mode: str, top: int, show_rejected: bool) -> str:
    fitting = [p for p in plans if p.fits]
    rejected = [p for p in plans if not p.fits]
    if mode == "infer":
        cols = f"{'rank':<5}{'mesh':<34}{'layers/stage':>13}{'mem/device':>12}{'batch':>7}{'TTFT ms':>10}" \
               f"{'ITL ms':>9}{'tok/s/replica':>15}{'tok/s/system':>14}{'tok/s/W':>9}"
    else:
        cols = f"{'rank':<5}{'mesh':<34}{'layers/stage':>13}{'mem/device':>12}{'microb.':>8}{'step s':>9}" \
               f"{'bubble':>8}{'tok/s':>12}{'tok/s/W':>9}"
    out = [cols, "-" * len(cols)]
    for i, p in enumerate(fitting[:top], 1):
        e = p.estimate
        first = f"{i:<5}{p.mesh_str:<34}{p.layers_per_stage(cfg):>13}{gb(e.memory.total):>12}"
        if mode == "infer":
            out.append(first + f"{e.workload.batch:>7}{e.ttft_s * 1e3:>10.2f}{e.decode_round_s * 1e3:>9.2f}"
                       f"{_num(e.tokens_per_s_replica):>15}{_num(e.tokens_per_s_system):>14}"
                       f"{e.tokens_per_s_per_w:>9.3f}")
        else:
            out.append(first + f"{e.microbatches:>8}{e.train_step_s:>9.3f}{e.times['bubble_fraction']:>8.0%}"
                       f"{_num(e.tokens_per_s_system):>12}{e.tokens_per_s_per_w:>9.3f}")
    if not fitting:
        out.append("(no plan fits)")
    elif len(fitting) > top:
        out.append(f"... {len(fitting) - top} more plans fit (--top N to show them)")
    if rejected:
        out.append(f"rejected: {len(rejected)} of {len(plans)} splits")
        for p in rejected if show_rejected else rejected[:5]:
            out.append(f"  {p.mesh_str:<34} {p.reason}")
        if not show_rejected and len(rejected) > 5:
            out.append(f"  ... {len(rejected) - 5} more (--all to list them)")
    if fitting:
        out.append(f"best plan: --mesh {fitting[0].mesh_str}")
    return "\n".join(out)


def plan_dict(cfg: ModelConfig, p: Plan) -> dict:
    d = {"mesh": p.mesh, "mesh_str": p.mesh_str, "fits": p.fits, "reason": p.reason,
         "layers_per_stage": p.layers_per_stage(cfg)}
    e = p.estimate
    if e is not None:
        d.update({"memory_bytes": {**vars(e.memory), "total": e.memory.total}, "capacity_bytes": e.capacity,
                  "step_bytes": e.step_bytes,
                  "batch": e.workload.batch, "microbatches": e.microbatches, "times_s": e.times,
                  "ttft_s": e.ttft_s, "decode_round_s": e.decode_round_s, "train_step_s": e.train_step_s,
                  "tokens_per_s_replica": e.tokens_per_s_replica, "tokens_per_s_system": e.tokens_per_s_system,
                  "tokens_per_s_per_w": e.tokens_per_s_per_w})
    return d


def scaling_table(rows: list[tuple[ScalingRow, int]]) -> str:
    per_node = next((r.best.estimate.tokens_per_s_system for r, n in rows if n == 1 and r.best), None)
    cols = f"{'topology':<12}{'devices':>8}{'power kW':>10}  {'best mesh':<34}{'batch':>7}{'tok/s/system':>14}" \
           f"{'tok/s/W':>9}{'vs linear':>11}"
    out = [cols, "-" * len(cols)]
    for row, nodes in rows:
        if row.best is None:
            out.append(f"{row.label:<12}{row.devices:>8}{row.power_w / 1e3:>10.2f}  {'(does not fit)':<34}")
            continue
        e = row.best.estimate
        eff = row.efficiency(per_node, nodes) if nodes else None
        out.append(f"{row.label:<12}{row.devices:>8}{row.power_w / 1e3:>10.2f}  {row.best.mesh_str:<34}"
                   f"{e.workload.batch:>7}{_num(e.tokens_per_s_system):>14}{e.tokens_per_s_per_w:>9.3f}"
                   f"{(f'{eff:.0%}' if eff is not None else '-'):>11}")
    out.append("vs linear: system tokens/s over (nodes x one node's); replicas behind the router share nothing")
    return "\n".join(out)
