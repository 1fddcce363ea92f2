"""Request and response bodies (pydantic): they validate input and document the API at /docs.

Chat completions follow OpenAI's format; fields OpenAI clients send that mean nothing here (temperature,
top_p, user, ...) are accepted and ignored, so existing clients work unchanged. Two extensions:
`beam_size` (beam search for captions) and `task` (force caption / vqa / nlvr2 instead of inferring it
from the message). The native endpoints refuse unknown fields, so a misspelt option is a 400, not a
silent default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- chat


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... (remote URLs are refused)")
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, description="VQA: the top n answers as n choices; captions and NLVR2: 1")
    beam_size: int = Field(1, ge=1, le=8, description="extension: beam search for captions (1 = greedy)")
    task: Literal["caption", "vqa", "nlvr2"] | None = Field(None, description="extension: skip task inference")


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minivlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------- native


IMAGE = Field(description="the image as a data URL (data:image/png;base64,...) or bare base64")


class CaptionRequest(Strict):
    image: str = IMAGE
    max_tokens: int | None = Field(None, ge=1, description="caption length limit in word pieces")
    beam_size: int = Field(1, ge=1, le=8)


class CaptionResponse(BaseModel):
    caption: str
    tokens: int
    finish_reason: Literal["stop", "length"]


class VQARequest(Strict):
    image: str = IMAGE
    question: str
    top_k: int = Field(5, ge=1)


class Answer(BaseModel):
    answer: str
    score: float = Field(description="sigmoid confidence of the answer")


class VQAResponse(BaseModel):
    question: str
    answers: list[Answer]


class DetectRequest(Strict):
    image: str = IMAGE
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    max_regions: int | None = Field(None, ge=1, description="the top regions by score (default: all)")


class Detection(BaseModel):
    bbox: list[float] = Field(description="COCO [x, y, width, height] in image pixels")
    area: float
    category_id: int
    category: str = Field(description="the object tag")
    attribute: str | None = None
    score: float


class DetectResponse(BaseModel):
    width: int
    height: int
    detections: list[Detection]


class NLVR2Request(Strict):
    left: str = IMAGE
    right: str = IMAGE
    statement: str


class NLVR2Response(BaseModel):
    statement: str
    prediction: bool
    probability: float = Field(description="P(the statement is true of the pair)")


class RetrieveRequest(Strict):
    query: str
    top_k: int = Field(5, ge=1)


class Match(BaseModel):
    rank: int
    image: str = Field(description="file name inside the --index folder")
    score: float


class RetrieveResponse(BaseModel):
    query: str
    n_images: int
    results: list[Match]
