"""OTP-style supervision trees on trio (generic: no domain code is imported here).

See supervisor.py for how OTP maps onto trio, _strategy.py for the restart rules, and tree.py
for nesting supervisors and running a root.
"""

from ._intensity import Intensity, RestartWindow
from ._spec import DEFAULT_SHUTDOWN, ChildSpec, ChildType, Restart, StartFn
from ._strategy import ExitKind, RestartPlan, Strategy, plan_restart, should_restart
from .supervisor import (
    ChildCounts,
    ChildStartFailed,
    DynamicSupervisor,
    RestartIntensityExceeded,
    Supervisor,
    SupervisorError,
    SupervisorNotRunning,
    SupervisorStatistics,
    TooManyChildren,
    describe,
    unwrap,
)
from .tree import TreeFailed, run_root, run_tree, supervisor_spec

__all__ = [
    "DEFAULT_SHUTDOWN",
    "ChildCounts",
    "ChildSpec",
    "ChildStartFailed",
    "ChildType",
    "DynamicSupervisor",
    "ExitKind",
    "Intensity",
    "Restart",
    "RestartIntensityExceeded",
    "RestartPlan",
    "RestartWindow",
    "StartFn",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorNotRunning",
    "SupervisorStatistics",
    "TooManyChildren",
    "TreeFailed",
    "describe",
    "plan_restart",
    "run_root",
    "run_tree",
    "should_restart",
    "supervisor_spec",
    "unwrap",
]
