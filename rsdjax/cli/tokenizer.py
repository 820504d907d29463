"""`rsdjax tokenizer train|extend|resize-model`: byte-level BPE, extension keeping old ids, vocab resize."""
from __future__ import annotations

from pathlib import Path

from rsdjax.cli.common import add_path_arg


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or extend a tokenizer; resize a model's vocabulary to it")
    cmds = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = cmds.add_parser("train", help="train a byte-level BPE tokenizer (Llama-3 pre-tokenizer and special tokens)")
    t.add_argument("corpus", nargs="+", help=".txt/.jsonl files, directories or globs")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("-o", "--output", type=Path, required=True, help="directory for tokenizer.json")
    t.set_defaults(func=run_train)

    e = cmds.add_parser("extend", help="learn N new tokens from a corpus; every old token keeps its id")
    e.add_argument("--model", type=Path, default=None,
                   help="the base tokenizer is this model's (an HF Llama directory, rsdjax checkpoint or GGUF)")
    e.add_argument("inputs", nargs="+", metavar="[BASE] CORPUS",
                   help="without --model, first the base tokenizer (directory or tokenizer.json); then .txt/.jsonl "
                        "files, directories or globs in the new language")
    e.add_argument("--add", type=int, required=True, help="number of new tokens")
    e.add_argument("--min-frequency", type=int, default=2)
    e.add_argument("-o", "--output", type=Path, required=True)
    e.set_defaults(func=run_extend)

    r = cmds.add_parser("resize-model", help="grow a model's embedding and LM head to an extended tokenizer")
    add_path_arg(r, "model", ("--model",), "HF Llama directory or rsdjax checkpoint")
    r.add_argument("--old-tokenizer", type=Path, required=True, help="the tokenizer the model was trained with")
    r.add_argument("--new-tokenizer", type=Path, required=True, help="the extended tokenizer")
    r.add_argument("--multiple", type=int, default=128, help="pad the vocabulary to a multiple of this")
    r.add_argument("-o", "--output", type=Path, required=True, help="rsdjax checkpoint directory to write")
    r.set_defaults(func=run_resize)


def _refuse_nonempty(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path}: exists and is not empty; refusing to overwrite")


def _non_empty(texts, corpus) -> list[str]:
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{', '.join(map(str, corpus))}: no text in the corpus (empty or blank files)")
    return texts


def run_train(args) -> int:
    from rsdjax.vocab import chars_per_token, read_texts, train_tokenizer

    _refuse_nonempty(args.output)
    texts = _non_empty(read_texts(args.corpus), args.corpus)
    tok = train_tokenizer(texts, args.vocab_size, args.min_frequency)
    tok.save(args.output)
    print(f"wrote {args.output / 'tokenizer.json'}: {tok.vocab_size} tokens; "
          f"{chars_per_token(tok, texts):.2f} characters per token on the corpus")
    return 0


def run_extend(args) -> int:
    from rsdjax.tokenizer import Tokenizer
    from rsdjax.vocab import chars_per_token, extend_tokenizer, read_texts

    if args.model is not None:
        base, corpus = Tokenizer.for_model(args.model), args.inputs
        if base is None:
            raise ValueError(f"{args.model}: the model has no tokenizer (tokenizer.json or a GGUF vocabulary)")
    elif len(args.inputs) < 2:
        raise ValueError("tokenizer extend: give BASE CORPUS... or --model MODEL CORPUS...")
    else:
        base, corpus = None, args.inputs[1:]
    _refuse_nonempty(args.output)
    base = base or Tokenizer.load(args.inputs[0])
    texts = _non_empty(read_texts(corpus), corpus)
    ext = extend_tokenizer(base, texts, args.add, args.min_frequency)
    ext.save(args.output)
    print(f"wrote {args.output / 'tokenizer.json'}: {base.vocab_size} -> {ext.vocab_size} tokens "
          f"({ext.vocab_size - base.vocab_size} new, every old id kept)")
    print(f"characters per token on the corpus: {chars_per_token(base, texts):.2f} -> {chars_per_token(ext, texts):.2f}")
    return 0


def run_resize(args) -> int:
    from flax import nnx

    from rsdjax.loading import abstract_model, load_model, save_model
    from rsdjax.tokenizer import Tokenizer
    from rsdjax.model.resize import resize_vocab

    from rsdjax.cli.common import path_arg

    args.model = path_arg(args, "model")
    _refuse_nonempty(args.output)
    old, new = Tokenizer.load(args.old_tokenizer), Tokenizer.load(args.new_tokenizer)
    model = load_model(args.model, param_dtype="keep")
    params, cfg = resize_vocab(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg, old, new, args.multiple)
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    save_model(nnx.merge(graphdef, state), args.output)
    new.save(args.output)
    print(f"wrote {args.output}: vocab {model.cfg.vocab_size} -> {cfg.vocab_size} "
          f"({new.vocab_size - old.vocab_size} new tokens at the mean of their old pieces)")
    return 0
