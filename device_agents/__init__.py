"""The device agent (agent.py) and its result schema: shipped to devices as files, never imported by the host."""
