"""One mesh, one workload -> memory per device and roofline times (see cost_model.py for the pieces)."""
from __future__ import annotations

import dataclasses
import math

from rsdjax.config import ModelConfig
from rsdjax.hardware import HardwareSpec
from rsdjax.parallel.pipeline import choose_microbatches
from rsdjax.plan.cost_model import (
    Assumptions, Workload, attention_flops, forward_working_bytes, layer_matmul_flops, layer_weight_bytes, link_for,
    local_dims, logits_bytes, train_residual_bytes, weight_bytes)


@dataclasses.dataclass
class Memory:
    """Bytes on one device."""

    weights: float
    kv_cache: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.gradients + self.optimizer + self.activations


@dataclasses.dataclass
class Estimate:
    mesh: dict[str, int]
    workload: Workload
    memory: Memory
    capacity: float  # usable bytes per device
    microbatches: int
    times: dict[str, float]  # seconds: compute / memory / communication parts of the step
    step_bytes: dict[str, float]  # total bytes per device while each compiled step runs (prefill, decode, train_step)
    ttft_s: float | None = None
    decode_round_s: float | None = None  # every sequence of a replica advances one token
    train_step_s: float | None = None
    tokens_per_s_replica: float = 0.0
    tokens_per_s_system: float = 0.0
    tokens_per_s_per_w: float = 0.0

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity


def _roofline(flops: float, nbytes: float, hw: HardwareSpec, assume: Assumptions) -> tuple[float, float]:
    """(compute seconds, memory seconds) at the achieved fractions of peak; the step takes the larger (they overlap)."""
    return flops / (hw.device.peak_tflops.value * 1e12 * assume.term(hw, "compute_efficiency")), \
        nbytes / (_bandwidth(hw, assume) * 1e9)


def _bandwidth(hw: HardwareSpec, assume: Assumptions) -> float:
    """Achieved GB/s of the device's memory."""
    return hw.device.mem_bandwidth_gbs.value * assume.term(hw, "memory_efficiency")


_SPLITS: dict[tuple, tuple[float, float]] = {}


def _split_weights(cfg: ModelConfig, mesh: dict[str, int], mode: str, nbytes: int) -> tuple[float, float]:
    """(bytes of the stacked layer weights, bytes of embedding / head / final norm) on one device.
    Memoized: the planner and the calibration fit ask for the same meshes many times."""
    key = (repr(cfg), tuple(sorted(mesh.items())), mode, nbytes)
    if key not in _SPLITS:
        _SPLITS[key] = _split_weights_uncached(cfg, mesh, mode, nbytes)
    return _SPLITS[key]


def _split_weights_uncached(cfg, mesh, mode, nbytes) -> tuple[float, float]:
    total = weight_bytes(cfg, mesh, mode, nbytes)
    one_layer = dataclasses.replace(cfg, num_layers=mesh["stage"])  # one layer per stage: the non-layer rest
    per_layer = (total - weight_bytes(one_layer, mesh, mode, nbytes)) / (cfg.num_layers - mesh["stage"]) \
        if cfg.num_layers > mesh["stage"] else None
    if per_layer is None:
        return total, 0.0
    layers = per_layer * cfg.num_layers
    return layers, total - layers


def estimate(cfg: ModelConfig, hw: HardwareSpec, mesh: dict[str, int], wl: Workload,
             assume: Assumptions | None = None) -> Estimate:
    """Raises ShardingError / ValueError when the mesh cannot run the model at all (with the reason)."""
    assume = assume or Assumptions.calibrated()
    c = assume.dtype_bytes(hw)
    if wl.mode == "infer":
        return _infer(cfg, hw, mesh, wl, assume, c)
    if wl.mode == "train":
        return _train(cfg, hw, mesh, wl, assume, c)
    raise ValueError(f"mode must be 'infer' or 'train', got '{wl.mode}'")


def _infer(cfg, hw, mesh, wl, assume, c) -> Estimate:
    d = local_dims(cfg, mesh)
    stages, b, s_len, p_len, chunk = mesh["stage"], wl.batch, wl.seq, wl.prompt_len, wl.chunk_len
    if p_len > s_len:
        raise ValueError(f"prompt length {p_len} exceeds the KV cache length {s_len}")
    m = 1 if stages == 1 else choose_microbatches(cfg.pipeline_microbatches, b * mesh["data"], mesh["data"], stages,
                                                  cached=True)
    bm = b // m
    layer_w, head_w = _split_weights(cfg, mesh, "infer", c)
    ckv = assume.kv_dtype_bytes(hw)
    kv = 2.0 * d.layers * b * s_len * d.kv_heads * d.head_dim * ckv

    def working(t: int, keys: int) -> float:
        """Transient bytes of a serving step (rsdjax.infer.steps) over t new tokens per sequence attending to
        `keys` positions: a prefill of a chunk (attending to itself, writing its own K/V, which insert then
        copies into the slots' cache) or a decode step (t = 1 over the whole cache, updated in place)."""
        layer = forward_working_bytes(d, bm, t, keys, c, assume.flash)
        if stages == 1:  # per-layer serving weights (infer/forward.py): no scan slices a layer out of a stack
            layer -= layer_weight_bytes(d, c)
        w = max(layer, c * b * t * d.embed) + logits_bytes(d, b, 1)  # logits of the last token only
        if t > 1:
            w += 2.0 * d.layers * b * t * d.kv_heads * d.head_dim * ckv
        if stages > 1:  # pipeline buffers: input, outputs, result, the permuted microbatch; its cache rows
            w += c * t * d.embed * (3 * b + bm) + 2.0 * d.layers * bm * keys * d.kv_heads * d.head_dim * ckv
        return w

    steps = {"prefill": working(chunk, chunk), "decode": working(1, s_len)}
    memory = Memory(weights=layer_w + head_w, kv_cache=kv, activations=max(steps.values()))
    step_bytes = {k: layer_w + head_w + kv + v for k, v in steps.items()}

    # decode reads the whole cache in rsdjax's masked attention; a flash kernel reads only the filled part,
    # on average the prompt plus half the output
    kv_read = p_len + max(1, s_len - p_len) // 2 if assume.flash else s_len
    t_link, s_link, f_link = (link_for(mesh, a, hw, assume) for a in ("tensor", "stage", "fsdp"))
    n_t, n_f = mesh["tensor"], mesh["fsdp"]

    def stage_time(rows: int, q_len: int) -> tuple[float, float, float]:
        """(compute, memory, communication) seconds for `rows` sequences of `q_len` new tokens on one stage."""
        keys, kv_heads = (kv_read, assume.decode_kv_heads(d)) if q_len == 1 else (s_len, d.kv_heads)
        flops = d.layers * (layer_matmul_flops(d, rows * q_len) + attention_flops(d, rows, q_len, keys, assume.flash))
        nbytes = layer_w + 2.0 * d.layers * rows * keys * kv_heads * d.head_dim * ckv  # weights + KV read
        comm = 2 * d.layers * t_link.all_reduce(rows * q_len * d.embed * c, n_t)  # one psum per block
        comm += d.layers * f_link.all_gather(layer_w / d.layers * n_f, n_f)  # fsdp: gather every layer
        if stages > 1:  # the activations move to the next stage: bytes over the link, plus the hop's fixed cost
            hop = assume.term(hw, "hop_latency_us") * 1e-6
            comm += s_link.permute(rows * q_len * d.embed * c) - s_link.latency_s + hop
        comm += d.layers * assume.term(hw, "layer_latency_us") * 1e-6  # fixed per-layer cost, not overlapped
        return (*_roofline(flops, nbytes, hw, assume), comm)

    def head_time(rows: int, q_len: int) -> float:
        comp, mem = _roofline(2.0 * rows * q_len * d.embed * d.vocab, head_w + logits_bytes(d, rows, q_len), hw,
                              assume)
        comm = t_link.all_reduce(rows * q_len * d.embed * c, n_t)  # embedding rows gathered from vocab shards
        comm += t_link.all_gather(rows * cfg.vocab_size * 4.0, n_t)  # last-token logits for sampling
        comm += s_link.all_reduce(rows * q_len * d.embed * c, stages) if stages > 1 else 0.0  # last stage -> all
        return max(comp, mem) + comm + assume.term(hw, "step_latency_us") * 1e-6  # one launch / sampling per step

    comp, mem, comm = stage_time(bm, 1)
    decode_round = max(m, stages) * (max(comp, mem) + comm) + head_time(b, 1)
    # TTFT of one prompt: its chunks flow through the stages back to back (a chunk needs only the
    # earlier chunks' keys of the same stage), so n chunks take n + S - 1 stage slots
    chunks = math.ceil(p_len / chunk)
    p_comp, p_mem, p_comm = stage_time(1, chunk)
    ttft = (chunks + stages - 1) * (max(p_comp, p_mem) + p_comm) + chunks * head_time(1, chunk)
    # sustained output rate: a batch of b requests spends b prefills (stages overlap different prompts, so no
    # fill) and `out` decode rounds; continuous batching interleaves the same work
    out = max(1, s_len - p_len)
    prefill = chunks * (max(p_comp, p_mem) + p_comm + head_time(1, chunk))
    per_replica = b * out / (out * decode_round + b * prefill)
    system = per_replica * mesh["data"]
    times = {"decode_compute_s": max(m, stages) * comp, "decode_memory_s": max(m, stages) * mem,
             "decode_comm_s": max(m, stages) * comm, "prefill_per_request_s": prefill}
    return Estimate(mesh, wl, memory, hw.device.usable_bytes, m, times, step_bytes, ttft_s=ttft,
                    decode_round_s=decode_round, tokens_per_s_replica=per_replica, tokens_per_s_system=system,
                    tokens_per_s_per_w=system / hw.total_power_w)


def _train(cfg, hw, mesh, wl, assume, c) -> Estimate:
    d = local_dims(cfg, mesh)
    stages, t, accum = mesh["stage"], wl.seq, wl.grad_accum
    shards = mesh["data"] * mesh["fsdp"]
    if wl.batch % (shards * accum):
        raise ValueError(f"global batch {wl.batch} does not split into {accum} micro-batches over data x fsdp = {shards}")
    micro = wl.batch // accum  # rows of one micro-batch (TrainStep's gradient accumulation); b of them per device
    b = micro // shards
    m = choose_microbatches(cfg.pipeline_microbatches, micro, shards, stages, cached=False) if stages > 1 else 1
    bm = b // m
    layer_w, head_w = _split_weights(cfg, mesh, "train", c)
    w = layer_w + head_w
    ticks = m + stages - 1  # GPipe: fill and drain bubbles included
    # autodiff keeps every layer's residuals for every tick the stage runs (bubble ticks included)
    per_layer = c * bm * t * d.embed if cfg.remat else train_residual_bytes(d, bm, t, c, assume.flash)
    saved = ticks * d.layers * per_layer
    working = train_residual_bytes(d, bm, t, c, assume.flash) + 3 * logits_bytes(d, b, t)  # one layer's backward + loss
    if stages > 1:  # pipeline buffers: input, outputs, result, the permuted microbatch
        working += c * t * d.embed * (3 * b + bm)
    # accumulating: a float32 sum of the micro-batches' gradients beside the current one's
    gradients = w + (w * 4.0 / c if accum > 1 else 0.0)
    memory = Memory(weights=w, gradients=gradients, optimizer=assume.optimizer_moments * w,
                    activations=saved + working)

    t_link, s_link, f_link, d_link = (link_for(mesh, a, hw, assume) for a in ("tensor", "stage", "fsdp", "data"))
    n_t, n_f = mesh["tensor"], mesh["fsdp"]
    act = bm * t * d.embed * c  # one microbatch's residual stream

    # one tick = one microbatch forward and backward through this stage's layers
    fwd_flops = d.layers * (layer_matmul_flops(d, bm * t) + attention_flops(d, bm, t, t, assume.flash))
    bwd_flops = (3.0 if cfg.remat else 2.0) * fwd_flops  # dgrad + wgrad (+ the recomputed forward)
    # weights x3, residuals out and in
    tick_bytes = 3 * layer_w + 2 * d.layers * train_residual_bytes(d, bm, t, c, assume.flash)
    comp, mem = _roofline(fwd_flops + bwd_flops, tick_bytes, hw, assume)
    comm = 4 * d.layers * t_link.all_reduce(act, n_t)  # one psum per block, forward and backward
    comm += 2 * d.layers * f_link.all_gather(layer_w / d.layers * n_f, n_f)  # fsdp: gather for fwd and bwd
    if stages > 1:  # activations forward, their gradients back
        comm += 2 * (s_link.permute(act) - s_link.latency_s + assume.term(hw, "hop_latency_us") * 1e-6)
    comm += (3 if cfg.remat else 2) * d.layers * assume.term(hw, "layer_latency_us") * 1e-6  # fixed per-layer cost
    # the head and loss (per micro-batch), gradient reduction and the AdamW update (per step)
    h_comp, h_mem = _roofline(6.0 * b * t * d.embed * d.vocab, 3 * head_w + 3 * logits_bytes(d, b, t), hw, assume)
    sync = f_link.all_gather(w * n_f, n_f) + d_link.all_reduce(w, mesh["data"])  # reduce-scatter, all-reduce
    optimizer = (3 + 2 * assume.optimizer_moments) * w / (_bandwidth(hw, assume) * 1e9)
    # every micro-batch runs the stages and the head; gradients are reduced and applied once
    step = accum * (ticks * (max(comp, mem) + comm) + max(h_comp, h_mem)) + sync + optimizer \
        + assume.term(hw, "step_latency_us") * 1e-6
    times = {"compute_s": accum * (ticks * comp + h_comp), "memory_s": accum * (ticks * mem + h_mem) + optimizer,
             "comm_s": accum * ticks * comm + sync, "bubble_fraction": (stages - 1) / ticks}
    tps = wl.batch * t / step
    return Estimate(mesh, wl, memory, hw.device.usable_bytes, m, times, {"train_step": memory.total},
                    train_step_s=step, tokens_per_s_replica=tps, tokens_per_s_system=tps,
                    tokens_per_s_per_w=tps / hw.total_power_w)
