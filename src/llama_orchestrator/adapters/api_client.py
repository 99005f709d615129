"""A small synchronous client of the daemon's control API, and ``RemoteInstances``: the instances port over it.

Used by the CLI when the home's daemon serves its API, and with ``--host URL`` for another node's daemon. Errors
come back as OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` with the status the API
chose (``api.control``); they are raised here again as the project's errors, so exit codes stay the same as when
the CLI works locally.

httpx (about 150 ms to import) is imported when an ``ApiClient`` is made, not with this module; the CLI's fast path
(``cli.fast``) asks for `ps` with ``adapters.http_get`` instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from llama_orchestrator.adapters.http_get import normalize_url as normalize_url
from llama_orchestrator.domain.errors import NotFoundError, OrchestratorError, StartError, UsageError

if TYPE_CHECKING:
    import httpx

    from llama_orchestrator.services.instances_port import Record, Recreate, WaitUntil

STREAMS = ("stdout", "stderr")  # services.instances_port.STREAMS, not imported for it (typing.Protocol is slow)

DEFAULT_TIMEOUT_S = 30.0
SLACK_S = 30.0  # a blocking call (start --wait, stop) answers within its own timeout; this much more for the trip
DRAIN_ALLOWANCE_S = 60.0  # LocalInstances.recreate's drain_timeout


class ApiUnreachable(OrchestratorError):
    """No connection to the API at all (refused, no route, DNS): the daemon is not there."""


def _error_for(status: int, message: str) -> OrchestratorError:
    """The inverse of the API's error table (``api.control.STATUS_OF``): the same exit codes as a local call."""
    if status == 404:
        return NotFoundError(message)
    if status in (400, 422):
        return UsageError(message)
    if status in (401, 403):
        return UsageError(f"{message} (give the key with --api-key or LLAMA_ORCH_API_KEY)")
    if status == 409:
        return StartError(message)
    return OrchestratorError(message)


class ApiClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx

        self.base_url = normalize_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0), transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        json: Any = None,
    ) -> Any:
        import httpx

        kwargs: dict[str, Any] = {"params": _clean(params)}
        if json is not None:
            kwargs["json"] = json
        elif method not in ("GET", "HEAD"):
            # The daemon takes state-changing calls only as JSON (or with a key): no web page can send those
            # without a CORS preflight, which it refuses for foreign origins.
            kwargs["headers"] = {"Content-Type": "application/json"}
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=5.0)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise OrchestratorError(f"the API at {self.base_url} did not answer {method} {path} in time") from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"cannot reach the API at {self.base_url}: {exc}") from None
        self._check(response)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, *, timeout: float | None = None, **params: Any) -> Any:
        return self.request("POST", path, params=params, timeout=timeout)

    def stream_lines(self, path: str, **params: Any) -> Iterator[str]:
        """The lines of a streamed text/plain answer, as they arrive; no read timeout (a log may stay quiet)."""
        return self._lines("GET", path, "log stream", params=_clean(params))

    def post_lines(self, path: str, json: Any) -> Iterator[str]:
        """POST ``json`` and yield the lines of a streamed answer (NDJSON) as they arrive; no read timeout."""
        return self._lines("POST", path, "stream", json=json)

    def _lines(self, method: str, path: str, what: str, **request: Any) -> Iterator[str]:
        import httpx

        try:
            with self._http.stream(method, path, timeout=httpx.Timeout(None, connect=5.0), **request) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"lost the {what} from {self.base_url}: {exc}") from None

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        raise _error_for(response.status_code, _message(response.content, response.reason_phrase))


def _message(body: bytes, reason: str) -> str:
    """The message of an error answer: ``{"error": {"message"}}``, else its text, else the status's reason."""
    import json

    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip() or reason


def _clean(params: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return out


def _one(answer: Any) -> Record:
    """A JSON object of the API, as the port's record (the API's schema is the contract, not checked here)."""
    return cast("Record", answer)


def _many(answer: Any) -> list[Record]:
    return cast("list[Record]", answer)


class RemoteInstances:
    """``InstancesPort`` over a daemon's control API (``/api/...``)."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.origin = client.base_url

    @classmethod
    def connect(cls, url: str, api_key: str | None = None) -> RemoteInstances:
        return cls(ApiClient(url, api_key))

    def ping(self) -> Record:
        return _one(self.client.get("/api/daemon"))

    def names(self, *, autostart_only: bool = False) -> list[str]:
        # A config that does not load counts as autostart, as locally: `up --all` then reports it.
        wanted = [r for r in self.ps() if not autostart_only or r.get("autostart") or r["status"] == "invalid-config"]
        return [r["name"] for r in wanted]

    def ps(self, *, include_orphans: bool = False) -> list[Record]:
        return _many(self.client.get("/api/instances", all=include_orphans))

    def describe(self, name: str) -> Record:
        return _one(self.client.get(f"/api/instances/{name}"))

    def runtime(self, name: str) -> Record:
        return _one(self.client.get(f"/api/instances/{name}/runtime"))

    def start(self, name: str) -> Record:
        return _one(self.client.post(f"/api/instances/{name}/start"))

    def wait(self, name: str, *, until: WaitUntil, timeout: float) -> Record:
        params = {"until": until, "timeout": timeout}
        return _one(
            self.client.request("POST", f"/api/instances/{name}/wait", params=params, timeout=timeout + SLACK_S)
        )

    def stop(self, name: str, timeout: float = 10.0) -> Record:
        return _one(
            self.client.request(
                "POST", f"/api/instances/{name}/stop", params={"timeout": timeout}, timeout=timeout + SLACK_S
            )
        )

    def restart(self, name: str, *, timeout: float = 10.0, wait: bool = False, wait_timeout: float = 120.0) -> Record:
        params = {"timeout": timeout, "wait": wait, "wait_timeout": wait_timeout}
        budget = timeout + (wait_timeout if wait else 0) + SLACK_S
        return _one(self.client.request("POST", f"/api/instances/{name}/restart", params=params, timeout=budget))

    def plan(self, names: list[str], *, recreate: Recreate = "changed") -> list[Record]:
        return _many(self.client.request("POST", "/api/plan", json={"names": names, "recreate": recreate}))

    def recreate(self, name: str, *, wait: bool = False, timeout: float = 120.0, stop_timeout: float = 10.0) -> Record:
        body = {"wait": wait, "timeout": timeout, "stop_timeout": stop_timeout}
        # A recreate may drain (in-flight requests finish) and always waits for replicas: allow for all of it.
        budget = stop_timeout + timeout + DRAIN_ALLOWANCE_S + SLACK_S
        return _one(self.client.request("POST", f"/api/instances/{name}/recreate", json=body, timeout=budget))

    def reload(self) -> Record:
        return _one(self.client.request("POST", "/api/daemon/reload", json={}))

    def health(self, names: list[str] | None = None) -> list[Record]:
        if names is None:
            names = [r["name"] for r in self.ps() if r["status"] in ("starting", "running", "stopping")]
        return [_one(self.client.get(f"/api/instances/{name}/health")) for name in names]

    def events(self, name: str | None = None, *, limit: int = 30, after_id: int = 0) -> list[Record]:
        return _many(self.client.get("/api/events", instance=name, limit=limit, after_id=after_id))

    def logs(
        self,
        name: str,
        *,
        tail: int = 50,
        streams: tuple[str, ...] = STREAMS,
        follow: bool = False,
        since: float | None = None,
        until: float | None = None,
        timestamps: bool = False,
    ) -> Iterator[str]:
        stream = streams[0] if len(streams) == 1 else "both"
        path = f"/api/instances/{name}/logs"
        # Times travel as Unix seconds: "10m" and a zone-less time were read here, on the caller's clock and zone.
        params = {
            "tail": tail,
            "stream": stream,
            "since": None if since is None else f"{since:.6f}",
            "until": None if until is None else f"{until:.6f}",
            "timestamps": timestamps or None,
        }
        if not follow:
            lines = self.client.get(path, **params, format="json")
            return iter(lines)
        return self.client.stream_lines(path, **params, follow=True)

    def attach(self, names: list[str]) -> Iterator[tuple[str, str]]:
        """One log stream per instance (the lines written from when it opens, until the instance exits), merged as
        lines arrive. The streams open when iteration begins (after `up` started the instances): a line written in
        between is not shown, as it would be by the local port, which places its cursors at the call."""
        merged: queue.Queue[tuple[str, str] | tuple[str, None] | tuple[str, BaseException]] = queue.Queue()

        def pump(name: str) -> None:
            try:
                for line in self.client.stream_lines(
                    f"/api/instances/{name}/logs", tail=0, follow=True, until_exit=True, new_only=True
                ):
                    merged.put((name, line))
                merged.put((name, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread, which raises it
                merged.put((name, exc))

        for name in names:
            threading.Thread(target=pump, args=(name,), daemon=True, name=f"attach-{name}").start()
        running = len(names)
        while running:
            name, item = merged.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield name, item
