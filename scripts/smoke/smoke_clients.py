"""The two ways the smoke test reaches an endpoint, with one answer shape.

- HttpEndpoint: POST /invocations on a URL (the local staging endpoint the runner started;
  $INVMON_ENDPOINT_URL), readiness from GET /ping.
- SageMakerEndpoint: InvokeEndpoint on a SageMaker endpoint, readiness from DescribeEndpoint
  (InService) and the model it serves (DescribeEndpointConfig, DescribeModel), which must be the
  version under test. A model's error reaches the caller as ModelError with the container's own
  status and body (OriginalStatusCode, OriginalMessage); a request refused before the model (by
  SageMaker's front end) is another 4xx, kept as such.

Neither retries a request: a smoke test measures what a client gets on its first try.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Answer:
    status: int | None  # None: no answer at all (timeout, connection refused)
    body: bytes
    seconds: float
    problem: str = ""  # why there is no answer
    source: str = "model"  # "sagemaker": refused by SageMaker before the model saw it

    def json(self) -> dict | None:
        try:
            found = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None
        return found if isinstance(found, dict) else None


class HttpEndpoint:
    def __init__(self, url: str, timeout_s: float = 30.0, poll_s: float = 0.5):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"endpoint URL {url!r}: expected http://host:port")
        self.name, self.host, self.port = url, parts.hostname, parts.port or 80
        self.timeout_s, self.poll_s = timeout_s, poll_s

    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: dict | None = None) -> Answer:
        started = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Answer(response.status, response.read(), time.perf_counter() - started)
        except (socket.timeout, TimeoutError):
            return Answer(None, b"", time.perf_counter() - started, f"no answer within {self.timeout_s:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return Answer(None, b"", time.perf_counter() - started, f"no answer: {exc}")
        finally:
            conn.close()

    def wait_ready(self, wait_s: float, model_data: str = "") -> str | None:
        """None once /ping answers 200; else why not, after `wait_s`. (Which model it serves is
        the runner's to check: it started this server from the version under test.)"""
        deadline = time.monotonic() + wait_s
        while True:
            answer = self._call("GET", "/ping")
            if answer.status == 200:
                return None
            if time.monotonic() >= deadline:
                said = answer.problem or f"{answer.status} {answer.body[:200].decode(errors='replace')}"
                return f"the endpoint at {self.name} was not ready within {wait_s:g} s ({said})"
            time.sleep(self.poll_s)

    def invoke(self, body: bytes, content_type: str) -> Answer:
        headers = {"Accept": "application/json", "Content-Length": str(len(body))}
        if content_type:
            headers["Content-Type"] = content_type
        return self._call("POST", "/invocations", body, headers)


class SageMakerEndpoint:
    def __init__(self, name: str, runtime=None, sagemaker=None, region: str | None = None,
                 timeout_s: float = 30.0, poll_s: float = 15.0):
        import boto3
        from botocore.config import Config

        self.name, self.timeout_s, self.poll_s = name, timeout_s, poll_s
        session = boto3.Session(region_name=region) if runtime is None or sagemaker is None else None
        # One attempt per request (no retries), bounded in time: a hang is an answer too.
        once = Config(read_timeout=timeout_s, connect_timeout=10, retries={"total_max_attempts": 1})
        self.runtime = runtime or session.client("sagemaker-runtime", config=once)
        self.sm = sagemaker or session.client("sagemaker", config=Config(retries={"mode": "standard"}))

    def serving(self, described: dict) -> str:
        """The ModelDataUrl of the model an endpoint's current config serves."""
        config = self.sm.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
        (variant, *_) = config["ProductionVariants"]
        model = self.sm.describe_model(ModelName=variant["ModelName"])
        container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
        return container.get("ModelDataUrl", "")

    def wait_ready(self, wait_s: float, model_data: str = "") -> str | None:
        """None once the endpoint is InService serving `model_data` (the version under test);
        else why not, after `wait_s`."""
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + wait_s
        while True:
            try:
                described = self.sm.describe_endpoint(EndpointName=self.name)
                status = described["EndpointStatus"]
                if status == "Failed":
                    return f"endpoint {self.name} is Failed: {described.get('FailureReason', 'no reason given')}"
                served = self.serving(described) if status == "InService" else ""
            except (ClientError, BotoCoreError) as exc:
                return f"endpoint {self.name} could not be described: {exc}"
            if status == "InService" and (not model_data or served == model_data):
                return None
            if time.monotonic() >= deadline:
                if status == "InService":
                    return (f"endpoint {self.name} serves {served}, not the version under test ({model_data}): "
                            "another execution deployed it since")
                return f"endpoint {self.name} was not InService within {wait_s:g} s (it is {status})"
            time.sleep(self.poll_s)

    def invoke(self, body: bytes, content_type: str) -> Answer:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        started = time.perf_counter()
        try:
            response = self.runtime.invoke_endpoint(EndpointName=self.name, ContentType=content_type,
                                                    Accept="application/json", Body=body)
            return Answer(200, response["Body"].read(), time.perf_counter() - started)
        except ClientError as exc:
            seconds = time.perf_counter() - started
            error = exc.response.get("Error", {})
            if error.get("Code") == "ModelError":  # the container answered: its status and body
                original = exc.response.get("OriginalMessage") or ""
                return Answer(int(exc.response.get("OriginalStatusCode") or 0), original.encode(), seconds)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            text = json.dumps({"error": f"{error.get('Code', 'Error')}: {error.get('Message', '')}"})
            return Answer(status, text.encode(), seconds, source="sagemaker")
        except (ReadTimeoutError, ConnectTimeoutError):
            return Answer(None, b"", time.perf_counter() - started, f"no answer within {self.timeout_s:g} s")
        except BotoCoreError as exc:
            return Answer(None, b"", time.perf_counter() - started, f"no answer: {exc}")
