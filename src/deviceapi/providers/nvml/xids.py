"""XID classification: a pure function from an XID and the operator's lists to what we do.

The defaults (SPEC §5) are :data:`deviceapi._config.DEFAULT_IGNORED_XIDS` and
:data:`deviceapi._config.DEFAULT_CRITICAL_XIDS`; ``--nvml-ignored-xids`` and
``--nvml-critical-xids`` add to them, and either may be ``all``.

Precedence, first match wins:

1. listed explicitly in ``--nvml-ignored-xids``  → IGNORED (the operator's override beats all);
2. listed explicitly in ``--nvml-critical-xids`` → CRITICAL;
3. a default critical XID                         → CRITICAL;
4. a default ignored XID                          → IGNORED;
5. ``--nvml-critical-xids all``                   → CRITICAL;
6. ``--nvml-ignored-xids all``                    → IGNORED;
7. anything else                                  → LOGGED (logged and counted, no change).

So ``all`` is the fallback for XIDs nothing more specific classifies: ``critical=all`` restores the
reference device plugin's "every XID not ignored is fatal" behaviour while the application XIDs
(13, 31, ...) stay ignored, and ``ignored=all`` silences every XID that is not critical by default
or by name. When both lists say ``all``, critical wins (the safe side). To switch XID health off
entirely use ``--nvml-health-check=false``.
"""

from __future__ import annotations

import enum

from deviceapi._config import DEFAULT_CRITICAL_XIDS, DEFAULT_IGNORED_XIDS, XidSet


class XidClass(enum.Enum):
    """What an XID means for the GPU's NVMLReady condition."""

    IGNORED = "ignored"
    """Says nothing about the GPU's health (application faults); not even logged above debug."""
    CRITICAL = "critical"
    """The GPU must not take new work: NVMLReady turns False (reason XidCritical)."""
    LOGGED = "logged"
    """Neither: logged and counted, the condition stays."""


_NO_XIDS = XidSet()


def classify(xid: int, ignored: XidSet = _NO_XIDS, critical: XidSet = _NO_XIDS) -> XidClass:
    """Classify ``xid`` given the operator's extra ``ignored`` and ``critical`` lists."""
    if xid in ignored.xids:
        return XidClass.IGNORED
    if xid in critical.xids or xid in DEFAULT_CRITICAL_XIDS:
        return XidClass.CRITICAL
    if xid in DEFAULT_IGNORED_XIDS:
        return XidClass.IGNORED
    if critical.everything:
        return XidClass.CRITICAL
    if ignored.everything:
        return XidClass.IGNORED
    return XidClass.LOGGED


#: Short descriptions of common XIDs (NVIDIA's XID catalogue), used in condition messages.
XID_DESCRIPTIONS: dict[int, str] = {
    13: "Graphics Engine Exception",
    31: "GPU memory page fault",
    32: "Invalid or corrupted push buffer stream",
    43: "GPU stopped processing",
    45: "Preemptive cleanup, due to previous errors",
    48: "Double Bit ECC Error",
    61: "Internal micro-controller breakpoint/warning",
    62: "Internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapper recording failure",
    68: "NVDEC0 Exception",
    69: "Graphics Engine class error",
    74: "NVLink Error",
    79: "GPU has fallen off the bus",
    92: "High single-bit ECC error rate",
    94: "Contained ECC error",
    95: "Uncontained ECC error",
    109: "Context Switch Timeout Error",
    119: "GSP RPC Timeout",
    120: "GSP Error",
    140: "Unrecovered ECC Error",
}


def describe(xid: int) -> str:
    """``"XID 79: GPU has fallen off the bus"`` (or ``"XID 7"`` for one we have no text for)."""
    text = XID_DESCRIPTIONS.get(xid)
    return f"XID {xid}: {text}" if text else f"XID {xid}"
