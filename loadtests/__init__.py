"""Benchmarks and load tests of alex-server: see loadtests/README.md."""
