"""The HTTP app of ``shoprank serve``: the registered pyfunc's ``/invocations``, without pandas.

MLflow's scoring server turns every request into a pandas DataFrame, enforces the signature on it,
turns the answer into another DataFrame and writes it with a pure-Python JSON encoder: about 10 ms
of CPU per single-user request on a 2-core machine, while the model's own answer takes well under
one. This app keeps MLflow's wire format and the same pyfunc, and drops the conversions:

* ``POST /invocations`` takes ``{"dataframe_records": [...]}`` (or ``{"dataframe_split":
  {"columns": [...], "data": [...]}}``, or ``{"inputs": [...]}``) and answers
  ``{"predictions": [{"user_id", "item_id", "score", "rank"}, ...]}``;
* a malformed request is answered 400 with ``{"error_code": "INVALID_PARAMETER_VALUE" or
  "BAD_REQUEST", "message": ...}`` naming the record and the field;
* ``GET /ping`` and ``GET /health`` answer 200 once the model is loaded.

Uvicorn runs it (``--workers N`` processes, each loading the pyfunc from the same local folder, so
the memory-mapped lists are shared through the file cache): ``uvicorn --factory
flows.server:create_app`` with the model folder in ``SHOPRANK_SERVE_MODEL``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from models.requests import RequestError

logger = logging.getLogger(__name__)

MODEL_ENV = "SHOPRANK_SERVE_MODEL"
MAX_RECORDS = 1000
"""Most records one request may hold; larger batches belong to ``shoprank recommend``."""
JSON = "application/json"


class BadRequest(ValueError):
    """The request body is not a recommendation request (not JSON, wrong envelope)."""


def records_of(payload: Any) -> list[Any]:
    """The request records of a decoded body, in any of MLflow's three JSON envelopes."""
    if not isinstance(payload, Mapping):
        raise BadRequest("the body must be a JSON object with a 'dataframe_records' list, e.g. "
                         '{"dataframe_records": [{"user_id": "u1", "k": 10}]}.')
    if "dataframe_records" in payload:
        records = payload["dataframe_records"]
    elif "inputs" in payload:
        records = payload["inputs"]
    elif "dataframe_split" in payload:
        split = payload["dataframe_split"]
        if not isinstance(split, Mapping) or not isinstance(split.get("columns"), list) \
                or not isinstance(split.get("data"), list):
            raise BadRequest("dataframe_split must hold a 'columns' list and a 'data' list.")
        records = [dict(zip(split["columns"], row, strict=False)) if isinstance(row, list)
                   else row for row in split["data"]]
    else:
        raise BadRequest(f"the body has keys {sorted(payload)}; send the records as "
                         "'dataframe_records' (or 'dataframe_split' or 'inputs').")
    if not isinstance(records, list):
        raise BadRequest("dataframe_records must be a list of records.")
    if len(records) > MAX_RECORDS:
        raise BadRequest(f"{len(records)} records in one request; send at most {MAX_RECORDS} "
                         "(use `shoprank recommend` for batch lists).")
    return records


def _error(code: str, message: str) -> Response:
    return Response(orjson.dumps({"error_code": code, "message": message}), status_code=400,
                    media_type=JSON)


def create_app(model_path: str | None = None) -> Starlette:
    """The app answering with the pyfunc saved at ``model_path`` (``$SHOPRANK_SERVE_MODEL``)."""
    import mlflow

    path = model_path or os.environ.get(MODEL_ENV)
    if not path:
        raise RuntimeError(f"set {MODEL_ENV} to the folder of a shoprank pyfunc model.")
    serving = mlflow.pyfunc.load_model(path).unwrap_python_model().serving

    async def invocations(request: Request) -> Response:
        body = await request.body()
        try:
            records = records_of(orjson.loads(body))
        except orjson.JSONDecodeError as err:
            return _error("BAD_REQUEST", f"the request body is not valid JSON: {err}.")
        except BadRequest as err:
            return _error("BAD_REQUEST", str(err))
        try:
            answer = serving.predict(records)
        except RequestError as err:
            return _error("INVALID_PARAMETER_VALUE", str(err))
        return Response(orjson.dumps({"predictions": answer.to_dicts()}), media_type=JSON)

    async def ping(request: Request) -> Response:
        return Response(b"\n", media_type=JSON)

    return Starlette(routes=[
        Route("/invocations", invocations, methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/health", ping, methods=["GET"]),
    ])
