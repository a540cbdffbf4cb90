"""Small pure helpers shared by every layer (timers, state machines, config
errors, process exits). Imports nothing else of trunkline."""
