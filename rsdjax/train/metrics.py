"""Training metrics: a rich progress bar, one JSON line per step, TensorBoard events, a loss PNG.

Only the first process writes. On resume the JSONL is cut back to the restored step and
TensorBoard purges later events (`purge_step`), so a killed-and-resumed run logs each step once.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"  # one line per held-out evaluation: {"step", "eval": {source: metrics}}
LOSS_PNG = "loss.png"


def flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward), PaLM appendix B convention.

    6 x (parameters used in matmuls: all but the embedding lookup) + 12 x layers x heads x
    head_dim x seq_len for attention scores and values. Rematerialisation is not counted (MFU, not HFU).
    """
    matmul_params = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
    return 6.0 * matmul_params + attention


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines for steps after `last_step` (they are redone after a resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float | None, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True, print_every: int = 10):
        self.enabled, self.total, self.start = enabled, total_steps, start_step
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.print_every = max(print_every, 1)
        self.path = Path(run_dir) / METRICS_FILE
        self.eval_path = Path(run_dir) / EVAL_FILE
        self._last_time = None
        self._pending = None  # (step, metrics, extra, finished_at) kept back by log_after_next
        self.rows: list[dict] = []  # every step row this logger logged (this run's steps), on every process
        self._eval_status = ""
        self._tb = self._progress = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        truncate_jsonl(self.eval_path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        from rich.console import Console

        console = Console(stderr=True)
        if progress and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="compiling")
            self._progress.start()

    def start_clock(self) -> None:
        self._last_time = time.perf_counter()

    def log_after_next(self, step: int, metrics: dict, extra: dict | None = None) -> dict | None:
        """Keep step `step`'s (device) metrics and log the ones kept before, if any (returned).

        Called right after dispatching a step, this reads the *previous* step's values, which are ready
        or nearly so, and the host goes on to the next batch while the device runs: `float()` on this
        step's values would wait for the whole step first. `flush()` before anything that must see
        every step logged (a checkpoint, the end); `log_eval` flushes by itself.
        """
        row = self.flush()
        # a step already finished when handed over ends now; timed when its values are read (after the
        # next step was dispatched), it would also take in what the host did in between
        done = time.perf_counter() if all(getattr(v, "is_ready", lambda: True)() for v in metrics.values()) else None
        self._pending = (step, metrics, extra, done)
        return row

    def flush(self, late: Callable[[], dict] | None = None) -> dict | None:
        """Log the metrics `log_after_next` kept back (the row; None if there were none). `late`: more
        values for the row (an evaluation), computed after the step's time is taken."""
        pending, self._pending = self._pending, None
        return self.log(*pending, late=late) if pending else None

    def log(self, step: int, metrics: dict, extra: dict | None = None, finished_at: float | None = None,
            late: Callable[[], dict] | None = None) -> dict:
        """Record the metrics of update number `step` (1-based: the step count after it); `finished_at`:
        when the step was seen finished (perf_counter), else when its values are read; `late`: as in flush."""
        # read the values first: that waits for the step, so its time ends when it finished
        values = {k: float(metrics[k]) for k in ("loss", "lr", "grad_norm", "tokens")}
        now = finished_at if finished_at is not None else time.perf_counter()
        seconds = now - self._last_time if self._last_time is not None else float("nan")
        self._last_time = now
        if late is not None:  # run before the next step is dispatched: its time starts after this work
            extra = {**(extra or {}), **late()}
            self._last_time = time.perf_counter()
        tps = self.tokens_per_step / seconds if seconds > 0 else float("nan")
        row = {"step": step, "loss": values["loss"], "lr": values["lr"], "grad_norm": values["grad_norm"],
               "tokens_per_s": tps, "step_s": seconds,
               "mfu": (tps * self.flops_per_token / self.peak_flops) if self.peak_flops else None,
               "loss_tokens": values["tokens"], **(extra or {})}
        self.rows.append(row)
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if row[k] is not None and row[k] == row[k]:
                    self._tb.add_scalar(f"train/{k}", row[k], step)
        status = (f"loss {row['loss']:.4f}  {tps:,.0f} tok/s" + (f"  MFU {row['mfu']:.1%}" if row["mfu"] else "")
                  + self._eval_status)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)
        elif step % self.print_every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {status}  lr {row['lr']:.2e}  grad_norm {row['grad_norm']:.3f}",
                  file=sys.stderr, flush=True)
        return row

    def log_eval(self, step: int, run_eval: Callable[[], dict[str, dict]]) -> dict[str, dict]:
        """Run a held-out evaluation after update `step` and record it: eval.jsonl, TensorBoard, the
        progress line. The step's own pending line is logged first, so it comes before its evaluation's
        and neither its time nor the next step's includes the evaluation."""
        self.flush()
        results = run_eval()
        if self._last_time is not None:
            self._last_time = time.perf_counter()
        if not self.enabled:
            return results
        with open(self.eval_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "eval": results}) + "\n")
        if self._tb is not None:
            for name, r in results.items():
                for k in ("loss", "perplexity", "bits_per_byte"):
                    self._tb.add_scalar(f"eval/{name}/{k}", r[k], step)
        line = ", ".join(f"{name} {r['loss']:.3f} ({r['bits_per_byte']:.3f} bpb)" for name, r in results.items())
        self._eval_status = f"  eval {line}"
        if self._progress is not None:
            self._progress.console.print(f"eval step {step}/{self.total}: {line}")
        else:
            print(f"eval step {step}/{self.total}: {line}", file=sys.stderr, flush=True)
        return results

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def plot_loss(jsonl: Path, png: Path, title: str = "training loss") -> Path | None:
    """Loss (and learning rate) against step, from the metrics file; held-out losses from eval.jsonl beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="train loss")
    eval_file = Path(jsonl).with_name(EVAL_FILE)
    evals = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()] if eval_file.exists() else []
    for name in dict.fromkeys(n for e in evals for n in e["eval"]):
        points = [(e["step"], e["eval"][name]["loss"]) for e in evals if name in e["eval"]]
        ax.plot(*zip(*points), marker="o", linestyle="--", label=f"held-out {name}")
    if evals:
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
