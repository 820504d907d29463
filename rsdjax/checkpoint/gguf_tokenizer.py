"""A `tokenizer.json` + `tokenizer_config.json` from a GGUF's tokenizer metadata (llama.cpp's fields).

Byte-level BPE (`tokenizer.ggml.model = gpt2`: Llama-3, SmolLM, ...) is built from the stored
vocabulary and merges, split with the pre-tokenizer regex llama.cpp uses for `tokenizer.ggml.pre`.
Tokens typed CONTROL become special added tokens, USER_DEFINED plain added tokens (llama.cpp matches
both whole). SentencePiece GGUFs (`llama`: Llama-2) are refused by name for now.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from rsdjax.checkpoint.errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4
# llama.cpp's splits (llama-vocab.cpp) by `tokenizer.ggml.pre`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_SPLITS = {
    "llama3": [LLAMA3_SPLIT], "llama-v3": [LLAMA3_SPLIT], "llama-bpe": [LLAMA3_SPLIT], "smaug-bpe": [LLAMA3_SPLIT],
    "gpt-2": [GPT2_SPLIT], "default": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # StarCoder-style: every digit alone, then GPT-2's split
    "starcoder": [r"\p{N}", GPT2_SPLIT],
}


def build(gguf) -> tuple[Tokenizer, dict]:
    """(the tokenizer, tokenizer_config.json's content) for an opened `GGUFFile`."""
    model = gguf.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{gguf.path}: GGUF tokenizer model '{model}' is not supported "
                              f"(rsdjax builds byte-level BPE, 'gpt2'; convert the model to HF to use it)")
    tokens = list(gguf.need("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf.need("tokenizer.ggml.merges")]
    types = list(gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise CheckpointError(f"{gguf.path}: GGUF pre-tokenizer '{pre}' is not known to rsdjax "
                              f"(known: {', '.join(sorted(PRE_SPLITS))})")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               ignore_merges=pre.startswith("llama"), fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])

    def token(key):
        i = gguf.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": token("padding"), "unk_token": token("unknown"), "add_bos_token": add_bos,
              "add_eos_token": bool(gguf.get("tokenizer.ggml.add_eos_token", False)),
              "model_max_length": int(gguf.get("llama.context_length", 1 << 30)),
              "clean_up_tokenization_spaces": False}
    template = gguf.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}
