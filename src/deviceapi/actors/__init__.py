"""The actor runtime (mailboxes, the actor base) and the domain actors of the server."""

from ._actor import Actor, ActorCrashed, ActorExit, FaultHook
from ._mailbox import (
    CallTimeout,
    Mailbox,
    MailboxClosed,
    MailboxStatistics,
    Reply,
    TrioReply,
)

__all__ = [
    "Actor",
    "ActorCrashed",
    "ActorExit",
    "CallTimeout",
    "FaultHook",
    "Mailbox",
    "MailboxClosed",
    "MailboxStatistics",
    "Reply",
    "TrioReply",
]
