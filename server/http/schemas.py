"""Pydantic models at the HTTP edge (requests, responses, OpenAPI)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- adapters ------------------------------------------------------------------------------------
class FileOut(BaseModel):
    sha256: str
    size: int


class FusedOut(BaseModel):
    name: str
    version: int
    owner: Literal["tenant", "shared"]


class AdapterOut(BaseModel):
    """One stored adapter version (or AdapterFusion: method "fusion", with `fuses`)."""

    name: str
    version: int
    owner: Literal["tenant", "shared"]
    sha256: str = Field(description="sha256 over the sorted 'name sha256' lines of the files")
    method: str
    methods: list[str]
    has_head: bool
    head: dict[str, Any] | None = None
    nbytes: int = Field(description="bytes of adapter weights once loaded")
    size: int = Field(description="bytes on disk")
    files: dict[str, FileOut]
    created: str
    uploader: str
    versions: list[int] | None = None
    fuses: list[FusedOut] | None = Field(
        None, description="an AdapterFusion's adapters, pinned to the versions current at its upload"
    )
    warnings: list[str] = Field(
        default_factory=list, description="what the upload holds that is kept but not used: config keys the library does "
        "not know (a foreign file), PEFT target_modules entries that match no tensor, a target_modules pattern left "
        "unchecked; or not kept: an LM head equal to the backbone's",
    )
    lm_head: Literal["backbone"] | None = Field(
        None, description="'backbone': the upload held an LM head (AdapterHub's head_config.json + "
        "model_head.safetensors) equal to the backbone's LM head; it is not stored and generation uses the backbone's",
    )
    shadowed: bool = Field(
        False, description="in a listing: a shared adapter hidden by the tenant's own adapter of the same name "
        "(requests naming it use the tenant's own)",
    )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class Deleted(BaseModel):
    name: str
    deleted: bool = True
    versions: list[int]


UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "adapter files; each part's filename is its name in the adapter folder "
                            "(adapter_config.json, adapter.safetensors or adapter_model.safetensors, "
                            "head_config.json, model_head.safetensors; or, for an AdapterFusion over adapters "
                            "already uploaded, adapter_fusion_config.json and model_adapter_fusion.safetensors). On "
                            "a causal LM backbone an LM head may exceed the upload limit up to a float32 copy of the "
                            "backbone's LM head; it is accepted (and not stored) only if it equals the backbone's",
                        },
                        "archive": {"type": "string", "format": "binary", "description": ".tar (plain, .gz, .bz2 or .xz) or .zip of one adapter folder"},
                    },
                }
            }
        },
    }
}


# -- inference -----------------------------------------------------------------------------------
Composition = str | list[Any] | dict[str, Any]


class InferRequest(_Strict):
    inputs: list[str] = Field(description="texts; at most ADAPTERSERVE_MAX_INPUTS")
    adapters: Composition = Field(
        description='"name", or {"stack": [...]}, {"fuse": [...]}, {"parallel": [...]}, {"average": [...], "weights": [...]}'
    )
    head: str | None = Field(None, description="adapter whose prediction head produces the result (default: the last adapter's head, if any)")
    task: Literal["auto", "embedding", "classification"] = "auto"
    truncate: bool = Field(False, description="truncate inputs over MAX_INPUT_TOKENS instead of rejecting them")


class InferResult(BaseModel):
    embedding: list[float] | None = None
    label: str | None = None
    score: float | None = None
    logits: list[float] | None = None
    parallel: list[list[float]] | None = Field(None, description="for a parallel composition: one embedding per branch")
    truncated: bool = False


class AdapterVersion(BaseModel):
    name: str
    version: int
    owner: Literal["tenant", "shared"]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class InferResponse(BaseModel):
    results: list[InferResult]
    adapters: list[AdapterVersion]
    usage: Usage


# -- OpenAI-compatible -----------------------------------------------------------------------------
class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="adapter name")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, one list of token ids, or a list of token-id lists (ids are the model's "
        "input as given: no special tokens are added)"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each embedding as the base64 of its little-endian float32 bytes, as OpenAI returns it"
    )
    dimensions: int | None = Field(None, ge=1, description="only the model's own embedding size is supported")
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or a base64 string with encoding_format base64")


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- health --------------------------------------------------------------------------------------
class Health(BaseModel):
    status: str
    detail: str | None = None
