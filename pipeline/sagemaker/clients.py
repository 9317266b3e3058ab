"""boto3 clients for the AWS half: region, retries, one-line errors. Plain boto3, no SDK."""
from __future__ import annotations

import functools
import os


class AwsError(Exception):
    """An AWS request that cannot be made or did not succeed; the message says what to do."""


def resolve_region(explicit: str | None = None) -> str:
    region = explicit or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise AwsError("no AWS region: pass --region or set AWS_REGION / AWS_DEFAULT_REGION")
    return region


def client(service: str, region: str):
    """A boto3 client; boto3 itself honours AWS_ENDPOINT_URL(_<SERVICE>) (e.g. a moto server).

    Throttling and transient network errors are retried by botocore's standard retry mode
    (AWS_MAX_ATTEMPTS overrides the attempts), never by a loop of ours.
    """
    from botocore.config import Config

    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))
    config = Config(retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=10,
                    read_timeout=60)
    return session(region).client(service, config=config)


def session(region: str | None = None):
    """A fresh boto3 session (credentials and endpoints read as they are now) that shares one
    loader with every other: it keeps the parsed service models, which each new session would
    otherwise parse again (SageMaker's alone costs ~100 ms of CPU, on every deploy-function call)."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    core.register_component("data_loader", _service_models())
    return boto3.Session(botocore_session=core, region_name=region)


@functools.lru_cache(maxsize=1)
def _service_models():
    from botocore.loaders import create_loader

    return create_loader(os.environ.get("AWS_DATA_PATH"))


def describe_error(exc: BaseException) -> str:
    """One line for a botocore error: code and message, no traceback."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        return f"{err.get('Code', 'Error')}: {err.get('Message', '')}".strip()
    return str(exc) or type(exc).__name__


def call(fn, /, *, error: type[Exception] = AwsError, service: str = "", **kwargs):
    """One boto3 request, `fn(**kwargs)`: its answer, or `error` with one line, no traceback.

    With `service` the line reads "<service> refused <operation>: <code>: <message>", or "cannot
    reach <service>: ..." when the request never got an answer; without it, "<operation>: ..."
    for both. (Request parameters are CamelCase, so they never meet `error` or `service`.)"""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except ClientError as exc:
        where = f"{service} refused {fn.__name__}" if service else fn.__name__
        raise error(f"{where}: {describe_error(exc)}") from None
    except BotoCoreError as exc:
        raise error(f"cannot reach {service}: {exc}" if service else f"{fn.__name__}: {exc}") from None


# --------------------------------------------------------------------------- pipelines
