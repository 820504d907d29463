"""LoRA as one tree transform on the NNX `Llama`: `attach_lora(model, config)`.

The transform adds a `model.lora` submodule that holds, for every targeted projection `w` (one of
`wq wk wv wo w_gate w_up w_down`), stacked per-layer factors

    A: LoRAParam [layers, in..., r]     logical axes ("layers", <kernel's input axes>,  "lora_rank")
    B: LoRAParam [layers, r, out...]    logical axes ("layers", "lora_rank", <kernel's output axes>)
    scale: LoRAScale [layers]           alpha / r (alpha / sqrt(r) with rsLoRA); 0 where not targeted

so that `y = x W + scale * dropout(x) A B` (PEFT's formula). A and B keep the kernel's own logical
axes, so they are sharded exactly like the kernel they adapt (the rank axis is replicated).
`Llama.layer_params()` hands these arrays to `jax.lax.scan` together with the kernels (arrays only,
every leaf leading with `layers`), and `llama.linear` adds the low-rank term via `lora_delta`.

Layers a target does not cover (`layers_to_transform`, or a regex that matches only some layers)
keep A = B = 0 and scale = 0: the stack stays rectangular and those rows never change in training
(their gradient is exactly zero). Which layers are real is the static `LoRA.layers` table, used
when saving in PEFT format (`rsdjax.checkpoint.peft`).

Trainable = `LoRAParam` (a subclass of `nnx.Param`); base weights are plain `nnx.Param`, so
`nnx.split(model, LoRAParam, ...)` separates what an optimizer sees from the frozen base.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.model.axes import PARAM_AXES
from rsdjax.parallel.sharding import from_host

if TYPE_CHECKING:  # the model imports this module (its `linear` calls `lora_delta`)
    from rsdjax.model.llama import Llama

# our stacked kernel -> the module path inside one HF/PEFT decoder layer
TARGET_MODULES = {
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}
SHORT_NAMES = {k: v.split(".")[-1] for k, v in TARGET_MODULES.items()}  # wq -> q_proj
IN_DIMS = {"wo": 2}  # input dims of each per-layer kernel (wo is [heads, head_dim, embed]); others 1
RANK_AXIS = "lora_rank"  # no rule maps it: the rank dimension is replicated


class LoraError(ValueError):
    """A LoRA config or adapter that cannot be used; the message says which module and why."""


class LoRAParam(nnx.Param):
    """A LoRA factor (A or B): the only trainable variables of a fine-tuned model."""


class LoRAScale(nnx.Variable):
    """Per-layer scaling of a LoRA term (0 for layers it does not adapt); never trained."""


@dataclasses.dataclass
class LoraConfig:
    """Hyper-parameters, named and defined as in `peft.LoraConfig`."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # names (`q_proj`, `self_attn.q_proj`, full `model.layers.3.mlp.up_proj`), one regex string
    # (full-matched against `model.layers.{i}.<path>`, as PEFT does), or "all-linear"
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    layers_to_transform: list[int] | int | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def validate(self) -> "LoraConfig":
        if self.r <= 0:
            raise LoraError(f"lora.r must be positive, got {self.r}")
        if self.alpha <= 0:
            raise LoraError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        regex = isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear"
        if regex and self.layers_to_transform is not None:
            raise LoraError("lora.layers_to_transform cannot be combined with a regex target_modules (as in PEFT)")
        if not self.target_modules:
            raise LoraError("lora.target_modules is empty")
        return self


def module_name(kernel: str, layer: int) -> str:
    """The HF module name PEFT matches `target_modules` against."""
    return f"model.layers.{layer}.{TARGET_MODULES[kernel]}"


def resolve_targets(config: LoraConfig, num_layers: int) -> dict[str, tuple[int, ...]]:
    """{kernel: layers it adapts}, by PEFT's matching rules; a target that matches nothing is an error."""
    config.validate()
    tm = config.target_modules
    found: dict[str, set[int]] = {k: set() for k in TARGET_MODULES}
    if isinstance(tm, str) and tm.lower() != "all-linear":
        try:
            pattern = re.compile(tm)
        except re.error as e:
            raise LoraError(f"lora.target_modules: invalid regex {tm!r} ({e})") from None
        for k in TARGET_MODULES:
            found[k] = {i for i in range(num_layers) if pattern.fullmatch(module_name(k, i))}
        if not any(found.values()):
            raise LoraError(f"lora.target_modules regex {tm!r} matches no linear projection "
                            f"(module names look like {module_name('wq', 0)!r})")
    else:
        names = list(SHORT_NAMES.values()) if isinstance(tm, str) else list(tm)
        for name in names:
            hits = [(k, i) for k in TARGET_MODULES for i in range(num_layers)
                    if module_name(k, i) == name or module_name(k, i).endswith("." + name)]
            if not hits:
                hint = " (rsdjax adapts only the linear projections inside decoder layers)" \
                    if name in ("lm_head", "embed_tokens") else ""
                raise LoraError(f"lora.target_modules entry {name!r} matches no module; known: "
                                f"{', '.join(SHORT_NAMES.values())}{hint}")
            for k, i in hits:
                found[k].add(i)
        layers = config.layers_to_transform
        if layers is not None and layers != []:  # PEFT treats an empty list as "all layers"
            layers = {layers} if isinstance(layers, int) else set(layers)
            bad = sorted(i for i in layers if not 0 <= i < num_layers)
            if bad:
                raise LoraError(f"lora.layers_to_transform has layer {bad[0]}, the model has {num_layers} layers")
            found = {k: v & layers for k, v in found.items()}
    return {k: tuple(sorted(v)) for k, v in found.items() if v}


def _in_out(kernel: str, per_layer_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n_in = IN_DIMS.get(kernel, 1)
    return tuple(per_layer_shape[:n_in]), tuple(per_layer_shape[n_in:])


def lora_axes(kernel: str) -> tuple[tuple, tuple]:
    """Logical axes of (A, B): the kernel's own input / output axes around the replicated rank."""
    axes = PARAM_AXES[kernel]
    n_in = IN_DIMS.get(kernel, 1)
    return (axes[0], *axes[1:1 + n_in], RANK_AXIS), (axes[0], RANK_AXIS, *axes[1 + n_in:])


def _like_kernel(kernel_array, kernel: str, which: str):
    """The sharding of A, B or scale: the kernel's own mesh axes on the dims they share."""
    sharding = getattr(kernel_array, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return sharding  # one device (or abstract): put it where the kernel is
    spec = tuple(sharding.spec) + (None,) * (kernel_array.ndim - len(sharding.spec))
    n_in = IN_DIMS.get(kernel, 1)
    parts = {"a": (spec[0], *spec[1:1 + n_in], None), "b": (spec[0], None, *spec[1 + n_in:]), "scale": (spec[0],)}
    return NamedSharding(sharding.mesh, PartitionSpec(*parts[which]))


class LoRA(nnx.Module):
    """The adapter state attached as `model.lora` (see the module docstring)."""

    def __init__(self, config: LoraConfig, layers: dict[str, tuple[int, ...]], a: dict, b: dict,
                 scale: dict, seed: int = 0):
        self.config = config
        self.layers = {k: tuple(v) for k, v in layers.items()}  # static: kernel -> adapted layers
        self.a = nnx.Dict({k: LoRAParam(v, logical_axes=lora_axes(k)[0]) for k, v in a.items()})
        self.b = nnx.Dict({k: LoRAParam(v, logical_axes=lora_axes(k)[1]) for k, v in b.items()})
        self.scale = nnx.Dict({k: LoRAScale(v, logical_axes=("layers",)) for k, v in scale.items()})
        self.rngs = nnx.Rngs(dropout=seed)
        self.deterministic = True  # `model.train()` turns dropout on, `model.eval()` off
        self.merged = False  # True while the deltas are folded into the base kernels

    def layer_arrays(self) -> dict:
        """What travels through `jax.lax.scan` with the kernels; every leaf leads with `layers`."""
        if self.merged:
            return {}
        out = {k: {"a": self.a[k][...], "b": self.b[k][...], "scale": self.scale[k][...]} for k in self.layers}
        if not self.deterministic and self.config.dropout > 0:
            num_layers = next(iter(out.values()))["scale"].shape[0]
            out["dropout"] = {"key": jax.random.split(self.rngs.dropout(), num_layers),
                              "rate": jnp.full((num_layers,), self.config.dropout, jnp.float32)}
        return out


def lora_delta(x, lora: dict, name: str, equation: str):
    """scale * dropout(x) A B for one layer's projection `name`, with `equation` the kernel's einsum.

    "bte,ehd->bthd" gives A: "bte,er->btr" and B: "btr,rhd->bthd"; the rank letter is any unused one.
    """
    lhs, out = equation.split("->")
    xs, ks = lhs.split(",")
    k_in = "".join(c for c in ks if c in xs)
    k_out = "".join(c for c in ks if c not in xs)
    rest = "".join(c for c in xs if c not in ks)
    r = next(c for c in "rzyxwvuq" if c not in equation)
    t = lora[name]
    if "dropout" in lora:  # PEFT draws an independent mask per adapted module
        rate = lora["dropout"]["rate"]
        key = jax.random.fold_in(lora["dropout"]["key"], list(TARGET_MODULES).index(name))
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))
    h = jnp.einsum(f"{xs},{k_in}{r}->{rest}{r}", x, t["a"])
    return jnp.einsum(f"{rest}{r},{r}{k_out}->{out}", h, t["b"]) * t["scale"].astype(x.dtype)


# ---------------------------------------------------------------- the transform


def kaiming_uniform_a(key, in_shape: tuple[int, ...], r: int, dtype=jnp.float32):
    """PEFT's A init: torch kaiming_uniform_(a=sqrt(5)) on a [r, fan_in] weight = U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    return jax.random.uniform(key, (*in_shape, r), dtype, -bound, bound)


def attach_lora(model: Llama, config: LoraConfig, *, seed: int = 0, weights: dict | None = None) -> Llama:
    """Add LoRA factors next to the targeted kernels of `model` (in place) and return it.

    A starts as PEFT's kaiming-uniform, B as zeros, so the model's output is unchanged. `weights`
    ({kernel: (A, B)} stacked arrays, e.g. from a PEFT adapter) replaces the initialisation.
    Every array is placed like its base kernel.
    """
    if getattr(model, "lora", None) is not None:
        raise LoraError("model already has a LoRA adapter attached (detach_lora or merge_and_unload first)")
    cfg = model.cfg
    layers = resolve_targets(config, cfg.num_layers)
    key = jax.random.key(seed)
    a, b, scale = {}, {}, {}
    for kernel, adapted in layers.items():
        w = getattr(model, kernel)[...]
        in_shape, out_shape = _in_out(kernel, w.shape[1:])
        if config.r > min(math.prod(in_shape), math.prod(out_shape)):
            raise LoraError(f"lora.r={config.r} is larger than the layer {SHORT_NAMES[kernel]} "
                            f"(in {math.prod(in_shape)} -> out {math.prod(out_shape)} features)")
        mask = np.zeros(cfg.num_layers, np.float32)
        mask[list(adapted)] = 1.0
        if weights is not None:
            a_val, b_val = (jnp.asarray(t, jnp.float32) for t in weights[kernel])
        else:
            key, sub = jax.random.split(key)
            a_val = jax.vmap(lambda k: kaiming_uniform_a(k, in_shape, config.r))(jax.random.split(sub, cfg.num_layers))
            b_val = jnp.zeros((cfg.num_layers, config.r, *out_shape), jnp.float32)
        m = jnp.asarray(mask).reshape(-1, *([1] * (a_val.ndim - 1)))
        # the same values on every process (the same seed): each copies only its own shards
        a[kernel] = from_host(a_val * m, _like_kernel(w, kernel, "a"))
        b[kernel] = from_host(b_val * m.reshape(-1, *([1] * (b_val.ndim - 1))), _like_kernel(w, kernel, "b"))
        scale[kernel] = from_host(mask * config.scaling, _like_kernel(w, kernel, "scale"))
    model.lora = LoRA(config, layers, a, b, scale, seed=seed)
    return model


def detach_lora(model: Llama) -> Llama:
    """Remove the adapter (without merging); the base model is what it was."""
    if getattr(model, "lora", None) is not None:
        del model.lora
    return model


def lora_deltas(model: Llama) -> dict[str, jax.Array]:
    """{kernel: scale * A @ B} in the kernel's [layers, in..., out...] layout, with its sharding."""
    lora = _attached(model)
    out = {}
    for kernel in lora.layers:
        w = getattr(model, kernel)[...]
        n_in = IN_DIMS.get(kernel, 1)
        ins, outs = "abc"[:n_in], "xyz"[:w.ndim - 1 - n_in]
        eq = f"l{ins}r,lr{outs}->l{ins}{outs}"
        delta = jax.jit(lambda a, b, s: jnp.einsum(eq, a, b) * s.reshape(-1, *([1] * (w.ndim - 1))),
                        out_shardings=getattr(w, "sharding", None))
        out[kernel] = delta(lora.a[kernel][...], lora.b[kernel][...], lora.scale[kernel][...])
    return out


def merge(model: Llama) -> Llama:
    """Fold the adapter into the base kernels (W += scale A B); the LoRA term is then skipped."""
    lora = _attached(model)
    if not lora.merged:
        for kernel, delta in lora_deltas(model).items():
            var = getattr(model, kernel)
            var[...] = (var[...].astype(jnp.float32) + delta).astype(var.dtype)
        lora.merged = True
    return model


def unmerge(model: Llama) -> Llama:
    """Undo `merge` (W -= scale A B; exact up to float rounding of the base dtype)."""
    lora = _attached(model)
    if lora.merged:
        for kernel, delta in lora_deltas(model).items():
            var = getattr(model, kernel)
            var[...] = (var[...].astype(jnp.float32) - delta).astype(var.dtype)
        lora.merged = False
    return model


def merge_and_unload(model: Llama) -> Llama:
    """Merge and drop the adapter: a plain `Llama` (e.g. for `save_hf`)."""
    return detach_lora(merge(model))


def _attached(model: Llama) -> LoRA:
    lora = getattr(model, "lora", None)
    if lora is None:
        raise LoraError("model has no LoRA adapter attached")
    return lora
