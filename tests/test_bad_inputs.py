"""The bad-input catalog: every case is refused with one line naming what and where (exit 2, or the
right HTTP status), and nothing saved before changes (each directory involved is hashed before
and after). CLI cases run in-process (`rsdjax.cli.main`), so the whole catalog takes seconds."""
import json
import shutil
import struct
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, tree_digest
from rsdjax.checkpoint.peft import save_adapter
from rsdjax.cli import main
from rsdjax.loading import load_model
from rsdjax.model.lora import LoraConfig, attach_lora
from rsdjax.tokenizer import Tokenizer
from serve_support import fake_server
from test_gguf import write_gguf

GEN = ["--max-new-tokens", "1"]


@pytest.fixture(scope="module")
def good(tiny_hf_dir, tiny_tokenizer_dir, tmp_path_factory):
    """The tiny HF model with the tiny tokenizer, a PEFT adapter for it, and a catalog root."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = root / "model"
    shutil.copytree(tiny_hf_dir, model)
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, model / f.name)
    save_adapter(attach_lora(load_model(model), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
                 root / "adapter")
    _write_ggufs(model, root / "gguf")
    return root


def _write_ggufs(model_dir: Path, out: Path) -> None:
    """The tiny model as llama.cpp's own writer stores it, plus three broken variants of it."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    out.mkdir()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    good = write_gguf(out / "model.gguf", ref)
    (out / "cut.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (out / "text.gguf").write_text("this is not a GGUF file\n")
    write_gguf(out / "qwen.gguf", ref, arch="qwen2")
    write_gguf(out / "iq.gguf", ref, extra_tensor=("blk.0.attn_q.weight", np.zeros((128, 128 // 32 * 18), np.uint8),
                                                   gguf.GGMLQuantizationType.IQ4_NL))


def copy_of(good, name: str) -> Path:
    out = good / "cases" / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(good / name, out)
    return out


def edit_header(path: Path, change) -> None:
    """Rewrite a safetensors header with `change(header)`, keeping the data bytes."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def first_tensor(header, suffix=""):
    return next(k for k in header if k != "__metadata__" and k.endswith(suffix))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def weights(d: Path) -> Path:
    return d / "model.safetensors"


def model_case(edit):
    """`rsdjax generate` on a damaged copy of the model."""
    def setup(good):
        d = copy_of(good, "model")
        edit(d)
        return ["generate", "--model", str(d), "--prompt-ids", "1,2", *GEN], [d]
    return setup


def generate_case(*args):
    def setup(good):
        return ["generate", "--model", str(good / "model"), *GEN, *args], [good / "model"]
    return setup


def gguf_case(good, name: str):
    """`rsdjax convert gguf-to-rsdjax` on a broken GGUF: refused, and no output directory is left."""
    out = good / "cases" / "converted"
    shutil.rmtree(out, ignore_errors=True)
    return ["convert", "gguf-to-rsdjax", str(good / "gguf" / name), str(out)], [good / "gguf"]


def lora_case(edit):
    def setup(good):
        a = copy_of(good, "adapter")
        edit(a)
        return ["generate", "--model", str(good / "model"), "--lora", str(a), "--prompt-ids", "1,2", *GEN], \
            [a, good / "model"]
    return setup


def corpus_case(write, vocab=300):
    def setup(good):
        corpus = good / "cases" / "corpus.txt"
        corpus.parent.mkdir(exist_ok=True)
        write(corpus)
        out = good / "cases" / "tok-out"
        shutil.rmtree(out, ignore_errors=True)
        return ["tokenizer", "train", str(corpus), "--vocab-size", str(vocab), "-o", str(out)], [corpus.parent]
    return setup


def train_case(**changes):
    def setup(good):
        cfg = {"name": "bad", "run_dir": str(good / "cases" / "run"), "model": {"preset": "tiny", "num_layers": 1},
               "tokenizer": {"path": str(good / "model")}, "steps": 2, "batch_size": 8,
               "data": {"seq_len": 16, "sources": [{"name": "en", "paths": [str(ROOT / "data/corpus/en")]}]},
               **changes}
        path = good / "cases" / "train.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(cfg))  # JSON is YAML
        return ["train", str(path)], [good / "model"]
    return setup


CLI_CASES = {
    # model directories
    "no such model directory": (lambda g: (["generate", "--model", str(g / "nowhere"), "--prompt-ids", "1"], []),
                                "nowhere: no such model directory"),
    "no config.json": (model_case(lambda d: (d / "config.json").unlink()), "no config.json (not an HF model directory)"),
    "config.json not JSON": (model_case(lambda d: (d / "config.json").write_text("{bad")), "config.json: invalid JSON"),
    "not a Llama": (model_case(lambda d: edit_json(d / "config.json", model_type="gpt2")),
                    "model_type is 'gpt2', rsdjax loads only 'llama'"),
    "heads vs kv heads": (model_case(lambda d: edit_json(d / "config.json", num_attention_heads=7)),
                          "num_heads=7 is not a multiple of num_kv_heads=4"),
    "config lies about the width": (model_case(lambda d: edit_json(d / "config.json", hidden_size=256)),
                                    "has shape [128], expected [256] for this config"),
    "no weights": (model_case(lambda d: weights(d).unlink()), "no *.safetensors files found"),
    # safetensors files
    "truncated safetensors": (model_case(lambda d: weights(d).write_bytes(weights(d).read_bytes()[:800_000])),
                              "is truncated or corrupt (needs bytes"),
    "header length lies": (model_case(lambda d: weights(d).write_bytes(struct.pack("<Q", 10**12)
                                                                         + weights(d).read_bytes()[8:])),
                           "header length 1000000000000 exceeds file size"),
    "data offsets lie": (model_case(lambda d: edit_header(weights(d), lambda h: h[first_tensor(h)]["data_offsets"]
                                                          .__setitem__(1, 10**9))), "is truncated or corrupt"),
    "header not JSON": (model_case(lambda d: weights(d).write_bytes(struct.pack("<Q", 8) + b"{garbage" + b"\0" * 64)),
                        "corrupt safetensors file (header is not JSON"),
    "unknown dtype": (model_case(lambda d: edit_header(weights(d), lambda h: h[first_tensor(h)].update(dtype="F8_E4M3"))),
                      "'dtype': 'F8_E4M3'"),
    "integer weights": (model_case(lambda d: edit_header(weights(d), lambda h: h[first_tensor(h, "embed_tokens.weight")]
                                                         .update(dtype="I32"))),
                        "tensor 'model.embed_tokens.weight' has dtype int32, but Llama weights are floating point"),
    "missing tensor": (model_case(lambda d: edit_header(weights(d), lambda h: h.__setitem__(
        "renamed.weight", h.pop(first_tensor(h, "layers.1.mlp.up_proj.weight"))))),
                       "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    # GGUF files
    "truncated GGUF": (lambda g: gguf_case(g, "cut.gguf"), "not a readable GGUF file"),
    "a text file named .gguf": (lambda g: gguf_case(g, "text.gguf"), "not a readable GGUF file"),
    "GGUF of another architecture": (lambda g: gguf_case(g, "qwen.gguf"), "architecture is 'qwen2', rsdjax loads only 'llama'"),
    "GGUF with a type rsdjax does not dequantize": (lambda g: gguf_case(g, "iq.gguf"),
                                                     "IQ4_NL, which rsdjax does not dequantize"),
    "generate on a truncated GGUF": (lambda g: (["generate", "--model", str(g / "gguf" / "cut.gguf"), "--prompt-ids", "1",
                                                 *GEN], [g / "gguf"]), "not a readable GGUF file"),
    # tokenizers
    "tokenizer.json not JSON": (lambda g: (["generate", "--model", str(_broken_tokenizer(g)), "--prompt", "hi", *GEN],
                                           [g / "cases" / "model"]), "tokenizer.json: cannot read tokenizer"),
    "text prompt without a tokenizer": (model_case(lambda d: (d / "tokenizer.json").unlink()), None),  # replaced below
    # prompts
    "token id past the vocabulary": (generate_case("--prompt-ids", "1,2,99999"), "token id 99999 outside the vocabulary [0, 512)"),
    "negative token id": (generate_case("--prompt-ids", "1,-5"), "token id -5 outside the vocabulary"),
    "ids that are not numbers": (generate_case("--prompt-ids", "1,a"), "'1,a' is not a comma-separated list of token ids"),
    "empty prompt ids": (generate_case("--prompt-ids", ""), "empty prompt"),
    "over-long prompt": (generate_case("--prompt-ids", ",".join(["5"] * 250), "--max-new-tokens", "20"),
                         "prompt has 250 tokens and max_tokens is 20: 270 exceeds the context of 256 tokens"),
    "presence penalty NaN": (generate_case("--prompt-ids", "1,2", "--presence-penalty", "nan"),
                             "presence_penalty must be in [-2, 2], got nan"),
    "negative temperature": (generate_case("--prompt-ids", "1,2", "--temperature", "-1"), "temperature must be a finite"),
    "top_p 0": (generate_case("--prompt-ids", "1,2", "--top-p", "0"), "top_p must be in (0, 1], got 0.0"),
    "max new tokens 0": (generate_case("--prompt-ids", "1,2", "--max-new-tokens", "0"), "max_tokens must be >= 1, got 0"),
    "stop id past the vocabulary": (generate_case("--prompt-ids", "1,2", "--stop-ids", "9999"),
                                    "stop_token_ids: 9999 is outside the vocabulary"),
    "too many logprobs": (generate_case("--prompt-ids", "1,2", "--logprobs", "50", "--json"), "logprobs must be in [0, 20]"),
    "zero slots": (generate_case("--prompt-ids", "1,2", "--max-slots", "0"), "--max-slots must be >= 1, got 0"),
    "context past the model's": (generate_case("--prompt-ids", "1,2", "--max-context", "100000"),
                                 "max_context must be in [2, 256]"),
    "chat without text": (generate_case("--chat", "--prompt-ids", "1"), "--chat formats --prompt text"),
    "mesh that does not divide": (generate_case("--prompt-ids", "1,2", "--mesh", "tensor=3"),
                                  "is not divisible by mesh axis tensor=3"),
    "mesh that is not a mesh": (generate_case("--prompt-ids", "1,2", "--mesh", "foo"), "--mesh: 'foo' is not axis=size"),
    # LoRA adapters
    "adapter without its config": (lora_case(lambda a: (a / "adapter_config.json").unlink()),
                                   "no adapter_config.json (not a PEFT adapter directory)"),
    "adapter config not JSON": (lora_case(lambda a: (a / "adapter_config.json").write_text("{")), "invalid JSON"),
    "adapter of another rank": (lora_case(lambda a: edit_json(a / "adapter_config.json", r=8)), "expected [8, 128]"),
    "adapter of another base": (lora_case(lambda a: edit_header(a / "adapter_model.safetensors", _narrower)),
                                "expected [4, 128]"),
    "adapter for layers the model lacks": (lora_case(lambda a: edit_header(a / "adapter_model.safetensors", _deeper)),
                                           "matches no adapted module"),
    # corpora
    "empty corpus": (corpus_case(lambda p: p.write_text(" \n\n")), "corpus.txt: no text in the corpus"),
    "binary corpus": (corpus_case(lambda p: p.write_bytes(bytes(range(256)) * 64)), "not UTF-8 text"),
    "vocabulary below the byte alphabet": (corpus_case(lambda p: p.write_text("a line\n"), vocab=100),
                                           "vocab_size=100 is below the byte alphabet plus special tokens"),
    "one-line corpus": (train_case(data={"seq_len": 16, "sources": [{"name": "one", "paths": ["ONELINE"]}]}),
                        "fewer than one window of seq_len + 1 = 17"),
    "training on a binary corpus": (train_case(data={"seq_len": 16, "sources": [{"name": "bin", "paths": ["BIN"]}]}),
                                    "not UTF-8 text"),
    # configs
    "unknown config key": (train_case(stepz=3), "stepz"),
    "config value of the wrong type": (train_case(steps="many"), "steps"),
    "no such train config": (lambda g: (["train", str(g / "nowhere.yaml")], []), "nowhere.yaml"),
    "no such model preset": (lambda g: (["shard-report", "--model", "llama9-1t"], []), "llama9-1t"),
    # conversions and merges that would overwrite
    "convert onto a non-empty directory": (lambda g: (["convert", "hf-to-rsdjax", str(g / "model"), str(g / "adapter")],
                                                      [g / "adapter", g / "model"]), "refusing to overwrite"),
    "merge onto a non-empty directory": (lambda g: (["lora", "merge", str(g / "model"), str(g / "adapter"), str(g / "model")],
                                                    [g / "adapter", g / "model"]), "refusing to overwrite"),
    "convert a truncated model": (lambda g: _convert_truncated(g), "is truncated or corrupt"),
}
del CLI_CASES["text prompt without a tokenizer"]
CLI_CASES["text prompt without a tokenizer"] = (
    lambda g: (lambda d: (["generate", "--model", str(d), "--prompt", "hi", *GEN], [d]))(
        _without(copy_of(g, "model"), "tokenizer.json")), "no tokenizer.json, so --prompt cannot be used")


def _without(d: Path, name: str) -> Path:
    (d / name).unlink()
    return d


def _broken_tokenizer(good) -> Path:
    d = copy_of(good, "model")
    (d / "tokenizer.json").write_text("{]")
    return d


def _narrower(header):  # the tensors of an adapter for a base of hidden size 64
    for k in [k for k in header if k != "__metadata__" and "lora_A" in k]:
        header[k]["shape"] = [4, 64]
        begin = header[k]["data_offsets"][0]
        header[k]["data_offsets"] = [begin, begin + 4 * 64 * 4]


def _deeper(header):  # a tensor for layer 5 of a 2-layer model
    k = first_tensor(header, "lora_A.weight")
    header[k.replace("layers.0.", "layers.5.").replace("layers.1.", "layers.5.")] = dict(header[k])


def _convert_truncated(good):
    d = copy_of(good, "model")
    weights(d).write_bytes(weights(d).read_bytes()[:800_000])
    out = good / "cases" / "converted"
    shutil.rmtree(out, ignore_errors=True)
    return ["convert", "hf-to-rsdjax", str(d), str(out)], [d]


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_in_one_line_and_changes_nothing(case, good, capsys):
    setup, expect = CLI_CASES[case]
    argv, watched = setup(good)
    if case == "training on a binary corpus":
        _source(good, argv, b"\x00\xff\xfe" * 4096)
    if case == "one-line corpus":
        _source(good, argv, "a single short line\n".encode())
    before = {d: tree_digest(d) for d in watched}
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "rsdjax" in line]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"rsdjax {argv[0]}: error: ") and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    for d, digest in before.items():
        assert tree_digest(d) == digest, f"{d} changed"
    assert not (good / "cases" / "converted").exists()  # a failed conversion leaves no half-written output


def _source(good, argv, content: bytes):
    """Point the train config's one data source at a file holding `content`."""
    path = Path(argv[1])
    cfg = json.loads(path.read_text())
    corpus = good / "cases" / "source" / "data.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_bytes(content)
    cfg["data"]["sources"][0]["paths"] = [str(corpus.parent)]
    path.write_text(json.dumps(cfg))


# ---------------------------------------------------------------- HTTP bodies

HTTP_CASES = {
    "prompt is an object": ({"model": "fake", "prompt": {"a": 1}}, 400, "prompt"),
    "prompt ids out of range": ({"model": "fake", "prompt": [1, 70000]}, 400, "token id 70000 is outside the vocabulary"),
    "nested garbage prompt": ({"model": "fake", "prompt": [[[[[[1]]]]]]}, 400, "prompt"),
    "deeply nested body": ("DEEP", 400, None),
    "max_tokens negative": ({"model": "fake", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    "n is a list": ({"model": "fake", "prompt": "hi", "n": [2]}, 400, "n"),
    "temperature NaN": ('{"model": "fake", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    "penalty Infinity": ('{"model": "fake", "prompt": "hi", "presence_penalty": Infinity}', 400, "presence_penalty"),
    "unknown model": ({"model": "gpt-9", "prompt": "hi"}, 404, "model 'gpt-9' does not exist"),
    "not JSON": ("{model: fake", 400, "request body is not valid JSON"),
    "not UTF-8": (b"\xff\xfe{\x00", 400, "not valid JSON"),
    "body is a list": ([{"model": "fake"}], 400, None),
    "huge body": ("HUGE", 413, "over the limit of"),
    "messages not a list": ({"model": "fake", "messages": "hi"}, 400, "messages", "chat"),
    "message without a role": ({"model": "fake", "messages": [{"content": "hi"}]}, 400, "messages.0.role", "chat"),
    "message content null": ({"model": "fake", "messages": [{"role": "user", "content": None}]}, 400,
                             "messages.0.content", "chat"),
    "top_logprobs too many": ({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                               "top_logprobs": 50}, 400, "top_logprobs", "chat"),
    "tools asked of a server without tool calls": ({"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                                    "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
                                                   "tools: not supported", "chat"),
    "over-long chat": ({"model": "fake", "messages": [{"role": "user", "content": "fox " * 400}]}, 400,
                       "exceeds the context of 256 tokens", "chat"),
    "detokenize ids out of range": ({"tokens": [1, 99999]}, 400, "token id 99999 is outside the vocabulary", "detokenize"),
    "negative seed": ({"model": "fake", "prompt": "hi", "seed": -1}, 400, "seed"),
}
PATHS = {"chat": "/v1/chat/completions", "detokenize": "/detokenize"}


@pytest.fixture(scope="module")
def server(tiny_tokenizer_dir):
    with fake_server(Tokenizer.load(tiny_tokenizer_dir), max_body_bytes=64 << 10) as s:
        yield s


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_http_refuses_with_the_right_status_and_a_message(case, server):
    body, status, expect, *where = HTTP_CASES[case]
    url = server[0] + PATHS.get(where[0] if where else "", "/v1/completions")
    if body == "DEEP":
        body = '{"model": "fake", "prompt": ' + "[" * 5000 + "1" + "]" * 5000 + "}"
    if body == "HUGE":
        body = json.dumps({"model": "fake", "prompt": "x" * (100 << 10)})
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert expect is None or expect in error["message"], error["message"]


def test_the_server_is_clean_after_the_http_catalog(server):
    url, engine, _ = server
    assert engine.free_slots() == list(range(engine.max_slots))
    assert httpx.get(f"{url}/health").json()["running"] == 0
