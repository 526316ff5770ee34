from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActivateRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node_id", "address", "name")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    name: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("accepted", "coordinator", "coordinator_address", "epoch", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    coordinator: str
    coordinator_address: str
    epoch: int
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., coordinator: _Optional[str] = ..., coordinator_address: _Optional[str] = ..., epoch: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class RingWakeRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class RingWakeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("sender",)
    SENDER_FIELD_NUMBER: _ClassVar[int]
    sender: str
    def __init__(self, sender: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("node_id", "epoch", "down")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    down: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., down: _Optional[_Iterable[str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("platform", "chip", "cpu_count", "memory_total", "memory_available", "memory_budget", "mlx_version", "mlx_device", "blas", "mlx_lm_version", "matmul_gflops")
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MLX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MLX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLAS_FIELD_NUMBER: _ClassVar[int]
    MLX_LM_VERSION_FIELD_NUMBER: _ClassVar[int]
    MATMUL_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    platform: str
    chip: str
    cpu_count: int
    memory_total: int
    memory_available: int
    memory_budget: int
    mlx_version: str
    mlx_device: str
    blas: str
    mlx_lm_version: str
    matmul_gflops: float
    def __init__(self, platform: _Optional[str] = ..., chip: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_total: _Optional[int] = ..., memory_available: _Optional[int] = ..., memory_budget: _Optional[int] = ..., mlx_version: _Optional[str] = ..., mlx_device: _Optional[str] = ..., blas: _Optional[str] = ..., mlx_lm_version: _Optional[str] = ..., matmul_gflops: _Optional[float] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("model", "start_layer", "end_layer", "n_layers", "epoch", "dtype", "form", "weight_bytes", "context_length", "load_seconds", "ring", "prompt_cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    start_layer: int
    end_layer: int
    n_layers: int
    epoch: int
    dtype: str
    form: str
    weight_bytes: int
    context_length: int
    load_seconds: float
    ring: RingWorker
    prompt_cache: PromptCache
    def __init__(self, model: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., n_layers: _Optional[int] = ..., epoch: _Optional[int] = ..., dtype: _Optional[str] = ..., form: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., context_length: _Optional[int] = ..., load_seconds: _Optional[float] = ..., ring: _Optional[_Union[RingWorker, _Mapping]] = ..., prompt_cache: _Optional[_Union[PromptCache, _Mapping]] = ...) -> None: ...

class PromptCache(_message.Message):
    __slots__ = ("bytes", "max_bytes", "entries", "lookups", "hits", "tokens_reused")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    max_bytes: int
    entries: int
    lookups: int
    hits: int
    tokens_reused: int
    def __init__(self, bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., entries: _Optional[int] = ..., lookups: _Optional[int] = ..., hits: _Optional[int] = ..., tokens_reused: _Optional[int] = ...) -> None: ...

class RingWorker(_message.Message):
    __slots__ = ("parallel", "rank", "size", "state", "pid", "error", "formed_s", "rss_bytes", "mlx_active_bytes")
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FORMED_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MLX_ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    parallel: str
    rank: int
    size: int
    state: str
    pid: int
    error: str
    formed_s: float
    rss_bytes: int
    mlx_active_bytes: int
    def __init__(self, parallel: _Optional[str] = ..., rank: _Optional[int] = ..., size: _Optional[int] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., error: _Optional[str] = ..., formed_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., mlx_active_bytes: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "version", "address", "capabilities", "shard", "plan", "pid", "uptime_s", "active_requests", "mlx_active_bytes", "rss_bytes", "mlx_peak_bytes", "advertising", "faults_allowed", "auth_required", "faults", "tls", "recoveries", "ring_port", "protocol_version", "coordinator", "api_port", "accepted_epoch", "data_port", "insecure", "loading_epoch", "loading_model", "mlx_cache_bytes", "draining_epochs", "staged_epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MLX_ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MLX_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADVERTISING_FIELD_NUMBER: _ClassVar[int]
    FAULTS_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    RECOVERIES_FIELD_NUMBER: _ClassVar[int]
    RING_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    API_PORT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    INSECURE_FIELD_NUMBER: _ClassVar[int]
    LOADING_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOADING_MODEL_FIELD_NUMBER: _ClassVar[int]
    MLX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STAGED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    version: str
    address: str
    capabilities: Capabilities
    shard: ShardInfo
    plan: Plan
    pid: int
    uptime_s: float
    active_requests: int
    mlx_active_bytes: int
    rss_bytes: int
    mlx_peak_bytes: int
    advertising: bool
    faults_allowed: bool
    auth_required: bool
    faults: _containers.RepeatedCompositeFieldContainer[ActiveFault]
    tls: bool
    recoveries: _containers.RepeatedCompositeFieldContainer[Recovery]
    ring_port: int
    protocol_version: int
    coordinator: str
    api_port: int
    accepted_epoch: int
    data_port: int
    insecure: bool
    loading_epoch: int
    loading_model: str
    mlx_cache_bytes: int
    draining_epochs: _containers.RepeatedScalarFieldContainer[int]
    staged_epoch: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., pid: _Optional[int] = ..., uptime_s: _Optional[float] = ..., active_requests: _Optional[int] = ..., mlx_active_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., mlx_peak_bytes: _Optional[int] = ..., advertising: _Optional[bool] = ..., faults_allowed: _Optional[bool] = ..., auth_required: _Optional[bool] = ..., faults: _Optional[_Iterable[_Union[ActiveFault, _Mapping]]] = ..., tls: _Optional[bool] = ..., recoveries: _Optional[_Iterable[_Union[Recovery, _Mapping]]] = ..., ring_port: _Optional[int] = ..., protocol_version: _Optional[int] = ..., coordinator: _Optional[str] = ..., api_port: _Optional[int] = ..., accepted_epoch: _Optional[int] = ..., data_port: _Optional[int] = ..., insecure: _Optional[bool] = ..., loading_epoch: _Optional[int] = ..., loading_model: _Optional[str] = ..., mlx_cache_bytes: _Optional[int] = ..., draining_epochs: _Optional[_Iterable[int]] = ..., staged_epoch: _Optional[int] = ...) -> None: ...

class Recovery(_message.Message):
    __slots__ = ("from_epoch", "to_epoch", "lost", "detect_s", "replan_s", "reload_s", "first_token_s", "error", "at_unix", "resumed_requests", "backend", "coordinator", "noticed_by", "joined")
    FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TO_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    DETECT_S_FIELD_NUMBER: _ClassVar[int]
    REPLAN_S_FIELD_NUMBER: _ClassVar[int]
    RELOAD_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    RESUMED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    NOTICED_BY_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    from_epoch: int
    to_epoch: int
    lost: _containers.RepeatedScalarFieldContainer[str]
    detect_s: float
    replan_s: float
    reload_s: float
    first_token_s: float
    error: str
    at_unix: float
    resumed_requests: int
    backend: str
    coordinator: str
    noticed_by: str
    joined: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, from_epoch: _Optional[int] = ..., to_epoch: _Optional[int] = ..., lost: _Optional[_Iterable[str]] = ..., detect_s: _Optional[float] = ..., replan_s: _Optional[float] = ..., reload_s: _Optional[float] = ..., first_token_s: _Optional[float] = ..., error: _Optional[str] = ..., at_unix: _Optional[float] = ..., resumed_requests: _Optional[int] = ..., backend: _Optional[str] = ..., coordinator: _Optional[str] = ..., noticed_by: _Optional[str] = ..., joined: _Optional[_Iterable[str]] = ...) -> None: ...

class PlanShard(_message.Message):
    __slots__ = ("node_id", "address", "start_layer", "end_layer", "param_bytes", "kv_bytes", "name", "ring_port", "macs_per_token")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RING_PORT_FIELD_NUMBER: _ClassVar[int]
    MACS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    start_layer: int
    end_layer: int
    param_bytes: int
    kv_bytes: int
    name: str
    ring_port: int
    macs_per_token: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., param_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., name: _Optional[str] = ..., ring_port: _Optional[int] = ..., macs_per_token: _Optional[int] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("model", "epoch", "n_layers", "strategy", "shards", "context_length", "backend", "parallel", "auto_reform", "auto_rejoin", "rejoin_settle_s", "microbatches")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    AUTO_REFORM_FIELD_NUMBER: _ClassVar[int]
    AUTO_REJOIN_FIELD_NUMBER: _ClassVar[int]
    REJOIN_SETTLE_S_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    model: str
    epoch: int
    n_layers: int
    strategy: str
    shards: _containers.RepeatedCompositeFieldContainer[PlanShard]
    context_length: int
    backend: str
    parallel: str
    auto_reform: bool
    auto_rejoin: bool
    rejoin_settle_s: float
    microbatches: int
    def __init__(self, model: _Optional[str] = ..., epoch: _Optional[int] = ..., n_layers: _Optional[int] = ..., strategy: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[PlanShard, _Mapping]]] = ..., context_length: _Optional[int] = ..., backend: _Optional[str] = ..., parallel: _Optional[str] = ..., auto_reform: _Optional[bool] = ..., auto_rejoin: _Optional[bool] = ..., rejoin_settle_s: _Optional[float] = ..., microbatches: _Optional[int] = ...) -> None: ...

class ModelOptions(_message.Message):
    __slots__ = ("dtype", "layers")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    layers: int
    def __init__(self, dtype: _Optional[str] = ..., layers: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("plan", "options", "stage")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    options: ModelOptions
    stage: bool
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., options: _Optional[_Union[ModelOptions, _Mapping]] = ..., stage: _Optional[bool] = ...) -> None: ...

class LoadShardReply(_message.Message):
    __slots__ = ("shard", "staged")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    shard: ShardInfo
    staged: bool
    def __init__(self, shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., staged: _Optional[bool] = ...) -> None: ...

class UnloadShardRequest(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class UnloadShardReply(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ForwardFrame(_message.Message):
    __slots__ = ("request_id", "epoch", "position", "activation", "tokens", "release", "sample", "sampling", "compute_s", "sent_unix_ns", "sender", "batch", "prompt_ids", "group")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    position: int
    activation: Tensor
    tokens: TokenIds
    release: Release
    sample: bool
    sampling: SamplingParams
    compute_s: float
    sent_unix_ns: int
    sender: str
    batch: _containers.RepeatedCompositeFieldContainer[ForwardFrame]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    group: int
    def __init__(self, request_id: _Optional[str] = ..., epoch: _Optional[int] = ..., position: _Optional[int] = ..., activation: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., compute_s: _Optional[float] = ..., sent_unix_ns: _Optional[int] = ..., sender: _Optional[str] = ..., batch: _Optional[_Iterable[_Union[ForwardFrame, _Mapping]]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., group: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("request_id", "epoch", "code", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    code: str
    error: str
    def __init__(self, request_id: _Optional[str] = ..., epoch: _Optional[int] = ..., code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_ids", "chat", "max_tokens", "sampling", "ignore_eos", "timeout_s", "messages", "stop", "resume_ids", "resume_chars")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    RESUME_IDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_CHARS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    chat: bool
    max_tokens: int
    sampling: SamplingParams
    ignore_eos: bool
    timeout_s: float
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    stop: _containers.RepeatedScalarFieldContainer[str]
    resume_ids: _containers.RepeatedScalarFieldContainer[int]
    resume_chars: int
    def __init__(self, prompt: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., chat: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., ignore_eos: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., stop: _Optional[_Iterable[str]] = ..., resume_ids: _Optional[_Iterable[int]] = ..., resume_chars: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token_id", "text", "index", "latency_s", "compute_s", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    index: int
    latency_s: float
    compute_s: float
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., index: _Optional[int] = ..., latency_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., logprob: _Optional[float] = ...) -> None: ...

class GenerateDone(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "ttft_s", "total_s", "decode_tokens_per_s", "epoch", "tail_text")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TAIL_TEXT_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    decode_tokens_per_s: float
    epoch: int
    tail_text: str
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., total_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., epoch: _Optional[int] = ..., tail_text: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "token", "done")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: TokenEvent
    done: GenerateDone
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[_Union[TokenEvent, _Mapping]] = ..., done: _Optional[_Union[GenerateDone, _Mapping]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("name", "count", "p50_s", "p90_s", "p99_s", "mean_s", "max_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    P50_S_FIELD_NUMBER: _ClassVar[int]
    P90_S_FIELD_NUMBER: _ClassVar[int]
    P99_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_S_FIELD_NUMBER: _ClassVar[int]
    MAX_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    p50_s: float
    p90_s: float
    p99_s: float
    mean_s: float
    max_s: float
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., p50_s: _Optional[float] = ..., p90_s: _Optional[float] = ..., p99_s: _Optional[float] = ..., mean_s: _Optional[float] = ..., max_s: _Optional[float] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("hz",)
    HZ_FIELD_NUMBER: _ClassVar[int]
    hz: float
    def __init__(self, hz: _Optional[float] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("name", "buckets", "counts", "sum_s", "max_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_S_FIELD_NUMBER: _ClassVar[int]
    MAX_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    buckets: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum_s: float
    max_s: float
    def __init__(self, name: _Optional[str] = ..., buckets: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., sum_s: _Optional[float] = ..., max_s: _Optional[float] = ...) -> None: ...

class MetricsSnapshot(_message.Message):
    __slots__ = ("node_id", "time_unix", "interval_s", "state", "cpu_percent", "rss_bytes", "mlx_active_bytes", "memory_budget", "shard", "active_requests", "counters", "deltas", "busy_fraction", "microbatches")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MLX_ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    time_unix: float
    interval_s: float
    state: str
    cpu_percent: float
    rss_bytes: int
    mlx_active_bytes: int
    memory_budget: int
    shard: ShardInfo
    active_requests: int
    counters: _containers.ScalarMap[str, int]
    deltas: _containers.RepeatedCompositeFieldContainer[Histogram]
    busy_fraction: float
    microbatches: int
    def __init__(self, node_id: _Optional[str] = ..., time_unix: _Optional[float] = ..., interval_s: _Optional[float] = ..., state: _Optional[str] = ..., cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., mlx_active_bytes: _Optional[int] = ..., memory_budget: _Optional[int] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., active_requests: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., deltas: _Optional[_Iterable[_Union[Histogram, _Mapping]]] = ..., busy_fraction: _Optional[float] = ..., microbatches: _Optional[int] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("node_id", "requests_started", "requests_completed", "requests_failed", "tokens_generated", "frames_in", "frames_out", "bytes_in", "bytes_out", "frames_rejected", "latencies", "active_requests", "cpu_percent", "rss_bytes", "requests_retried", "recoveries", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_STARTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    LATENCIES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RETRIED_FIELD_NUMBER: _ClassVar[int]
    RECOVERIES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    requests_started: int
    requests_completed: int
    requests_failed: int
    tokens_generated: int
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    frames_rejected: int
    latencies: _containers.RepeatedCompositeFieldContainer[LatencySummary]
    active_requests: int
    cpu_percent: float
    rss_bytes: int
    requests_retried: int
    recoveries: int
    counters: _containers.ScalarMap[str, int]
    def __init__(self, node_id: _Optional[str] = ..., requests_started: _Optional[int] = ..., requests_completed: _Optional[int] = ..., requests_failed: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., frames_in: _Optional[int] = ..., frames_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., frames_rejected: _Optional[int] = ..., latencies: _Optional[_Iterable[_Union[LatencySummary, _Mapping]]] = ..., active_requests: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., requests_retried: _Optional[int] = ..., recoveries: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class FaultSpec(_message.Message):
    __slots__ = ("kind", "ms", "jitter_ms", "p", "factor", "duration_s", "seed", "kbps", "peers", "direction", "gib")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    JITTER_MS_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KBPS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    GIB_FIELD_NUMBER: _ClassVar[int]
    kind: str
    ms: float
    jitter_ms: float
    p: float
    factor: float
    duration_s: float
    seed: int
    kbps: float
    peers: _containers.RepeatedScalarFieldContainer[str]
    direction: str
    gib: float
    def __init__(self, kind: _Optional[str] = ..., ms: _Optional[float] = ..., jitter_ms: _Optional[float] = ..., p: _Optional[float] = ..., factor: _Optional[float] = ..., duration_s: _Optional[float] = ..., seed: _Optional[int] = ..., kbps: _Optional[float] = ..., peers: _Optional[_Iterable[str]] = ..., direction: _Optional[str] = ..., gib: _Optional[float] = ...) -> None: ...

class ActiveFault(_message.Message):
    __slots__ = ("id", "spec", "remaining_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: FaultSpec
    remaining_s: float
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[FaultSpec, _Mapping]] = ..., remaining_s: _Optional[float] = ...) -> None: ...

class FaultRequest(_message.Message):
    __slots__ = ("fault",)
    FAULT_FIELD_NUMBER: _ClassVar[int]
    fault: FaultSpec
    def __init__(self, fault: _Optional[_Union[FaultSpec, _Mapping]] = ...) -> None: ...

class HealRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class FaultReply(_message.Message):
    __slots__ = ("active",)
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    active: _containers.RepeatedCompositeFieldContainer[ActiveFault]
    def __init__(self, active: _Optional[_Iterable[_Union[ActiveFault, _Mapping]]] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ("stopping",)
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    stopping: bool
    def __init__(self, stopping: _Optional[bool] = ...) -> None: ...
