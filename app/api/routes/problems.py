"""OpenAPI description of the problem+json answers."""

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


def _problem(description: str) -> dict[str, Any]:
    return {
        "model": Problem,
        "description": description,
        "content": {"application/problem+json": {}},
    }


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _problem("API keys are configured and none (or a wrong one) was sent"),
    404: _problem("No such request (or not yours)"),
    413: _problem("The CSV is larger than MAX_CSV_BYTES"),
    422: _problem("The input is invalid; `errors` lists each problem with its line and column"),
}
