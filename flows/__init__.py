"""flows: a Prometheus-instrumented streaming dataflow for market data, on trio.

The public surface is re-exported here; the modules behind it are private.
A component (a source, stage or sink) needs nothing else: see
docs/writing-a-component.md.
"""

from ._actors import FunctionStage as FunctionStage
from ._actors import RunContext as RunContext
from ._actors import Sink as Sink
from ._actors import Source as Source
from ._actors import Stage as Stage
from ._actors import stage as stage
from ._budget import RateBudget as RateBudget
from ._change import ChangeDetector as ChangeDetector
from ._channels import Edge as Edge
from ._channels import Inbox as Inbox
from ._channels import Outbox as Outbox
from ._checkpoint import write_atomic as write_atomic
from ._flow import Flow as Flow
from ._flow import FlowError as FlowError
from ._flow import Routes as Routes
from ._flow import Stream as Stream
from ._flow import Supervision as Supervision
from ._http import HttpError as HttpError
from ._http import HttpSource as HttpSource
from ._http import Parsed as Parsed
from ._http import Request as Request
from ._http import parse_optional_float as parse_optional_float
from ._http import parse_price as parse_price
from ._limits import CircuitBreaker as CircuitBreaker
from ._limits import RateLimit as RateLimit
from ._log import DropLog as DropLog
from ._metrics import FAST_BUCKETS as FAST_BUCKETS
from ._metrics import LATENCY_BUCKETS as LATENCY_BUCKETS
from ._metrics import METRICS as METRICS
from ._metrics import SIZE_BUCKETS as SIZE_BUCKETS
from ._metrics import ComponentMetrics as ComponentMetrics
from ._metrics import MetricFamily as MetricFamily
from ._metrics import SlowThresholds as SlowThresholds
from ._metrics import declared_metrics as declared_metrics
from ._metrics import histogram_quantile as histogram_quantile
from ._progress import Progress as Progress
from ._records import Batch as Batch
from ._records import Candle as Candle
from ._records import Gap as Gap
from ._records import Tick as Tick
from ._records import Trade as Trade
from ._records import check_symbols as check_symbols
from ._records import check_tick as check_tick
from ._redact import add_secret as add_secret
from ._redact import redact as redact
from ._registry import Component as Component
from ._registry import ComponentError as ComponentError
from ._registry import all_metrics as all_metrics
from ._registry import components as components
from ._registry import load_component as load_component
from ._retry import Retry as Retry
from ._runtime import FlowFailed as FlowFailed
from ._runtime import RunResult as RunResult
from ._runtime import Runtime as Runtime
from ._runtime import run_flow as run_flow
from ._schedule import AdaptiveSchedule as AdaptiveSchedule
from ._schedule import Calendar as Calendar
from ._schema import RecordSchema as RecordSchema
from ._schema import record_schema as record_schema
from ._shard import Shard as Shard
from ._shard import shard_of as shard_of
from ._sink import BatchingSink as BatchingSink
from ._status import figures as flow_figures  # noqa: F401 - _status names it figures
from ._stream import RECONNECT_REASONS as RECONNECT_REASONS
from ._stream import StreamParsed as StreamParsed
from ._stream import WebSocketSource as WebSocketSource
from ._windows import Candles as Candles
from ._windows import Window as Window

__version__ = "0.1.0"
