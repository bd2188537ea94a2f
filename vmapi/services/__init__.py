"""Use cases: transactions, checks against the database, calls to the hypervisors, undo."""
