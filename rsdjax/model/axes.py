"""Logical axes of the Llama parameters and of the stacked KV cache (what the sharding rules map to mesh axes).

A module of its own so that adapters (`rsdjax.model.lora`) and planners can name them without
importing the model.
"""

# Logical axes of every parameter (stacked layer weights lead with `layers`).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "q_heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "q_heads", "head_dim", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
CACHE_AXES = ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim")
