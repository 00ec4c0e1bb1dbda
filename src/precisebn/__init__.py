"""precisebn: exact, pure recomputation of BatchNorm running statistics with torch.func."""

import logging as _logging

from precisebn._adapt import Adapter as Adapter
from precisebn._adapt import adapt as adapt
from precisebn._adapt import adapter as adapter
from precisebn._batches import Forward as Forward
from precisebn._buffers import RunInfo as RunInfo
from precisebn._buffers import apply_bn_buffers as apply_bn_buffers
from precisebn._buffers import bn_buffers as bn_buffers
from precisebn._distributed import all_reduce_stats as all_reduce_stats
from precisebn._layers import LayerSelector as LayerSelector
from precisebn._moments import Moments as Moments
from precisebn._moments import Stats as Stats
from precisebn._moments import finalize as finalize
from precisebn._moments import init as init
from precisebn._moments import merge as merge
from precisebn._recompute import recompute_bn_buffers as recompute_bn_buffers
from precisebn._recompute import recompute_bn_buffers_many as recompute_bn_buffers_many
from precisebn._recorder import Recorder as Recorder
from precisebn._recorder import capture as capture
from precisebn._recorder import recorder as recorder
from precisebn._recorder import update as update
from precisebn._report import report as report

__all__ = [
    "Adapter",
    "Forward",
    "LayerSelector",
    "Moments",
    "Recorder",
    "RunInfo",
    "Stats",
    "adapt",
    "adapter",
    "all_reduce_stats",
    "apply_bn_buffers",
    "bn_buffers",
    "capture",
    "finalize",
    "init",
    "merge",
    "recompute_bn_buffers",
    "recompute_bn_buffers_many",
    "recorder",
    "report",
    "update",
]
__version__ = "0.1.0"

# A library logs, the application decides where it goes.
_logging.getLogger("precisebn").addHandler(_logging.NullHandler())
