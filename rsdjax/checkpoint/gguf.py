"""llama.cpp GGUF files in: metadata -> ModelConfig, tensors -> HF-layout arrays (container: gguf_format.py).

Each GGUF tensor becomes a `GGUFTensorRef` that looks like a safetensors `TensorRef` under its HF
name (`model.layers.3.self_attn.q_proj.weight` ...), so `hf.load_hf_state` cuts device shards from it
exactly as it does from safetensors. That host path dequantizes with `gguf.quants.dequantize`
(llama.cpp's own reference, ported to numpy); a small byte-bounded cache keeps a tensor's float32
copy while the shards of one parameter are cut, instead of dequantizing it once per device. Files
whose types all have a device dequantizer (F32/F16/BF16, Q8_0, Q4_0, Q4_1) load through
gguf_device.py instead, 3-4x faster.

llama.cpp's converter interleaves the rows of q_proj / k_proj per head (for its rotate-half RoPE
kernel); `unpermute` undoes that, as transformers does when it reads a GGUF.
"""
from __future__ import annotations

import functools
import struct
import threading
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np

from rsdjax.checkpoint.errors import CheckpointError
from rsdjax.checkpoint.gguf_format import read_gguf
from rsdjax.config import ModelConfig

# The types Llama GGUFs use; everything else is refused by name (IQ*, TQ*, MXFP4 ...).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CACHE_BYTES = 1 << 30


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


class GGUFFile:
    """One opened GGUF: its metadata fields as Python values and its tensors by HF name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        stat = self.path.stat()
        try:
            self.tensors, self.meta = _parse(self.path.resolve(), stat.st_size, stat.st_mtime_ns)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:  # bad bytes
            raise CheckpointError(f"{self.path}: not a readable GGUF file "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
        self.arch = self.meta.get("general.architecture")
        if self.arch != "llama":
            raise CheckpointError(f"{self.path}: GGUF architecture is '{self.arch}', rsdjax loads only 'llama'")
        self._cache = _ByteLRU(CACHE_BYTES)

    def get(self, key: str, default=None):
        return self.meta.get(key, default)

    def need(self, key: str):
        if key not in self.meta:
            raise CheckpointError(f"{self.path}: GGUF metadata has no '{key}'")
        return self.meta[key]

    # ------------------------------------------------------------ config

    def config(self) -> ModelConfig:
        a = "llama."
        heads = int(self.need(a + "attention.head_count"))
        kv = self.get(a + "attention.head_count_kv", heads)
        hidden = int(self.need(a + "embedding_length"))
        head_dim = self.get(a + "attention.key_length") or self.get(a + "rope.dimension_count")
        tensors = {t.name for t in self.tensors}
        vocab = self.get(a + "vocab_size") or len(self.need("tokenizer.ggml.tokens"))
        if self.get(a + "rope.scaling.type") not in (None, "none"):
            raise CheckpointError(f"{self.path}: rope scaling '{self.get(a + 'rope.scaling.type')}' is not supported")
        bos, eos = self.get("tokenizer.ggml.bos_token_id"), self.get("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            name=self.path.stem, vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(self.need(a + "feed_forward_length")),
            num_layers=int(self.need(a + "block_count")), num_heads=heads,
            num_kv_heads=int(kv if not isinstance(kv, list) else kv[0]),
            head_dim=None if head_dim in (None, hidden // heads) else int(head_dim),
            max_position_embeddings=int(self.get(a + "context_length", 2048)),
            rope_theta=float(self.get(a + "rope.freq_base", 10000.0)),
            rms_norm_eps=float(self.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
        ).validate()

    # ------------------------------------------------------------ tensors

    def tensor_refs(self, cfg: ModelConfig) -> dict[str, "GGUFTensorRef"]:
        import gguf

        refs = {}
        for t in self.tensors:
            name = hf_name(t.name)
            if name is None:
                continue  # e.g. rope_freqs.weight: llama.cpp's precomputed Llama-3.1 factors
            kind = gguf.GGMLQuantizationType(t.tensor_type).name
            if kind not in SUPPORTED_TYPES:
                raise CheckpointError(f"{self.path}: tensor '{t.name}' has quantization type {kind}, which rsdjax "
                                      f"does not dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
            shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims innermost first
            heads = cfg.num_heads if name.endswith("q_proj.weight") else \
                cfg.num_kv_heads if name.endswith("k_proj.weight") else None
            refs[name] = GGUFTensorRef(self, t, name, shape, heads)
        return refs

    def load(self, ref: "GGUFTensorRef") -> np.ndarray:
        return self._cache.get(ref.name, lambda: _dequantize(self.path, ref))


class GGUFTensorRef:
    """A GGUF tensor under its HF name and HF shape; `load()` gives float32 in HF layout."""

    def __init__(self, owner: GGUFFile, tensor, name: str, shape: tuple[int, ...], unpermute_heads: int | None):
        self.owner, self.tensor, self.name, self.shape = owner, tensor, name, shape
        self.heads = unpermute_heads
        self.file = owner.path
        self.dtype = np.dtype(np.float32)

    def load(self) -> np.ndarray:
        return self.owner.load(self)


@functools.lru_cache(maxsize=4)
def _parse(path: Path, size: int, mtime_ns: int):
    """(tensors, metadata) of one GGUF version: loading a model reads the file for its config, weights
    and tokenizer, and one parse serves them all. Keyed by size and mtime: a rewritten file is read again."""
    meta, tensors = read_gguf(path)
    return tensors, types.MappingProxyType(meta)  # shared by every GGUFFile of this version: read-only


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def _dequantize(path: Path, ref: GGUFTensorRef) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        out = np.asarray(dequantize(np.asarray(ref.tensor.data), ref.tensor.tensor_type), np.float32)
        out = out.reshape(ref.shape)
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: tensor '{ref.tensor.name}' cannot be read ({e})") from None
    if ref.heads is not None:
        out = unpermute(out, ref.heads)
    return out


def unpermute(w, heads: int):
    """Undo llama.cpp's `permute`: per head it stored rows as (pairs, 2) where HF has (2, pairs).
    w: [..., rows, cols], numpy or jax (a stack of layers on the device)."""
    *lead, rows, cols = w.shape
    return w.reshape(*lead, heads, rows // heads // 2, 2, cols).swapaxes(-3, -2).reshape(w.shape)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute` (HF -> GGUF row order), for writing GGUFs in tests and tools."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _ByteLRU:
    """Least-recently-used values, evicted once their bytes exceed `limit` (the newest always stays)."""

    def __init__(self, limit: int):
        self.limit, self.items, self.lock = limit, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > 1 and sum(v.nbytes for v in self.items.values()) > self.limit:
                self.items.popitem(last=False)
        return value
