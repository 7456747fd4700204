"""Tools for testing against deviceapi, shipped with the package (fault injection first)."""

from .faults import FaultInjector, FaultKind, InjectedCrash, Injection

__all__ = ["FaultInjector", "FaultKind", "InjectedCrash", "Injection"]
