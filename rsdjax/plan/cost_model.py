"""Analytic cost model: memory per device and a roofline time per step for one mesh.

Everything is per device and in bytes / FLOPs / seconds. The formulas are written out in
docs/cost_model.md; the short version:

  memory   weights (each parameter's shard, from the same rule resolver the model uses)
           + KV cache 2 x L x B x S x KV x D x bytes, sharded like the real cache
           + training: gradients (= weights) and AdamW's two moments (optax default: param dtype)
           + activations: what JAX/XLA keep for the backward pass (counted from the compiled
             HLO of our layer) or, for inference, one layer's working set.
  time     per stage and microbatch: max(FLOPs / peak, bytes / bandwidth)   (roofline, overlapped)
           + collectives, not overlapped: ring all-reduce 2(n-1)/n x bytes / link + 2 log2(n) x latency
           pipeline: decode rounds take max(M, S) stage slots; training (M + S - 1) slots (GPipe).

It is a model of the program rsdjax compiles (full masked attention, logits over the whole
vocabulary, head replicated across stages), not of an ideal one, so that XLA's own figures from
`plan --aot` can check it.
"""
from __future__ import annotations

import dataclasses
import math
import os

from rsdjax.config import ModelConfig
from rsdjax.hardware import MESH_AXES, HardwareSpec
from rsdjax.parallel.rules import RULES, ShardingError, bytes_per_device, resolve

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
# the fitted constants: (device name, or None for every device; term)
FITTED = ((None, "step_latency_us"),
          ("ATOM (RBLN-CA12)", "memory_efficiency"),
          ("H100 SXM", "memory_efficiency"), ("H100 SXM", "compute_efficiency"), ("H100 SXM", "intra_latency_us"),
          ("TPU v6e (Trillium)", "compute_efficiency"))


@dataclasses.dataclass
class Assumptions:
    """Figures the hardware YAML does not carry. All overridable: `rsdjax plan ... cost.KEY=VALUE`.

    The efficiency terms (docs/cost_model.md) are the defaults below, replaced per device by `device_terms`
    ({device name: {term: value}}); the fitted ones (FITTED) come from configs/cost/calibrated.yaml, written
    by `rsdjax plan --calibration --fit --write` from the published points in configs/measurements."""

    dtype: str = "auto"  # auto: float32 on the cpu preset (XLA:CPU policy), bfloat16 (FP16-class) elsewhere
    kv_dtype: str = "auto"  # KV cache precision; auto: the same as dtype
    attention: str = "full"  # full: rsdjax's masked attention over every key, scores in memory;
    #                          flash: a fused causal kernel (skips the masked half, keeps no scores): other stacks
    kv_reads: str = "grouped"  # decode attention reads each cached KV head once (grouped: GQA-aware kernels, ours);
    #                            per_query_head: once per query head of its group (one thread block per query
    #                            head, e.g. TensorRT-LLM 0.5's masked MHA kernel, before its GQA "XQA" kernel)
    optimizer_moments: int = 2  # AdamW: mu and nu, stored in the parameter dtype (optax default)
    compute_efficiency: float = 0.5  # achieved fraction of peak FLOPs in matmul-bound work (prefill, training)
    memory_efficiency: float = 0.7  # achieved fraction of memory bandwidth while streaming weights and KV
    layer_latency_us: float = 0.0  # fixed cost per layer per step (kernel launches, syncs): fits drove it to 0
    step_latency_us: float = 100.0  # fixed cost per step (host scheduling, sampling, launch)
    link_efficiency: float = 0.8  # achieved fraction of a link's bandwidth (no public point constrains it)
    intra_latency_us: float = 2.0  # per collective step inside a node (PCIe / NVLink hop)
    inter_latency_us: float = 10.0  # per collective step between nodes / systems
    hop_latency_us: float = 10.0  # fixed cost of one pipeline hop (activations to the next stage)
    device_terms: dict = dataclasses.field(default_factory=dict)

    def term(self, hardware: HardwareSpec, name: str) -> float:
        """An efficiency term for this hardware's device: its calibrated value, else the default."""
        return float(self.device_terms.get(hardware.device.name, {}).get(name, getattr(self, name)))

    def _choice(self, name: str, options: tuple[str, str]) -> str:
        value = getattr(self, name)
        if value not in options:
            raise ValueError(f"cost.{name} must be '{options[0]}' or '{options[1]}', got '{value}'")
        return value

    @property
    def flash(self) -> bool:
        return self._choice("attention", ("full", "flash")) == "flash"

    def decode_kv_heads(self, d: "Local") -> int:
        """KV heads a decode step reads from the cache per device: the cached ones, or one per query head."""
        return d.heads if self._choice("kv_reads", ("grouped", "per_query_head")) == "per_query_head" else d.kv_heads

    def validate(self, hardware: HardwareSpec) -> "Assumptions":
        """Refuse a bad choice once, before any split is estimated (there it would reject every split)."""
        self.dtype_bytes(hardware)
        self.kv_dtype_bytes(hardware)
        self._choice("attention", ("full", "flash"))
        self._choice("kv_reads", ("grouped", "per_query_head"))
        return self

    @classmethod
    def calibrated(cls, path=None) -> "Assumptions":
        """The defaults with the last fit applied (configs/cost/calibrated.yaml)."""
        from rsdjax.config import CONFIG_ROOT, load_yaml

        path = path or CONFIG_ROOT / "cost" / "calibrated.yaml"
        data = load_yaml(path) if os.path.exists(path) else {}
        known = {f.name for f in dataclasses.fields(cls)} - {"dtype", "kv_dtype", "attention", "kv_reads",
                                                              "optimizer_moments", "device_terms"}
        terms = [data.get("global", {})] + list((data.get("devices") or {}).values())
        bad = next((k for t in terms for k in t if k not in known), None)
        if bad:
            raise ValueError(f"{path}: unknown cost term '{bad}' (known: {', '.join(sorted(known))})")
        return cls(**data.get("global", {}), device_terms={k: dict(v) for k, v in (data.get("devices") or {}).items()})

    def dtype_bytes(self, hardware: HardwareSpec) -> int:
        name = self.dtype if self.dtype != "auto" else ("float32" if hardware.name == "cpu" else "bfloat16")
        if name not in DTYPE_BYTES:
            raise ValueError(f"cost.dtype: unknown dtype '{name}' (known: auto, {', '.join(DTYPE_BYTES)})")
        return DTYPE_BYTES[name]

    def kv_dtype_bytes(self, hardware: HardwareSpec) -> int:
        if self.kv_dtype == "auto":
            return self.dtype_bytes(hardware)
        if self.kv_dtype not in DTYPE_BYTES:
            raise ValueError(f"cost.kv_dtype: unknown dtype '{self.kv_dtype}' (known: auto, {', '.join(DTYPE_BYTES)})")
        return DTYPE_BYTES[self.kv_dtype]


@dataclasses.dataclass
class Workload:
    mode: str  # "infer" or "train"
    batch: int  # infer: sequences per replica (decode slots); train: global batch
    seq: int  # infer: KV cache length (prompt + output); train: tokens per sequence
    prompt: int = 0  # infer: prompt length for TTFT; 0 -> seq // 2
    prefill_chunk: int = 512  # infer: prompts are prefilled this many tokens at a time (0: all at once)
    grad_accum: int = 1  # train: the global batch runs as this many micro-batches per update
    # remat and pipeline microbatches come from the model config (model.remat, model.pipeline_microbatches)

    @property
    def prompt_len(self) -> int:
        return self.prompt or max(1, self.seq // 2)

    @property
    def chunk_len(self) -> int:
        return min(self.prompt_len, self.prefill_chunk or self.prompt_len)


_PARAM_TABLES: dict[str, tuple] = {}


def param_table(cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...]:
    """(name, shape, logical axes) of every parameter, from the abstract model (shapes only, no memory)."""
    key = repr(cfg)
    if key not in _PARAM_TABLES:
        import jax
        from flax import nnx

        from rsdjax.loading import abstract_model

        _, state = nnx.split(abstract_model(cfg))
        leaves = jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        _PARAM_TABLES[key] = tuple((".".join(str(getattr(k, "key", k)) for k in path), tuple(v.shape),
                                    tuple(v.get_metadata().get("logical_axes"))) for path, v in leaves)
    return _PARAM_TABLES[key]


def weight_bytes(cfg: ModelConfig, mesh: dict[str, int], mode: str, param_bytes: int) -> int:
    """Bytes of parameters on one device, sharded by the same resolver and rules as the real model.
    Raises ShardingError (naming parameter, dimension and mesh axis) when the mesh does not divide."""
    rules = RULES[mode]
    return sum(bytes_per_device(shape, param_bytes, resolve(logical, shape, mesh, rules, name=name), mesh)
               for name, shape, logical in param_table(cfg))


@dataclasses.dataclass
class Local:
    """The model's dimensions as one device sees them under a mesh."""

    layers: int  # per stage
    heads: int
    kv_heads: int  # KV heads computed and cached per device (all of them if tensor does not divide)
    mlp: int
    vocab: int
    embed: int
    head_dim: int
    tensor: int
    kv_sharded: bool


def check_divisible(cfg: ModelConfig, mesh: dict[str, int]) -> None:
    """The splits a mesh needs, in words (the resolver would also refuse, naming the parameter)."""
    n, stages, fsdp = mesh["tensor"], mesh["stage"], mesh["fsdp"]
    for size, parts, words in ((cfg.num_layers, stages, "{} layers do not split evenly over stage={}"),
                               (cfg.num_heads, n, "{} query heads do not split evenly over tensor={}"),
                               (cfg.intermediate_size, n, "MLP width {} does not split evenly over tensor={}"),
                               (cfg.vocab_size, n, "vocabulary of {} does not split evenly over tensor={}"),
                               (cfg.hidden_size, fsdp, "hidden size {} does not split evenly over fsdp={}")):
        if size % parts:
            raise ShardingError(words.format(size, parts))


def local_dims(cfg: ModelConfig, mesh: dict[str, int]) -> Local:
    check_divisible(cfg, mesh)
    n = mesh["tensor"]
    kv_sharded = cfg.num_kv_heads % n == 0
    return Local(layers=cfg.num_layers // mesh["stage"], heads=cfg.num_heads // n,
                 kv_heads=cfg.num_kv_heads // n if kv_sharded else cfg.num_kv_heads,
                 mlp=cfg.intermediate_size // n, vocab=cfg.vocab_size // n, embed=cfg.hidden_size,
                 head_dim=cfg.resolved_head_dim, tensor=n, kv_sharded=kv_sharded)


def layer_matmul_flops(d: Local, tokens: int) -> float:
    """2 x MACs of the seven projections of one layer on one device (K/V for every locally computed head)."""
    e, hd = d.embed, d.head_dim
    return 2.0 * tokens * (e * d.heads * hd * 2 + e * d.kv_heads * hd * 2 + 3 * e * d.mlp)


def attention_flops(d: Local, batch: int, q_len: int, kv_len: int, flash: bool = False) -> float:
    """QK^T and PV over the full (masked) key range, as our attention computes them; a flash kernel skips the
    masked half of a causal block (q_len == kv_len)."""
    full = 4.0 * batch * q_len * kv_len * d.heads * d.head_dim
    return full / 2 if flash and q_len == kv_len else full


# ------------------------------------------------------------------ activations (bytes per device)


def layer_weight_bytes(d: Local, c: int) -> float:
    """One layer's seven matrices on this device: the layer scan slices them out of the stacked weights
    and XLA materializes that slice, so a forward pass holds one extra layer of weights."""
    return c * d.embed * ((2 * d.heads + 2 * d.kv_heads) * d.head_dim + 3 * d.mlp)


def forward_working_bytes(d: Local, b: int, t: int, s: int, c: int, flash: bool = False) -> float:
    """Live inside one layer of a forward-only pass over b x t new tokens attending to s keys: the layer's
    weights, then the larger of the attention phase (float32 scores and probabilities [b,h,t,s], two
    residual-stream tensors, q/k/v/attention-out, this layer's cached K/V) and the MLP phase
    (two residual-stream tensors, gate, up, product)."""
    scores = 0 if flash else 2 * 4 * b * d.heads * t * s
    attn = scores + c * b * t * (2 * d.embed + (2 * d.heads + 2 * d.kv_heads) * d.head_dim) \
        + 2 * c * b * s * d.kv_heads * d.head_dim
    mlp = c * b * t * (2 * d.embed + 3 * d.mlp)
    return layer_weight_bytes(d, c) + max(attn, mlp)


def head_working_bytes(d: Local, b: int, t: int, c: int) -> float:
    """After the layers: the final hidden states and float32 logits over this device's vocabulary shard
    (our model computes logits at every position)."""
    return c * b * t * d.embed + logits_bytes(d, b, t)


def train_residual_bytes(d: Local, b: int, t: int, c: int, flash: bool = False) -> float:
    """What autodiff keeps per layer for the backward pass (read off the forward while-loop's outputs in
    the compiled HLO): 6 residual-stream tensors [b,t,E], q/k/v/attention-out, scores and probabilities
    [b,h,t,t] in float32, and 6 MLP-width tensors [b,t,M]."""
    per_token = 6 * d.embed + (2 * d.heads + 2 * d.kv_heads) * d.head_dim + 6 * d.mlp
    return c * b * t * per_token + (0 if flash else 4 * 2 * b * d.heads * t * t)


def logits_bytes(d: Local, b: int, t: int) -> float:
    return 4.0 * b * t * d.vocab  # float32 logits over this device's vocabulary shard


# ------------------------------------------------------------------ communication


def _axis_crosses_nodes(mesh: dict[str, int], axis: str, hardware: HardwareSpec) -> bool:
    """Devices are laid out row-major over (data, stage, fsdp, tensor): an axis group spans
    stride x size consecutive devices, which leaves a node when that exceeds the node."""
    stride = math.prod(mesh[a] for a in MESH_AXES[MESH_AXES.index(axis) + 1:])
    return mesh[axis] > 1 and stride * mesh[axis] > hardware.devices_per_node


@dataclasses.dataclass
class Link:
    gbs: float
    latency_s: float

    def all_reduce(self, nbytes: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) / n * nbytes / (self.gbs * 1e9) + 2 * math.ceil(math.log2(n)) * self.latency_s

    def all_gather(self, full_bytes: float, n: int) -> float:  # also reduce-scatter of full_bytes
        if n <= 1:
            return 0.0
        return (n - 1) / n * full_bytes / (self.gbs * 1e9) + math.ceil(math.log2(n)) * self.latency_s

    def permute(self, nbytes: float) -> float:
        return nbytes / (self.gbs * 1e9) + self.latency_s


def link_for(mesh: dict[str, int], axis: str, hardware: HardwareSpec, assume: Assumptions) -> Link:
    if _axis_crosses_nodes(mesh, axis, hardware):
        gbs = hardware.inter_node_gbs.value if hardware.inter_node_gbs else hardware.device.link_gbs.value
        return Link(gbs * assume.term(hardware, "link_efficiency"), assume.term(hardware, "inter_latency_us") * 1e-6)
    return Link(hardware.device.link_gbs.value * assume.term(hardware, "link_efficiency"),
                assume.term(hardware, "intra_latency_us") * 1e-6)
