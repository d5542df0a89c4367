from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_LBFGS: _ClassVar[Optimizer]
    OPTIMIZER_ADAM: _ClassVar[Optimizer]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_ITERATIONS_DONE: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_NON_FINITE_COST: _ClassVar[StopReason]
    STOP_REASON_CONVERGED: _ClassVar[StopReason]

class Preset(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRESET_UNSPECIFIED: _ClassVar[Preset]
    PRESET_SEED: _ClassVar[Preset]
    PRESET_CLASSIC: _ClassVar[Preset]

class Init(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INIT_UNSPECIFIED: _ClassVar[Init]
    INIT_NOISY_CONTENT: _ClassVar[Init]
    INIT_CONTENT: _ClassVar[Init]
    INIT_RANDOM: _ClassVar[Init]
    INIT_IMAGE: _ClassVar[Init]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
    POOLING_AVG: _ClassVar[Pooling]

class ColorControl(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLOR_CONTROL_UNSPECIFIED: _ClassVar[ColorControl]
    COLOR_CONTROL_NONE: _ClassVar[ColorControl]
    COLOR_CONTROL_LUMINANCE: _ClassVar[ColorControl]
    COLOR_CONTROL_MATCH_STYLE_COLORS: _ClassVar[ColorControl]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_BF16: _ClassVar[Precision]
    PRECISION_FP16: _ClassVar[Precision]
    PRECISION_AUTO: _ClassVar[Precision]

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_NONE: _ClassVar[Normalization]
    NORMALIZATION_TARGET: _ClassVar[Normalization]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_LBFGS: Optimizer
OPTIMIZER_ADAM: Optimizer
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_ITERATIONS_DONE: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_NON_FINITE_COST: StopReason
STOP_REASON_CONVERGED: StopReason
PRESET_UNSPECIFIED: Preset
PRESET_SEED: Preset
PRESET_CLASSIC: Preset
INIT_UNSPECIFIED: Init
INIT_NOISY_CONTENT: Init
INIT_CONTENT: Init
INIT_RANDOM: Init
INIT_IMAGE: Init
POOLING_UNSPECIFIED: Pooling
POOLING_MAX: Pooling
POOLING_AVG: Pooling
COLOR_CONTROL_UNSPECIFIED: ColorControl
COLOR_CONTROL_NONE: ColorControl
COLOR_CONTROL_LUMINANCE: ColorControl
COLOR_CONTROL_MATCH_STYLE_COLORS: ColorControl
PRECISION_UNSPECIFIED: Precision
PRECISION_FP32: Precision
PRECISION_BF16: Precision
PRECISION_FP16: Precision
PRECISION_AUTO: Precision
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_NONE: Normalization
NORMALIZATION_TARGET: Normalization
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class StyleImage(_message.Message):
    __slots__ = ("image", "blend_weight")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BLEND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    blend_weight: float
    def __init__(self, image: _Optional[bytes] = ..., blend_weight: _Optional[float] = ...) -> None: ...

class LayerWeight(_message.Message):
    __slots__ = ("layer", "weight")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    layer: str
    weight: float
    def __init__(self, layer: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class StylizeRequest(_message.Message):
    __slots__ = ("content_image", "style_image", "max_side_px", "iterations", "content_weight", "style_weight", "seed", "optimizer", "learning_rate", "noise_ratio", "progress_every", "styles", "style_scale", "preset", "init", "init_image", "content_layers", "style_layers", "pooling", "tv_weight", "color_control", "scales", "start_side_px", "precision", "preview_every", "preview_max_side_px", "convergence_tolerance", "lbfgs_history", "keep_content_alpha", "normalization", "pyramid_levels")
    CONTENT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STYLE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STYLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    NOISE_RATIO_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVERY_FIELD_NUMBER: _ClassVar[int]
    STYLES_FIELD_NUMBER: _ClassVar[int]
    STYLE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STYLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    COLOR_CONTROL_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    START_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_MAX_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    CONVERGENCE_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    LBFGS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    KEEP_CONTENT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    PYRAMID_LEVELS_FIELD_NUMBER: _ClassVar[int]
    content_image: bytes
    style_image: bytes
    max_side_px: int
    iterations: int
    content_weight: float
    style_weight: float
    seed: int
    optimizer: Optimizer
    learning_rate: float
    noise_ratio: float
    progress_every: int
    styles: _containers.RepeatedCompositeFieldContainer[StyleImage]
    style_scale: float
    preset: Preset
    init: Init
    init_image: bytes
    content_layers: _containers.RepeatedCompositeFieldContainer[LayerWeight]
    style_layers: _containers.RepeatedCompositeFieldContainer[LayerWeight]
    pooling: Pooling
    tv_weight: float
    color_control: ColorControl
    scales: int
    start_side_px: int
    precision: Precision
    preview_every: int
    preview_max_side_px: int
    convergence_tolerance: float
    lbfgs_history: int
    keep_content_alpha: bool
    normalization: Normalization
    pyramid_levels: int
    def __init__(self, content_image: _Optional[bytes] = ..., style_image: _Optional[bytes] = ..., max_side_px: _Optional[int] = ..., iterations: _Optional[int] = ..., content_weight: _Optional[float] = ..., style_weight: _Optional[float] = ..., seed: _Optional[int] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ..., learning_rate: _Optional[float] = ..., noise_ratio: _Optional[float] = ..., progress_every: _Optional[int] = ..., styles: _Optional[_Iterable[_Union[StyleImage, _Mapping]]] = ..., style_scale: _Optional[float] = ..., preset: _Optional[_Union[Preset, str]] = ..., init: _Optional[_Union[Init, str]] = ..., init_image: _Optional[bytes] = ..., content_layers: _Optional[_Iterable[_Union[LayerWeight, _Mapping]]] = ..., style_layers: _Optional[_Iterable[_Union[LayerWeight, _Mapping]]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., tv_weight: _Optional[float] = ..., color_control: _Optional[_Union[ColorControl, str]] = ..., scales: _Optional[int] = ..., start_side_px: _Optional[int] = ..., precision: _Optional[_Union[Precision, str]] = ..., preview_every: _Optional[int] = ..., preview_max_side_px: _Optional[int] = ..., convergence_tolerance: _Optional[float] = ..., lbfgs_history: _Optional[int] = ..., keep_content_alpha: _Optional[bool] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., pyramid_levels: _Optional[int] = ...) -> None: ...

class StylizeResponse(_message.Message):
    __slots__ = ("accepted", "progress", "result", "image_chunk", "heartbeat")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    accepted: JobAccepted
    progress: Progress
    result: Result
    image_chunk: ImageChunk
    heartbeat: Heartbeat
    def __init__(self, accepted: _Optional[_Union[JobAccepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., image_chunk: _Optional[_Union[ImageChunk, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("queue_position", "waited_ms", "elapsed_ms", "iterations")
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    WAITED_MS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    queue_position: int
    waited_ms: float
    elapsed_ms: float
    iterations: int
    def __init__(self, queue_position: _Optional[int] = ..., waited_ms: _Optional[float] = ..., elapsed_ms: _Optional[float] = ..., iterations: _Optional[int] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("data", "offset", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class JobAccepted(_message.Message):
    __slots__ = ("job_id", "queue_position", "replica", "memory_bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    queue_position: int
    replica: str
    memory_bytes: int
    def __init__(self, job_id: _Optional[str] = ..., queue_position: _Optional[int] = ..., replica: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Costs(_message.Message):
    __slots__ = ("content", "style", "total", "total_variation")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VARIATION_FIELD_NUMBER: _ClassVar[int]
    content: float
    style: float
    total: float
    total_variation: float
    def __init__(self, content: _Optional[float] = ..., style: _Optional[float] = ..., total: _Optional[float] = ..., total_variation: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("iteration", "costs", "elapsed_ms", "preview_png", "scale", "width_px", "height_px", "scales", "remaining_ms")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    costs: Costs
    elapsed_ms: float
    preview_png: bytes
    scale: int
    width_px: int
    height_px: int
    scales: int
    remaining_ms: float
    def __init__(self, iteration: _Optional[int] = ..., costs: _Optional[_Union[Costs, _Mapping]] = ..., elapsed_ms: _Optional[float] = ..., preview_png: _Optional[bytes] = ..., scale: _Optional[int] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., scales: _Optional[int] = ..., remaining_ms: _Optional[float] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("image_png", "width_px", "height_px", "costs", "iterations", "best_iteration", "stop_reason", "elapsed_ms", "precision")
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    BEST_ITERATION_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    image_png: bytes
    width_px: int
    height_px: int
    costs: Costs
    iterations: int
    best_iteration: int
    stop_reason: StopReason
    elapsed_ms: float
    precision: str
    def __init__(self, image_png: _Optional[bytes] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., costs: _Optional[_Union[Costs, _Mapping]] = ..., iterations: _Optional[int] = ..., best_iteration: _Optional[int] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., elapsed_ms: _Optional[float] = ..., precision: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("output_layers", "input_contract_json", "weights_source", "weights_sha256", "weights_input_contract_json", "execution_providers", "replica_device", "pooling", "versions", "min_side_px", "max_side_px", "precision", "supported_precisions", "max_iterations", "max_running_jobs", "max_queued_jobs", "max_batch_size", "precision_reason", "intra_op_threads", "threads_source", "heartbeat_s", "replica", "memory_budget_bytes", "memory_budget_source", "largest_output_side_px")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OUTPUT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_CONTRACT_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_INPUT_CONTRACT_JSON_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_DEVICE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    THREADS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LARGEST_OUTPUT_SIDE_PX_FIELD_NUMBER: _ClassVar[int]
    output_layers: _containers.RepeatedScalarFieldContainer[str]
    input_contract_json: str
    weights_source: str
    weights_sha256: str
    weights_input_contract_json: str
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    replica_device: str
    pooling: str
    versions: _containers.ScalarMap[str, str]
    min_side_px: int
    max_side_px: int
    precision: str
    supported_precisions: _containers.RepeatedScalarFieldContainer[str]
    max_iterations: int
    max_running_jobs: int
    max_queued_jobs: int
    max_batch_size: int
    precision_reason: str
    intra_op_threads: int
    threads_source: str
    heartbeat_s: float
    replica: str
    memory_budget_bytes: int
    memory_budget_source: str
    largest_output_side_px: int
    def __init__(self, output_layers: _Optional[_Iterable[str]] = ..., input_contract_json: _Optional[str] = ..., weights_source: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., weights_input_contract_json: _Optional[str] = ..., execution_providers: _Optional[_Iterable[str]] = ..., replica_device: _Optional[str] = ..., pooling: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., min_side_px: _Optional[int] = ..., max_side_px: _Optional[int] = ..., precision: _Optional[str] = ..., supported_precisions: _Optional[_Iterable[str]] = ..., max_iterations: _Optional[int] = ..., max_running_jobs: _Optional[int] = ..., max_queued_jobs: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., precision_reason: _Optional[str] = ..., intra_op_threads: _Optional[int] = ..., threads_source: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., replica: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., memory_budget_source: _Optional[str] = ..., largest_output_side_px: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("request", "request_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request: StylizeRequest
    request_id: str
    def __init__(self, request: _Optional[_Union[StylizeRequest, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id", "queue_position", "state", "created", "replica")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    queue_position: int
    state: JobState
    created: bool
    replica: str
    def __init__(self, job_id: _Optional[str] = ..., queue_position: _Optional[int] = ..., state: _Optional[_Union[JobState, str]] = ..., created: _Optional[bool] = ..., replica: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after: int
    def __init__(self, job_id: _Optional[str] = ..., after: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("number", "response", "state", "error_code", "error_message")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    number: int
    response: StylizeResponse
    state: JobState
    error_code: int
    error_message: str
    def __init__(self, number: _Optional[int] = ..., response: _Optional[_Union[StylizeResponse, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResultRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "request_id", "state", "queue_position", "iterations", "max_iterations", "scale", "scales", "costs", "submitted_unix_s", "started_unix_s", "finished_unix_s", "expires_unix_s", "error_code", "error_message", "events", "result_width_px", "result_height_px", "result_bytes", "runs", "replica")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    RESULT_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    state: JobState
    queue_position: int
    iterations: int
    max_iterations: int
    scale: int
    scales: int
    costs: Costs
    submitted_unix_s: float
    started_unix_s: float
    finished_unix_s: float
    expires_unix_s: float
    error_code: int
    error_message: str
    events: int
    result_width_px: int
    result_height_px: int
    result_bytes: int
    runs: int
    replica: str
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., queue_position: _Optional[int] = ..., iterations: _Optional[int] = ..., max_iterations: _Optional[int] = ..., scale: _Optional[int] = ..., scales: _Optional[int] = ..., costs: _Optional[_Union[Costs, _Mapping]] = ..., submitted_unix_s: _Optional[float] = ..., started_unix_s: _Optional[float] = ..., finished_unix_s: _Optional[float] = ..., expires_unix_s: _Optional[float] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., events: _Optional[int] = ..., result_width_px: _Optional[int] = ..., result_height_px: _Optional[int] = ..., result_bytes: _Optional[int] = ..., runs: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: JobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
