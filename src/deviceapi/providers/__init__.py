"""Built-in providers: clients of the public API, like any other provider (NVML, simulator)."""
