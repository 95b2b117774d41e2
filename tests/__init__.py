"""pyodlog's test suite (a package, so that tests, helpers and benchmarks import `tests.helpers`)."""
