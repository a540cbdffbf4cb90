"""The runtime: the adapters' one spine (`Dispatcher`) and the long-running
parts around it (autoscaler, SIP server, metrics). Owns the clock and the
event loop's timers; decides nothing itself (the core does)."""
