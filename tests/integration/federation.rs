//! Federation behaviour beyond query answers: failures, timeouts, EXPLAIN, the CLI.
