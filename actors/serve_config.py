"""`ServeAppConfig`: everything the OpenAI-compatible endpoint (`actors.serving`) takes, validated once.

The same mapping is the ``args`` of the application in ``configs/serve.yaml``
(a Ray Serve config file) and what ``specvlm serve --config FILE`` reads. The
models here hold every default (the demo model on CPU); ``specvlm serve
--print-config`` prints them. Importing this module does not import Ray; the
autoscaling config is checked against Serve's own model lazily.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from specvlm.config import (
    CPU_TREE,
    ConfigError,
    EngineConfig,
    ModelConfig,
    StrictModel,
    parse_config,
    read_yaml,
)


class ServeLimits(StrictModel):
    """What one request may cost, and how long and how many a replica holds; over a limit is a 4xx naming it.

    Everything here is checked before the costly step it guards: the body size and read time while reading
    it, characters and images on the parsed request (before the chat template and tokenizer), image sizes
    from their headers (before decoding), tokens after the tokenizer (before the engine).
    """

    max_body_bytes: int = Field(24 * 1024**2, gt=0, description="HTTP request body (JSON with data: URLs)")
    body_timeout_s: float = Field(
        10.0, gt=0, description="time to receive a body, extended by what arrives (min_body_bytes_per_s); else 408"
    )
    min_body_bytes_per_s: int = Field(
        64 * 1024, gt=0, description="each byte received extends body_timeout_s by 1/this: slow but steady uploads pass"
    )
    max_prompt_chars: int = Field(
        262_144, ge=1, description="characters of all text parts and stop strings, before the template and tokenizer"
    )
    max_images: int = Field(4, ge=0, description="images in one request")
    max_image_bytes: int = Field(16 * 1024**2, gt=0, description="encoded size of one image (after base64)")
    max_image_pixels: int = Field(25_000_000, gt=0, description="width*height of one image, read from its header")
    max_image_aspect_ratio: float = Field(
        20.0, ge=1.0, description="longer side / shorter side of one image, from its header (processors scale the "
        "shorter side up: a 40000x1 image would cost as much as a 40000x336 one)",
    )  # fmt: skip
    max_resized_image_pixels: int = Field(
        4 * 1024**2, gt=0, description="one image's pixels after the model's processor resizes it, from its header"
    )
    max_request_pixels: int = Field(
        8 * 1024**2, gt=0, description="pixels of all images of a request after the processor's resize, summed"
    )
    max_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none (capped by context)")
    max_prompt_tokens: int = Field(8192, ge=1, description="after the chat template, image tokens included")
    max_context_tokens: int | None = Field(
        None, ge=2, description="prompt + completion; None = the target's max_position_embeddings"
    )
    max_stop: int = Field(4, ge=0, description="stop strings in one request (OpenAI allows 4)")
    max_active_requests: int | None = Field(
        None, ge=1, description="requests one replica holds at once (reading, preparing, waiting, decoding); "
        "beyond it 429 + Retry-After; None = 3/4 of deployment.max_ongoing_requests (at least max_batch_size)",
    )  # fmt: skip
    prep_threads: int = Field(
        4, ge=1, description="threads that prepare requests (image decode, chat template, tokenizer) per replica"
    )


class ImageFetchConfig(StrictModel):
    """http(s) image URLs: refused unless the host is allow-listed, and never to a non-public address.

    An allowed host is still resolved and every address it resolves to must be
    globally routable (no private, loopback, link-local, CGNAT, multicast or
    cloud-metadata address); the connection goes to the address that was
    checked (no DNS rebinding), redirects are not followed, proxies from the
    environment are ignored.
    """

    allowed_hosts: tuple[str, ...] = Field(
        (), description="exact host names, or '*.example.com' for its subdomains; empty = only data: URLs"
    )
    allowed_ports: tuple[int, ...] = Field((80, 443), description="ports an image URL may name")
    timeout_s: float = Field(10.0, gt=0, description="whole fetch: DNS, connect, headers and body")
    max_bytes: int = Field(16 * 1024**2, gt=0, description="response body size")

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for h in v:
            h = h.strip().lower().rstrip(".").strip("[]")
            bare = h[2:] if h.startswith("*.") else h
            if not bare or "*" in bare or "/" in bare or ("://" in h) or (":" in bare and not _is_ip(bare)):
                raise ValueError(f"allowed host {h!r} must be a host name, an IP or '*.domain' (no scheme, path, port)")
            out.append(h)
        return tuple(out)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class BatchingConfig(StrictModel):
    """How a replica's engine loop batches concurrent requests (`actors.engine_loop.EngineLoop`)."""

    mode: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: waiting requests join the running batch at the next round; static: "
        "a batch decodes to its end before the next one starts (for comparison)",
    )  # fmt: skip
    max_batch_size: int = Field(16, ge=1, description="the most requests decoding at once; 1 = no batching")
    prefill_passes: int = Field(
        2, ge=1, description="continuous: prefills per engine step; requests that arrive during one are prefilled "
        "in the same step, before its round (their first token a round sooner; decoding rows wait for it too)",
    )  # fmt: skip
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, description="static mode: how long an idle engine waits for a batch to fill (continuous: unused, "
        "requests join at the next round)",
    )  # fmt: skip


class DraftUpdate(StrictModel):
    """A replica's ``user_config`` (Ray Serve's `reconfigure`): which draft to decode with. Changing only it in a
    ``serve deploy`` file or a RayService updates running replicas without restarting them."""

    draft: str | None = Field(None, description="draft folder or s3:// prefix (EagleDraft.save_pretrained); None "
                              "= keep the draft the replica has")  # fmt: skip
    draft_version: str | None = Field(None, description="the name responses report in usage.draft_version; None = "
                                      "the draft's path")  # fmt: skip
    draft_store: str | None = Field(
        None, description="a draft store (specvlm.draft_store: local folder or s3:// prefix, e.g. a caption job's "
        "<output>/_drafts) whose promoted versions the replica swaps in as they appear; None = follow none",
    )  # fmt: skip
    poll_s: float = Field(30.0, gt=0, description="draft_store: how often the replica looks for a promoted version")


class DeploymentConfig(StrictModel):
    """Serve deployment options (`Deployment.options`)."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count; ignored when autoscaling_config is set")
    autoscaling_config: dict | None = Field(
        None, description="Serve AutoscalingConfig (min_replicas, max_replicas, target_ongoing_requests, ...)"
    )
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; keep >= batching.max_batch_size")
    max_queued_requests: int = Field(
        64, ge=-1, description="requests each Serve proxy holds while every replica slot is taken; beyond it "
        "Serve answers 429 + Retry-After itself; -1 = unbounded (an overload then queues without end)",
    )  # fmt: skip
    retry_after_s: int = Field(2, ge=0, description="Retry-After of a 429, from Serve's queue or a replica")
    ray_actor_options: dict = Field(default_factory=lambda: {"num_cpus": 1}, description="e.g. {num_gpus: 1}")
    user_config: DraftUpdate | None = Field(
        None, description="a draft swapped into every replica once it is up (SpecVLMServer.reconfigure); a later "
        "deploy that changes only this swaps drafts without restarting replicas",
    )  # fmt: skip

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling(cls, v: dict | None) -> dict | None:
        if v is not None:
            from ray.serve.config import AutoscalingConfig

            AutoscalingConfig.model_validate(v)  # Serve's own validation, reported with our field name
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    def options(self) -> dict:
        """Keyword arguments for ``Deployment.options``."""
        opts = dict(
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            backpressure_config={"status_code": 429, "retry_after_s": self.retry_after_s},  # Serve's default: 503
            ray_actor_options=dict(self.ray_actor_options),
        )
        if self.user_config is not None:
            opts["user_config"] = self.user_config.model_dump()
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ServeAppConfig(StrictModel):
    """The OpenAI-compatible endpoint. Defaults serve the demo model on CPU, on loopback, without an API key."""

    model: ModelConfig = Field(ModelConfig(), description="target and draft each replica loads")
    engine: EngineConfig = Field(EngineConfig(tree=CPU_TREE), description="how each replica decodes")
    served_model_name: str | None = Field(
        None, description="the `model` requests must name; None = 'specvlm-demo' for the demo, else the target's"
    )
    limits: ServeLimits = Field(ServeLimits(), description="what one request may cost; over a limit is a 4xx")
    image_fetch: ImageFetchConfig = Field(
        ImageFetchConfig(), description="http(s) image URLs (data: URLs always work); refused unless allow-listed"
    )
    auth: Literal["none", "env", "file"] = Field(
        "none", description="where the API key comes from: 'env' (api_key_env), 'file' (api_key_file), or 'none' "
        "(no key: loopback demos only); a configured source that is missing or empty stops the replica",
    )  # fmt: skip
    api_key_env: str = Field("SPECVLM_API_KEY", min_length=1, description="env var holding the key (auth: env)")
    api_key_file: str | None = Field(None, description="file holding the key, e.g. a mounted secret (auth: file)")
    batching: BatchingConfig = Field(BatchingConfig(), description="how concurrent requests are batched")
    deployment: DeploymentConfig = Field(DeploymentConfig(), description="Serve deployment options (replicas, queues)")

    @model_validator(mode="after")
    def _key_source(self):
        if self.auth == "file" and not self.api_key_file:
            raise ValueError("auth: file needs api_key_file (the path of the file holding the key)")
        return self

    @model_validator(mode="after")
    def _batches_can_fill(self):
        b = self.batching.max_batch_size
        if self.deployment.max_ongoing_requests < b:
            raise ValueError(
                f"deployment.max_ongoing_requests={self.deployment.max_ongoing_requests} < "
                f"batching.max_batch_size={b}: batches could never fill; raise max_ongoing_requests"
            )
        active = self.limits.max_active_requests
        if active is not None and not b <= active <= self.deployment.max_ongoing_requests:
            raise ValueError(
                f"limits.max_active_requests={active} must lie between batching.max_batch_size={b} (or batches "
                f"never fill) and deployment.max_ongoing_requests={self.deployment.max_ongoing_requests} (or Serve "
                "queues the requests before a replica can refuse them)"
            )
        return self

    def max_active_requests(self) -> int:
        """`ServeLimits.max_active_requests`, or 3/4 of the replica's slots: the other quarter answers 429 at once
        instead of leaving the overflow in Serve's queue."""
        if self.limits.max_active_requests is not None:
            return self.limits.max_active_requests
        slots = self.deployment.max_ongoing_requests
        return max(self.batching.max_batch_size, slots - slots // 4)

    def model_name(self, info: dict) -> str:
        """The served name: the config's, else ``load_engine``'s target name (a path's last part)."""
        if self.served_model_name:
            return self.served_model_name
        name = str(info.get("model") or "model")
        return name if name.startswith("specvlm-") else Path(name.rstrip("/")).name or name


IMPORT_PATH = "actors.serving:build_app"  # the application builder a Serve config file names


class ServeFile(StrictModel):
    """What ``specvlm serve`` runs: one application of a Serve config file (or a bare `ServeAppConfig` YAML, or
    none) with its HTTP options. `serve_config` writes it back as a Serve config file."""

    app: ServeAppConfig = Field(ServeAppConfig(), description="the application's args")
    name: str = Field("specvlm", min_length=1, description="application name")
    route_prefix: str = Field("/", description="HTTP route of the application")
    host: str = Field("127.0.0.1", description="http_options.host: loopback; 0.0.0.0 only behind TLS termination")
    port: int = Field(8000, ge=1, le=65535, description="http_options.port")
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="http_options.request_timeout_s: Serve's proxy answers 408 to a request (streamed "
        "or not) still running after it; None = no bound",
    )  # fmt: skip

    def http_options(self) -> dict:
        """``serve.start(http_options=...)``."""
        return {"host": self.host, "port": self.port, "request_timeout_s": self.request_timeout_s}

    def serve_config(self) -> dict:
        """This as a Ray Serve config file (what ``serve run`` and `load_serve_file` read), every default included."""
        app = {"name": self.name, "route_prefix": self.route_prefix, "import_path": IMPORT_PATH,
               "args": self.app.model_dump(mode="json")}  # fmt: skip
        return {"http_options": self.http_options(), "applications": [app]}


def load_serve_file(path: str | Path, app_name: str | None = None) -> ServeFile:
    """Read a Serve config file (``applications:`` with ``args``) or a bare `ServeAppConfig` YAML."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if "applications" not in data:
        return ServeFile(app=parse_config(data, ServeAppConfig, source=str(path)))
    apps = data["applications"] or []
    names = [a.get("name", "default") for a in apps if isinstance(a, dict)]
    chosen = [a for a in apps if isinstance(a, dict) and (app_name is None or a.get("name") == app_name)]
    if not chosen:
        raise ConfigError(f"{path}: no application {app_name!r} (found: {', '.join(names) or 'none'})")
    entry = chosen[0]
    http = data.get("http_options") or {}
    source = f"{path}: application {entry.get('name', 'default')!r} args"
    app = parse_config(entry.get("args") or {}, ServeAppConfig, source=source)
    given = {"name": entry.get("name"), "route_prefix": entry.get("route_prefix"), "host": http.get("host"),
             "port": http.get("port")}  # fmt: skip
    fields = {k: v for k, v in given.items() if v is not None}
    if "request_timeout_s" in http:  # null: no bound, as in Serve
        fields["request_timeout_s"] = http["request_timeout_s"]
    return parse_config({"app": app, **fields}, ServeFile, source=f"{path}: http_options / application")
