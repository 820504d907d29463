"""Training data: documents -> token store on disk -> packed windows -> shuffled mixture -> batches.

`sources` reads .txt / .jsonl documents, `store` tokenizes them once into a memory-mapped file,
`packing` cuts fixed-length windows (EOS between documents, segment ids, positions, loss mask),
`pipeline` shuffles and mixes sources with grain (random access, so resuming at example N is O(1))
and assembles global batches sharded over the mesh.
"""
from rsdjax.data.sources import DataError

__all__ = ["DataError"]
