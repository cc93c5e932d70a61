"""flows: a Prometheus-instrumented streaming dataflow for market data, on trio.

The public surface is re-exported here; the modules behind it are private.
"""

from ._actors import FunctionStage as FunctionStage
from ._actors import RunContext as RunContext
from ._actors import Sink as Sink
from ._actors import Source as Source
from ._actors import Stage as Stage
from ._actors import stage as stage
from ._change import ChangeDetector as ChangeDetector
from ._channels import Edge as Edge
from ._channels import Inbox as Inbox
from ._channels import Outbox as Outbox
from ._flow import Flow as Flow
from ._flow import FlowError as FlowError
from ._flow import Supervision as Supervision
from ._limits import CircuitBreaker as CircuitBreaker
from ._limits import RateLimit as RateLimit
from ._metrics import METRICS as METRICS
from ._metrics import SlowThresholds as SlowThresholds
from ._records import Batch as Batch
from ._records import Tick as Tick
from ._runtime import FlowFailed as FlowFailed
from ._runtime import RunResult as RunResult
from ._runtime import Runtime as Runtime
from ._runtime import run_flow as run_flow
from ._shard import Shard as Shard
from ._shard import shard_of as shard_of
from ._sink import BatchingSink as BatchingSink
from ._sink import Retry as Retry

__version__ = "0.1.0"
