"""lm-evaluation-harness scores a loglikelihood task through `rsdjax serve` exactly as through transformers.

The task (multiple choice, a local jsonl) is defined here, nothing is downloaded. The same task is
run twice by lm-eval: `local-completions` against our server on the real SmolLM2-135M (it sends
context + continuation with `echo`, `logprobs: 1`, `max_tokens: 1` and reads the prompt logprobs),
and lm-eval's own `hf` model on transformers over the same weights: the reference.
"""
import json
import os

import pytest

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("The capital of France is", ["Paris", "London", "Berlin"], 0),
    ("Water freezes at a temperature of zero degrees", ["Celsius", "Kelvin", "bananas"], 0),
    ("The opposite of hot is", ["cold", "warm", "purple"], 0),
    ("A week has seven", ["days", "hours", "cats"], 0),
    ("The sun rises in the", ["east", "west", "north"], 0),
    ("Two plus two equals", ["four", "five", "seven"], 0),
]
TASK = "rsdjax_serve_mc"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval_task")
    data = path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (path / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
""")
    return path


def run_lm_eval(model: str, model_args: dict, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    # only the task defined here: indexing lm-eval's ~26K built-in task files takes 15-30 s a run
    tasks_here = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                      task_manager=tasks_here)
    # per question, per choice: (loglikelihood of the choice, whether it is the greedy continuation)
    samples = {s["doc_id"]: [tuple(r[0]) for r in s["resps"]] for s in results["samples"][TASK]}
    return results["results"][TASK]["acc,none"], samples


def test_local_completions_against_rsdjax_serve_equals_transformers(smollm2_hf_dir, task_dir, monkeypatch):
    from rsdjax.infer.engine import load_engine
    from rsdjax.serve.app import create_app
    from rsdjax.serve.launch import ServerThread

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    engine, tokenizer = load_engine(smollm2_hf_dir, max_slots=4, max_context=256)
    with ServerThread(create_app(engine, tokenizer, ["smollm2"])) as server:
        served_acc, served = run_lm_eval("local-completions", {
            "model": "smollm2", "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(smollm2_hf_dir), "batch_size": 4, "max_retries": 1, "add_bos_token": False,
            "max_length": 256}, task_dir)
    ref_acc, reference = run_lm_eval("hf", {"pretrained": str(smollm2_hf_dir), "dtype": "float32",
                                            "device": "cpu", "add_bos_token": False, "batch_size": 6}, task_dir)
    assert served.keys() == reference.keys() == set(range(len(QUESTIONS)))
    for doc_id, expected in reference.items():
        got = served[doc_id]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-3), f"question {doc_id}"
        assert [g for _, g in got] == [g for _, g in expected], f"question {doc_id}"
    assert served_acc == ref_acc
