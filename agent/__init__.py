"""The agent: runs on a source server, journals every write to a protected disk and ships it."""
