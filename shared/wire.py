"""The `/predict` wire contract: one set of models, used by the black box to answer and by clients to validate.

    POST /predict  (multipart, field `image` repeated; header X-Client-Id, see CLIENT_ID)
    -> {"predictions": [{"label": str, "index": int, "probabilities": {class: p} | absent}], "queries": int}

Predictions come in request order. A label-only box leaves `probabilities` out. `queries` (how many
images were classified and counted) is always sent by advexplain's black box; a client accepts a
box that leaves it out, since any classifier answering in this shape is a valid black box. The
class names a client trusts are its own (the surrogate's); `label` is matched against them by name.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

# Who is asking: the header a client sends with every request and the box counts queries under.
CLIENT_ID_HEADER = "X-Client-Id"
MAX_CLIENT_ID = 64
# Printable ASCII without spaces: it ends up in logs, headers and (bounded) metric labels.
CLIENT_ID = re.compile(rf"[!-~]{{1,{MAX_CLIENT_ID}}}")
CLIENT_ID_RULE = f"1-{MAX_CLIENT_ID} printable ASCII characters without spaces"


class Prediction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    label: str = Field(description="the predicted class")
    index: int = Field(ge=0, description="its position in the box's class list")
    probabilities: dict[str, float] | None = Field(
        None, description="class -> probability; absent when the box answers labels only")


class PredictResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    predictions: list[Prediction] = Field(description="one per uploaded file, in request order")
    queries: int | None = Field(None, ge=1, description="images classified (and counted) for this request")
