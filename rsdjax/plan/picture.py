"""A picture of how a model lies on the devices: `rsdjax shard-report ... --png FILE / --html FILE`.

One bar per device, stacked: every parameter (colour, with the mesh axes that split it and its bytes per
device in the legend), then gradients and optimizer state (training), the KV cache and the activations
from the cost model, under a line at the device's usable memory. Data-parallel replicas hold the same
bytes, so the bars are the devices of one replica (stage x fsdp x tensor), labelled by mesh coordinate;
past MAX_BARS only the first are drawn and the title says how many exist.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import itertools
import math

MAX_BARS = 64
# parameters take tab20c (blues, oranges, greens, purples, greys); these stand apart from all of them
EXTRA_COLOURS = {"gradients": "#8c564b", "optimizer": "#e377c2", "KV cache": "#17becf", "activations": "#d62728"}


@dataclasses.dataclass
class Picture:
    """What is drawn: bytes of each segment on each drawn device (the same numbers as the bars)."""

    title: str
    devices: list[str]  # mesh coordinate of each bar, e.g. "s0 f1 t3"
    segments: dict[str, list[float]]  # name -> bytes per drawn device, in stacking order
    labels: dict[str, str]  # name -> legend text
    capacity: float
    replicas: int
    total_devices: int

    def device_total(self, i: int) -> float:
        return sum(v[i] for v in self.segments.values())

    def as_dict(self) -> dict:
        return {"title": self.title, "devices": self.devices, "segments": self.segments, "capacity": self.capacity,
                "replicas": self.replicas, "total_devices": self.total_devices}


def _axes_of(spec) -> str:
    names = [a for part in spec for a in ((part,) if isinstance(part, str) else (part or ()))]
    return ",".join(names) if names else "replicated"


def build(rows, mesh: dict[str, int], capacity: float, title: str, extras: dict[str, float]) -> Picture:
    """rows: shard_report's ParamRows; extras: {'KV cache': bytes per device, ...} from the cost model."""
    coords = list(itertools.product(range(mesh["stage"]), range(mesh["fsdp"]), range(mesh["tensor"])))
    shown = coords[:MAX_BARS]
    devices = [f"s{s} f{f} t{t}" for s, f, t in shown]
    segments, labels = {}, {}
    for r in rows:
        # even splits: every device of a replica holds the same shard size (the resolver refuses uneven ones)
        segments[r.name] = [float(r.bytes_per_device)] * len(shown)
        labels[r.name] = f"{r.name} [{_axes_of(r.spec)}] {_size(r.bytes_per_device)}/device"
    for name, nbytes in extras.items():
        if nbytes:
            segments[name] = [float(nbytes)] * len(shown)
            labels[name] = f"{name} {_size(nbytes)}/device"
    return Picture(title, devices, segments, labels, capacity, mesh["data"], math.prod(mesh.values()))


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n:.0f} B"


def render_png(pic: Picture) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(pic.devices)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * n + 6), 6.5), dpi=110)
    cmap = plt.get_cmap("tab20c")
    bottom = [0.0] * n
    unit, unit_name = (1e9, "GB") if max(pic.device_total(i) for i in range(n)) >= 1e8 else (1e6, "MB")
    params = [k for k in pic.segments if k not in EXTRA_COLOURS]
    for j, name in enumerate(list(pic.segments)):
        values = [v / unit for v in pic.segments[name]]
        colour = EXTRA_COLOURS.get(name, cmap(params.index(name) % 20) if name in params else None)
        ax.bar(range(n), values, bottom=bottom, color=colour, width=0.85, label=pic.labels[name],
               edgecolor="white", linewidth=0.3)
        bottom = [b + v for b, v in zip(bottom, values)]
    top = max(pic.device_total(i) for i in range(n))
    if pic.capacity <= 3 * top:  # the memory line, unless it would squash the bars flat
        ax.axhline(pic.capacity / unit, color="black", linestyle="--", linewidth=1.2)
        ax.text(n - 0.5, pic.capacity / unit, f"usable {pic.capacity / unit:.2f} {unit_name}", va="bottom", ha="right")
        ax.set_ylim(0, max(pic.capacity, top) / unit * 1.12)
    else:
        ax.set_ylim(0, top / unit * 1.15)
        ax.text(n - 0.5, top / unit * 1.08, f"usable {_size(pic.capacity)} per device: off the scale "
                f"({top / pic.capacity:.1%} used)", ha="right")
    ax.set_xticks(range(n))
    ax.set_xticklabels(pic.devices, rotation=90, fontsize=7 if n > 24 else 9)
    ax.set_ylabel(f"{unit_name} per device")
    note = f"one replica of {pic.replicas} (data)" if pic.replicas > 1 else "all devices"
    if pic.total_devices // pic.replicas > n:
        note += f"; first {n} of {pic.total_devices // pic.replicas} devices per replica"
    ax.set_title(f"{pic.title}\n{note}", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_html(pic: Picture, png: bytes) -> str:
    """One self-contained page: the picture and the bytes behind it."""
    head = "".join(f"<th>{html.escape(d)}</th>" for d in pic.devices[:16])
    body = "".join(f"<tr><td>{html.escape(pic.labels[k])}</td>" + "".join(f"<td>{_size(v)}</td>" for v in vals[:16])
                   + "</tr>" for k, vals in pic.segments.items())
    more = f"<p>(first 16 of {len(pic.devices)} drawn devices)</p>" if len(pic.devices) > 16 else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(pic.title)}</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h2>{html.escape(pic.title)}</h2><img alt='sharding' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'><h3>bytes per device</h3><table><tr><th>segment</th>{head}</tr>"
            f"{body}</table>{more}</body></html>")
