"""Code shared by the agent, the process server and the master target (I/O helpers, config, TLS)."""
