"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter {lora_name, lora_path}, /v1/unload_lora_adapter {lora_name}.

Answers as vLLM does (plain-text success messages); errors in OpenAI's shape: 400 for a bad adapter
or a full pool, 404 for unloading a name that is not loaded. A load reads the adapter and writes it
into the device pool off the event loop; running requests keep going (nothing recompiles). An
unloaded adapter disappears from /v1/models and `model` at once, while requests already using it
finish on it.
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from rsdjax.serve.errors import APIError, bad_request
from rsdjax.serve.protocol import LoadLoraRequest, UnloadLoraRequest


def install_lora_routes(app: FastAPI, adapters, auth: list, unknown_fields) -> None:
    """`adapters`: the engine's AdapterPool, or None (the routes then say how to get one)."""

    def pool():
        if adapters is None:
            raise bad_request("this server has no LoRA adapter pool: start it with --lora NAME=DIR or --max-loras N")
        return adapters

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora_adapter(body: LoadLoraRequest, request: Request):
        unknown_fields(body, request)
        try:
            await asyncio.to_thread(pool().load, body.lora_name, body.lora_path)
        except (ValueError, OSError) as e:  # AdapterError, CheckpointError: the message names the file
            raise bad_request(f"lora_path: {e}", "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora_adapter(body: UnloadLoraRequest, request: Request):
        unknown_fields(body, request)
        try:
            pool().unload(body.lora_name)
        except KeyError as e:
            raise APIError(404, str(e), type="not_found_error", param="lora_name", code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
