"""Test instrumentation that runs inside real workers, reaching the trainer through callbacks
(`--callback hvd_abs.testing.ledger:Ledger`). Nothing in the library imports it."""
