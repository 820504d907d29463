"""The CLI's path (`rsdjax.infer.generate`, behind `rsdjax generate`) and the server give the same text
for the same greedy request, with stop strings and with stop ids (one text stopper for both)."""
import dataclasses


from rsdjax.infer.generate import generate
from rsdjax.infer.interface import SamplingParams
from rsdjax.serve.fake_engine import FakeEngine
from serve_support import client, fake_server

PROMPT = "The quick brown fox"


def test_cli_and_server_text_are_equal(tok):
    # the same deterministic engine twice: one behind the server, one for the CLI's path
    engine = FakeEngine(vocab_size=tok.vocab_size, eos_token_ids=tok.eos_ids)
    with fake_server(tok) as (url, _, _):
        api = client(url)
        ids = tok.encode(PROMPT, add_bos=True)
        free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        (run,) = generate(engine, [ids], free, tokenizer=tok)
        stop_id = next(t for t in run.token_ids[3:] if tok.decode([t]).strip())  # a stop id with text of its own
        words = run.text.split()
        stop_text = words[len(words) // 2][:3]  # a stop string inside the output
        cases = [dict(stop_token_ids=[stop_id]), dict(stop=[stop_text]), dict(stop=[stop_text], stop_token_ids=[stop_id]),
                 dict(stop=["no such text"])]
        for case in cases:
            (cli,) = generate(engine, [ids], dataclasses.replace(free, **case), tokenizer=tok)
            body = {"ignore_eos": True, **({"stop_token_ids": case["stop_token_ids"]} if "stop_token_ids" in case else {})}
            r = api.completions.create(model="fake", prompt=ids, max_tokens=24, temperature=0,
                                       stop=case.get("stop"), extra_body=body)
            assert (r.choices[0].text, r.choices[0].finish_reason) == (cli.text, cli.finish_reason), case
            streamed = api.completions.create(model="fake", prompt=ids, max_tokens=24, temperature=0,
                                              stop=case.get("stop"), extra_body=body, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == cli.text, case
        assert cli.finish_reason == "length" and cli.text == run.text
