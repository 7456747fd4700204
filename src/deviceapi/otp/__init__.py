"""The generic kit: bounded typed mailboxes, the actor base, OTP-style supervisors and trees.

Nothing here knows the domain (no cache, no gRPC): ``deviceapi.cache`` and the app build on it.
See supervisor.py for how OTP maps onto trio, _strategy.py for the restart rules, and tree.py
for nesting supervisors and running a root.
"""

from ._actor import Actor, ActorCrashed, ActorExit, FaultHook
from ._intensity import Intensity, RestartWindow
from ._mailbox import (
    CallTimeout,
    Mailbox,
    MailboxClosed,
    MailboxStatistics,
    Reply,
    TrioReply,
)
from ._spec import DEFAULT_SHUTDOWN, Backoff, ChildSpec, ChildType, Restart, StartFn
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
    "Actor",
    "ActorCrashed",
    "ActorExit",
    "Backoff",
    "CallTimeout",
    "ChildCounts",
    "ChildSpec",
    "ChildStartFailed",
    "ChildType",
    "DynamicSupervisor",
    "ExitKind",
    "FaultHook",
    "Intensity",
    "Mailbox",
    "MailboxClosed",
    "MailboxStatistics",
    "Reply",
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
    "TrioReply",
    "describe",
    "plan_restart",
    "run_root",
    "run_tree",
    "should_restart",
    "supervisor_spec",
    "unwrap",
]
