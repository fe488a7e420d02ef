"""Provider flow control (issue "Resilience"): per model and provider, shared by every worker
through Redis, the limits a request must pass before it is sent (state.py), and the choice
of which model serves it (routing.py). config.py reads a model's settings from the registry.
"""
