"""rsdjax as a language-model-evaluation-harness model: `lm_eval --model rsdjax --model_args path=DIR`.

The three request types run on rsdjax directly (no server), as Levanter's harness adapter does:
  loglikelihood          one forward per (context, continuation) through the sharded `EvalStep`
  loglikelihood_rolling  lm-eval's disjoint rolling windows of `max_length`, scored the same way
  generate_until         the slot engine (`rsdjax.infer`), greedy unless the task asks to sample
Rows are sorted by length and padded to power-of-two buckets, so a task compiles a few shapes.

model_args: path (required), lora, tokenizer, data/stage/fsdp/tensor (mesh axis sizes) or
hardware, max_length (default min(2048, the model's context)), max_gen_toks (256),
add_bos_token (False, as lm-eval's `hf` model). `--batch_size N` sets the rows per step.

lm-eval 0.4.13 finds models only in its own registry (no entry points), so `rsdjax.eval.lm_eval_hook`
adds the name `rsdjax` to that registry whenever `lm_eval.models` is imported; `make` installs the
hook (`python -m rsdjax.eval.lm_eval_hook install`).
"""
from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models first: a non-empty registry skips them)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from rsdjax.data.packing import BATCH_KEYS

MESH_KEYS = ("data", "stage", "fsdp", "tensor")
MIN_BUCKET = 32


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("rsdjax")
class RsdjaxLM(TemplateLM):
    def __init__(self, path: str, lora: str | None = None, tokenizer: str | None = None, hardware: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token=False, batch_size=8,
                 **kwargs):
        super().__init__()
        from rsdjax.eval.step import EvalStep
        from rsdjax.loading import load_model
        from rsdjax.parallel.mesh import mesh_from_args
        from rsdjax.tokenizer import Tokenizer

        mesh_shape = {k: int(kwargs.pop(k)) for k in MESH_KEYS if k in kwargs}
        for ignored in ("device", "max_batch_size"):  # lm-eval passes these to every model
            kwargs.pop(ignored, None)
        if kwargs:
            raise ValueError(f"rsdjax model_args: unknown {', '.join(sorted(kwargs))} (known: path, lora, tokenizer, "
                             f"{', '.join(MESH_KEYS)}, hardware, max_length, max_gen_toks, add_bos_token)")
        self.path = Path(path)
        self.mesh = mesh_from_args(mesh_shape or None, hardware or ("cpu" if not mesh_shape else None))
        self.tok = Tokenizer.load(tokenizer or self.path)
        model = load_model(self.path, mesh=self.mesh, rules="train")
        if lora:
            from rsdjax.checkpoint.peft import apply_adapter

            model = apply_adapter(model, lora)
        self.model = model
        shards = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp")]))
        size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is an HF notion
        self._batch_size = -(-max(size, 1) // shards) * shards
        self._max_length = int(max_length or min(2048, model.cfg.max_position_embeddings))
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token)
        self.step = EvalStep(model, self.mesh, batch_size=self._batch_size)
        self.state = self.step.state_of(model)
        self._engine = None

    # ------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        eos = self.model.cfg.eos_token_id
        eos = self.tok.eos_ids or (eos if isinstance(eos, list) else [eos])
        return int(eos[0])

    @property
    def prefix_token_id(self) -> int:
        from rsdjax.eval.data import document_prefix

        return document_prefix(self.tok, self.model.cfg)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, add_bos=add)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per request."""
        items = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval request with an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            items.append((whole, len(continuation)))
        scored = self._score(items)
        for (strings, _, _), result in zip(requests, scored):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (string,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(string, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            scored = self._score([(list(ctx) + list(cont), len(cont)) for ctx, cont in windows])
            total = float(sum(lp for lp, _ in scored))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from rsdjax.infer.generate import generate
        from rsdjax.infer.interface import SamplingParams

        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            sample = _bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-(self.max_length - new):]
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=new, temperature=temperature, top_p=float(kw.pop("top_p", 1.0)),
                                         stop=until, seed=0))
        done = generate(self._engine_for_generation(), prompts, params, tokenizer=self.tok)
        out = []
        for req, c, p in zip(requests, done, params):
            text = c.text
            for stop in p.stop:  # the engine already stops there; cut as lm-eval's own models do
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    # ------------------------------------------------------------ helpers

    def _score(self, items: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """items: (tokens, n) -> (log-likelihood of the last n tokens given the rest, all of them argmax)."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = self._bucket(max(len(items[i][0]) - 1 for i in chunk))
            batch = {k: np.zeros((self.batch_size, width), np.float32 if k == "loss_mask" else np.int32)
                     for k in BATCH_KEYS}
            for r, i in enumerate(chunk):
                ids, n = items[i]
                t = len(ids) - 1
                batch["tokens"][r, :t], batch["targets"][r, :t] = ids[:-1], ids[1:]
                batch["loss_mask"][r, t - n:t] = 1.0
                batch["segment_ids"][r, :t], batch["positions"][r, :t] = 1, np.arange(t)
            nll, tokens, hits = self.step(self.state, batch)
            for r, i in enumerate(chunk):
                results[i] = (-float(nll[r]), bool(hits[r] == tokens[r]))
        return results

    def _bucket(self, n: int) -> int:
        size = MIN_BUCKET
        while size < n:
            size *= 2
        return min(size, self.max_length)

    def _engine_for_generation(self):
        if self._engine is None:
            from rsdjax.infer.engine import SlotEngine, eos_ids_for

            self._engine = SlotEngine(self.model, max_slots=self.batch_size, max_context=self.max_length,
                                      mesh=self.mesh, eos_token_ids=eos_ids_for(self.path, self.model.cfg, self.tok))
        return self._engine
