from rsdjax.model.llama import KVCache, Llama, resolve_dtype

__all__ = ["KVCache", "Llama", "resolve_dtype"]
