"""Evaluation: held-out loss, perplexity and bits per byte (`rsdjax eval`, `eval:` in train configs),
Q&A accuracy of greedy answers, and a language-model-evaluation-harness model class."""
