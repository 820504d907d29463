"""`lm_eval --model rsdjax` from the shell on tasks defined here (local jsonl), against lm-eval's own `hf` model."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

MC = [{"q": "The sky is", "choices": [" blue", " green", " loud"], "label": 0},
      {"q": "Two plus two is", "choices": [" four", " five"], "label": 0},
      {"q": "富士山は日本で一番", "choices": ["高い山です", "低い川です", "青い"], "label": 0},
      {"q": "A cat says", "choices": [" meow", " woof", " moo", " quack"], "label": 0}]
DOCS = [{"text": "Tokenizers split text into pieces; a model predicts the next piece. " * 6},
        {"text": "日本語の文章をトークンに分けます。" * 5}]
GEN = [{"q": "Count: one, two,", "a": " three"}, {"q": "Colours: red, green,", "a": " blue"}]
TASKS = {
    "tiny_mc": dict(output_type="multiple_choice", doc_to_text="{{q}}", doc_to_choice="{{choices}}",
                    doc_to_target="{{label}}", metric_list=[{"metric": "acc"}]),
    "tiny_rolling": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                         metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]),
    "tiny_gen": dict(output_type="generate_until", doc_to_text="{{q}}", doc_to_target="{{a}}",
                     generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                     metric_list=[{"metric": "exact_match"}]),
}
ROWS = {"tiny_mc": MC, "tiny_rolling": DOCS, "tiny_gen": GEN}


@pytest.fixture(scope="module")
def setup(tiny_hf_dir, tiny_tokenizer_dir, tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("lm_eval")
    model = root / "model"
    shutil.copytree(tiny_hf_dir, model)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, model / f.name)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, spec in TASKS.items():
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS[name]), encoding="utf-8")
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True), encoding="utf-8")
    return model, tasks, root


def samples_by_doc(path_glob):
    out = {}
    for f in path_glob:
        task = f.name.split("samples_")[1].rsplit("_", 1)[0]
        out[task] = {json.loads(line)["doc_id"]: json.loads(line) for line in f.read_text().splitlines()}
    return out


@pytest.mark.slow  # two lm-eval runs, one in a fresh process (~35 s of CPU)
def test_lm_eval_shell_model_rsdjax_matches_hf(setup):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tasks, root = setup
    out_dir = root / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_OFFLINE": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    lm_eval_bin = shutil.which("lm_eval", path=os.path.dirname(sys.executable))
    assert lm_eval_bin, "lm-eval's console script is not installed next to this Python"
    run = subprocess.run([lm_eval_bin, "--model", "rsdjax", "--model_args", f"path={model},fsdp=2,tensor=4",
                          "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--batch_size", "4",
                          "--log_samples", "--output_path", str(out_dir)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = samples_by_doc(out_dir.rglob("samples_*.jsonl"))

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # only the tasks defined here: indexing lm-eval's ~26K built-in task files takes 15-30 s (the shell
    # run above has no way to skip them)
    tasks_here = TaskManager(include_path=str(tasks), include_defaults=False)
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=list(TASKS),
                                  task_manager=tasks_here, batch_size=4, device="cpu", log_samples=True)
    assert set(ours) == set(TASKS)
    for task in ("tiny_mc", "tiny_rolling"):
        theirs = {s["doc_id"]: s for s in ref["samples"][task]}
        assert sorted(ours[task]) == sorted(theirs) == list(range(len(ROWS[task])))
        for doc_id, s in theirs.items():
            # the samples file stores each response as text: (loglikelihood, is_greedy) or the rolling sum
            mine = [r[0] for r in ours[task][doc_id]["resps"]]
            ref_resps = [r[0] for r in s["resps"]]
            assert len(mine) == len(ref_resps)
            for got, want in zip(mine, ref_resps):
                got, want = (got, want) if task == "tiny_mc" else ((got, None), (want, None))
                assert float(got[0]) == pytest.approx(float(want[0]), abs=1e-3), (task, doc_id)
                assert str(got[1]) == str(want[1]), (task, doc_id)
    theirs = {s["doc_id"]: s["resps"][0][0] for s in ref["samples"]["tiny_gen"]}
    assert any(theirs.values())  # the comparison is not between empty strings
    assert {d: s["resps"][0][0] for d, s in ours["tiny_gen"].items()} == theirs
