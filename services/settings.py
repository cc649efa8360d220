"""The application's settings: the `args` of the Serve config, validated once, shared by every service.

The same dictionary configures a local `liveserve serve` and a KubeRay RayService (see orchestration/),
so a value means the same thing everywhere. Unknown keys are refused by name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from liveserve.config import (DECODINGS, CacheConfig, CommentaryConfig, EngineConfig, PoolConfig, SchedulerConfig,
                              SessionConfig)
from liveserve.frame_format import RESIZE_MODES
from liveserve.model.registry import model_family
from liveserve.services.security.client_address import parse_networks


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# live: VideoLLM-online's layout (a vision tower, a connector, a Llama/Qwen2 LM), in live mode;
# qwen2_5_vl: Qwen2.5-VL (StreamingVLM's layout), qwen2_vl: Qwen2-VL (LiveCC's), in commentary mode: Decision
# writes what it says itself.
MODEL_FAMILIES = ("live", "qwen2_5_vl", "qwen2_vl")
# What one model of `models` may set for itself; the rest of the settings are the deployment's.
MODEL_OVERRIDES = ("threshold", "max_new_tokens", "cache_policy", "window_frames", "pool_mb", "max_lag_s",
                   "max_sessions_per_replica", "capacity_streams", "max_batch_size", "threads", "commentary_decoding",
                   "commentary_resize")
MODEL_KEYS = frozenset({"path", "reaction_path", "family", "perception", *MODEL_OVERRIDES})
# Streams one Decision replica of a bundled model serves within the 250 ms SLO, by device type: what such
# a model admits where the config records no figure of its own. From `liveserve loadtest --sweep` (2 fps,
# 99% of frames, a few queries a minute) on a 2-core CPU host shared with other work (docs/benchmarks.md):
# the default model met it at 64 streams and missed it at 128 (`serve --local`); tiny met it at 64, the
# sweep's top (`serve`, on Ray).
RECORDED_CAPACITY = {"tiny": {"cpu": 64}, "default": {"cpu": 64}}
# A model with no figure anywhere: admitting by KV memory alone let one CPU server take 229 sessions of
# the default model's size, far past what it serves; 16 streams are within the SLO for the models measured
# here, and an operator raises it by recording `capacity_streams`.
FALLBACK_CAPACITY_STREAMS = 16


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    model: str = "default"  # "default" (bundled), "tiny", or a checkpoint directory
    reaction_model: str = ""  # "" = the same checkpoint as Decision
    # Several models in one deployment: {name: {path, reaction_path, family, perception, and overrides of
    # MODEL_OVERRIDES}}; each gets its own Decision and Reaction pools (and a Perception pool, unless
    # `perception` names the model whose pool it shares). `Open.model` picks one by name; None: one model,
    # `model`, known by that name.
    models: dict | None = None
    default_model: str = ""  # the model of an Open that names none; "": the first of `models`
    threads: int = 1  # torch CPU threads per replica
    # Decision
    pool_mb: int | None = None  # KV pool per Decision replica; None: 90% of GPU memory left after weights, 1 GiB CPU
    max_lag_s: float = 2.0  # queued frames further behind their stream than this are dropped (reported)
    threshold: float | None = None  # default streaming threshold for sessions that set none
    max_new_tokens: int = 64
    cache_policy: str = "sink_window"
    window_frames: int = 64
    # Commentary models: how what they say is decoded when the Open does not say (config.DECODINGS):
    # "greedy" (reproducible) or "reference" (StreamingVLM's sampling: temperature 0.9, repetition penalty 1.05).
    commentary_decoding: str = "greedy"
    # Commentary models: how frames are sized when the Open does not say (frame_format.py): "smart" (the
    # reference's: aspect ratio kept under the checkpoint's pixel budget) or "square".
    commentary_resize: str = "smart"
    # Sessions one Decision replica admits before refusing new ones (RESOURCE_EXHAUSTED), so the admitted
    # keep their latency: None = `capacity_streams`, the streams one replica serves within the SLO as
    # measured on this deployment's hardware (`liveserve loadtest --sweep`); 0 = no limit but KV memory.
    max_sessions_per_replica: int | None = None
    # 0: not recorded here; a bundled model then admits its RECORDED_CAPACITY, any other
    # FALLBACK_CAPACITY_STREAMS (admission_limit), each replica logging which and why.
    capacity_streams: int = 0
    # Decision and Reaction engines
    attention: str = "auto"  # the attention kernel (EngineConfig.attention): auto, sdpa, flashinfer, ...
    cuda_graphs: bool = False  # CUDA graphs of the direct forward (EngineConfig.cuda_graphs; CUDA only)
    reaction_sync_frames: int = 1  # send Reaction unseen frames once this many have piled up
    reaction_nice: int = 10  # the Reaction engine thread's lower CPU priority (Linux nice) where cores are shared
    # Perception
    max_batch_size: int = 32  # frames per Perception call and per vision-tower batch
    # Gateway
    address: str = "0.0.0.0:50051"  # where each Gateway replica serves the public gRPC API
    tick_ms: float = 5.0  # a gateway collects frames this long (from the first) before one Perception call
    perception_calls: int = 4  # Perception calls a gateway keeps in flight; beyond, frames wait for fuller batches
    # A busy hop (a gateway's pushes to one replica, a replica's event batches to one gateway) sends at most
    # once per this; an idle one sends at once. Fewer, fuller messages under load, for <= this much latency.
    hop_ms: float = 10.0
    max_frame_bytes: int = 4 << 20
    max_frame_pixels: int = 4096 * 4096  # larger images are refused from their header, before decoding
    # A stream may send frames at up to this many times its declared fps (with a few seconds of burst);
    # frames beyond are dropped and reported, so one flooding client cannot crowd out its neighbours.
    ingress_factor: float = 2.0
    # An environment variable listing accepted API keys, comma-separated `tenant:key` (a bare key is a
    # tenant of its own); "": no keys, every session is tenant "anonymous".
    api_keys_env: str = ""
    # {tenant or "*": {sessions, frames_per_s, replies_per_min}} (services/security/tenants.py); Redis may override.
    tenant_quotas: dict | None = None
    # Failed key checks a minute per presented key (its first 8 characters) and per client address, beyond
    # which that key or address gets RESOURCE_EXHAUSTED instead of UNAUTHENTICATED; a valid key is always
    # admitted (docs/security.md, "Failed key checks"); 0: off.
    auth_failures_per_min: int = 10
    # Proxies (addresses or CIDR ranges) whose x-forwarded-for names the client: a call from one counts
    # failed keys against the address it forwards, or no address when it forwards none. Loopback: the
    # browser front and sidecars. Any other peer's own address is the client's.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    max_open_bytes: int = 64 << 10  # a first message (the Open) larger than this is refused before any key check
    # TLS on the public port (PEM files where the Gateway runs); "": plaintext. A client CA requires every
    # client to present a certificate it signed (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    call_timeout_s: float = 30.0  # an internal call that takes longer fails the session with UNAVAILABLE
    drain_timeout_s: float = 60.0  # Close waits this long for queued frames and replies to finish
    # Registry
    session_ttl_s: float = 30.0  # an open session's record expires this long after its last heartbeat
    closed_ttl_s: float = 600.0  # a closed session's record (and history) is kept this long
    heartbeat_s: float = 2.0

    def __post_init__(self) -> None:
        if min(self.threads, self.max_batch_size, self.reaction_sync_frames, self.perception_calls) < 1 \
                or self.window_frames < 2:
            raise ValueError("threads, max_batch_size, reaction_sync_frames and perception_calls must be >= 1, "
                             "window_frames >= 2")
        for name in ("call_timeout_s", "drain_timeout_s", "session_ttl_s", "closed_ttl_s", "heartbeat_s", "max_lag_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_frame_pixels < 1 or not self.ingress_factor >= 1:
            raise ValueError("max_frame_pixels must be >= 1 and ingress_factor >= 1")
        for name in ("tick_ms", "hop_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"address must be host:port, got {self.address!r}")
        if self.heartbeat_s >= self.session_ttl_s:
            raise ValueError("heartbeat_s must be shorter than session_ttl_s, or records expire between beats")
        if not 0 <= self.reaction_nice <= 19:
            raise ValueError(f"reaction_nice must be in [0, 19], got {self.reaction_nice}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file: mutual TLS is TLS first")
        if self.pool_mb is not None and self.pool_mb < 1:
            raise ValueError(f"pool_mb must be >= 1, got {self.pool_mb}")
        if self.max_sessions_per_replica is not None and self.max_sessions_per_replica < 0 \
                or self.capacity_streams < 0 or self.auth_failures_per_min < 0 or self.max_open_bytes < 1:
            raise ValueError("max_sessions_per_replica, capacity_streams and auth_failures_per_min must be >= 0, "
                             "max_open_bytes >= 1")
        if isinstance(self.trusted_proxies, str) or not all(isinstance(p, str) for p in self.trusted_proxies):
            raise ValueError(f"trusted_proxies must be a list of addresses or CIDR ranges, got {self.trusted_proxies!r}")
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))  # YAML gives a list
        parse_networks(self.trusted_proxies)
        if self.tenant_quotas:
            from liveserve.services.security.tenants import quotas_from_setting  # brings torch: only when quotas are set

            quotas_from_setting(self.tenant_quotas)
        self.session_defaults()  # validates threshold, cache policy and lengths
        self.engine_config()  # validates the attention kernel's name
        if self.models is not None or self.default_model:
            self.served_models()  # validates every model's entry

    @classmethod
    def from_dict(cls, values: dict | None) -> ServiceSettings:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def served_models(self) -> list[ServedModel]:
        """The models this deployment serves, the default first, each with its own settings (these, with its
        path and overrides)."""
        if self.models is None:
            if self.default_model and self.default_model != self.model:
                raise ValueError(f"default_model {self.default_model!r} is not served; this deployment serves "
                                 f"{self.model!r} (set `models` to serve several)")
            return [ServedModel(self.model, self, model_family(self.model), self.model,
                                *_pools(self.model, self.model, True, True))]
        if not isinstance(self.models, dict) or not self.models:
            raise ValueError("models must map model names to their settings ({name: {path: ...}})")
        if self.model != "default" or self.reaction_model:
            raise ValueError("set either model (and reaction_model) for one model, or models for several, not both; "
                             "with models, each entry names its path and reaction_path")
        default = self.default_model or next(iter(self.models))
        if default not in self.models:
            raise ValueError(f"default_model {default!r} is not one of models: {', '.join(self.models)}")
        served = []
        for name, entry in self.models.items():
            if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
                raise ValueError(f"model name {name!r}: 1-63 letters, digits, '.', '_' or '-', starting with a "
                                 f"letter or digit")
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
                raise ValueError(f"models.{name} needs a path (a checkpoint directory, 'default' or 'tiny')")
            unknown = sorted(set(entry) - MODEL_KEYS)
            if unknown:
                raise ValueError(f"models.{name}: unknown key(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(MODEL_KEYS))}")
            found = model_family(entry["path"], unknown=None)
            family = entry.get("family") or found or MODEL_FAMILIES[0]
            if family not in MODEL_FAMILIES:
                raise ValueError(f"models.{name}: family {family!r} is not served; known: {', '.join(MODEL_FAMILIES)}")
            if found is not None and family != found:
                raise ValueError(f"models.{name}: family {family!r}, but {entry['path']} holds a {found!r} model")
            shares = entry.get("perception", name)
            if shares not in self.models or self.models[shares].get("perception", shares) != shares:
                raise ValueError(f"models.{name}: perception must name a model of `models` that has its own "
                                 f"Perception pool, got {shares!r}")
            if shares != name and (self.models[shares].get("family") or model_family(self.models[shares]["path"])) \
                    != family:  # the entry named is checked in its own turn
                raise ValueError(f"models.{name}: perception names {shares!r}, a model of another family; a "
                                 f"Perception pool serves one family's frames")
            overrides = {key: entry[key] for key in MODEL_OVERRIDES if key in entry}
            try:
                own = dataclasses.replace(self, model=entry["path"], reaction_model=entry.get("reaction_path", ""),
                                          models=None, default_model="", **overrides)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"models.{name}: {exc}") from None
            served.append(ServedModel(name, own, family, shares,
                                      *_pools(name, shares, name == default, shares == default)))
        served.sort(key=lambda model: model.name != default)  # stable: the default first, then as listed
        return served

    def session_defaults(self) -> SessionConfig:
        cache = CacheConfig(policy=self.cache_policy, window_frames=self.window_frames,
                            evict_frames=min(CacheConfig().evict_frames, self.window_frames))
        extra = {} if self.threshold is None else {"threshold": self.threshold}
        if self.commentary_decoding not in DECODINGS:
            raise ValueError(f"commentary_decoding must be one of {', '.join(DECODINGS)}, "
                             f"got {self.commentary_decoding!r}")
        penalty = CommentaryConfig().repetition_penalty
        if self.commentary_decoding != "greedy" and model_family(self.model) != "live":
            decoding = DECODINGS[self.commentary_decoding]
            extra.update(temperature=decoding.temperature, top_p=decoding.top_p)
            penalty = decoding.repetition_penalty
        if self.commentary_resize not in RESIZE_MODES:
            raise ValueError(f"commentary_resize must be one of {', '.join(RESIZE_MODES)}, "
                             f"got {self.commentary_resize!r}")
        commentary = CommentaryConfig(repetition_penalty=penalty, resize=self.commentary_resize)
        return SessionConfig(commentary=commentary, max_new_tokens=self.max_new_tokens, cache=cache, **extra)

    def sessions_per_replica(self) -> int | None:
        """The most sessions one Decision replica admits by these settings alone (None: they set no figure;
        admission_limit says what a replica then admits)."""
        limit = self.capacity_streams if self.max_sessions_per_replica is None else self.max_sessions_per_replica
        return limit or None

    def admission_limit(self, device_type: str) -> AdmissionLimit:
        """What one Decision replica of this model on `device_type` ("cpu", "cuda") admits, and why: the
        settings' figure, else the one recorded for a bundled model, else a conservative fallback; never
        KV memory alone unless `max_sessions_per_replica: 0` asks for it."""
        if self.max_sessions_per_replica == 0:
            return AdmissionLimit(None, "max_sessions_per_replica is 0: as many as the KV pool holds")
        if self.max_sessions_per_replica is not None:
            return AdmissionLimit(self.max_sessions_per_replica,
                                  f"max_sessions_per_replica ({self.max_sessions_per_replica})")
        if self.capacity_streams:
            return AdmissionLimit(self.capacity_streams, f"capacity_streams ({self.capacity_streams}), the "
                                                         f"deployment's measured capacity")
        recorded = RECORDED_CAPACITY.get(self.model, {}).get(device_type)
        if recorded:
            return AdmissionLimit(recorded, f"the capacity recorded for the bundled {self.model!r} model on "
                                            f"{device_type} ({recorded} streams; set capacity_streams to this "
                                            f"host's own)")
        return AdmissionLimit(FALLBACK_CAPACITY_STREAMS,
                              f"no capacity figure for this model on {device_type}, so a conservative "
                              f"{FALLBACK_CAPACITY_STREAMS}; measure it with `liveserve loadtest --sweep` (or "
                              f"`liveserve bench capacity`) and set capacity_streams")

    def pool(self) -> PoolConfig:
        return PoolConfig(budget_bytes=self.pool_mb << 20 if self.pool_mb else None)

    def engine_config(self) -> EngineConfig:
        """The Decision engine: its KV pool, and frames dropped once they lag `max_lag_s` behind."""
        return EngineConfig(pool=self.pool(), scheduler=SchedulerConfig(max_lag_s=self.max_lag_s),
                            attention=self.attention, cuda_graphs=self.cuda_graphs)


@dataclass(frozen=True, slots=True)
class AdmissionLimit:
    """The most sessions a Decision replica admits (None: as many as its KV pool holds), and why."""

    sessions: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model of a deployment: the name clients pick it by (Open.model), its own settings (`model` its
    checkpoint), its family, the model whose Perception pool it uses (itself, or another with the same
    vision tower), and the Serve deployments of its pools: "Perception", "Decision", "Reaction" for the
    default model (a one-model deployment's names), "<pool>-<name>" for the others."""

    name: str
    settings: ServiceSettings
    family: str
    perception_of: str
    perception_pool: str
    decision_pool: str
    reaction_pool: str
    is_default: bool


def _pools(name: str, perception_of: str, default: bool, perception_default: bool) -> tuple[str, str, str, bool]:
    """Its pools' deployment names, and whether it is the default model."""
    suffix = "" if default else f"-{name}"
    return ("Perception" if perception_default else f"Perception-{perception_of}", f"Decision{suffix}",
            f"Reaction{suffix}", default)
