"""rsdjax: Llama models sharded over device meshes in JAX + Flax NNX."""
__version__ = "0.1.0"


def load_model(path, mesh=None, **kwargs):
    """See `rsdjax.loading.load_model` (imported lazily so `import rsdjax` does not start JAX)."""
    from rsdjax.loading import load_model as _load

    return _load(path, mesh=mesh, **kwargs)
