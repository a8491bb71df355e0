"""MLflow tracking URIs, checked before anything runs: a known scheme, a store that can be made, a server
that answers. Light on purpose (no MLflow import): the commands refuse a bad URI in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from trainables.errors import InputError

KNOWN_SCHEMES = {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}


def check_tracking_uri(uri: str) -> str:
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in KNOWN_SCHEMES:
        known = ", ".join(sorted(s for s in KNOWN_SCHEMES if s))
        raise InputError(f"unknown tracking URI scheme {scheme!r} in {uri} (known: {known})")
    return uri


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fails fast, naming the URI, when the store cannot be reached or created.

    MLflow's own client would retry an unreachable server for minutes before failing.
    """
    database = sqlite_file(uri)
    if database is not None and not database.resolve().parent.is_dir():
        raise InputError(
            f"cannot create MLflow store {uri}: folder {database.resolve().parent} does not exist"
        )
    if urlparse(uri).scheme in {"http", "https"}:
        try:
            response = requests.get(
                f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                timeout=timeout_s,
                **_credentials(),
            )
        except requests.RequestException as error:
            raise InputError(
                f"MLflow tracking server {uri} is unreachable ({type(error).__name__})"
            ) from None
        if response.status_code in (401, 403):
            raise InputError(
                f"MLflow at {uri} refused the login (HTTP {response.status_code}): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            )
        if response.status_code >= 500:
            raise InputError(f"MLflow tracking server {uri} answered HTTP {response.status_code}")


def _credentials() -> dict[str, Any]:
    """The login MLflow's own client would send, from the same environment variables."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"auth": (user, password)}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"headers": {"Authorization": f"Bearer {token}"}} if token else {}


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (sqlite:///rel.db, sqlite:////abs.db), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def is_mlflow_error(error: BaseException) -> bool:
    """Whether MLflow raised the error. MLflow is imported here, when an error comes, not before:
    bad options should not wait for it to load."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException)
