"""The provider contract suite: one set of tests, run against every provider."""
