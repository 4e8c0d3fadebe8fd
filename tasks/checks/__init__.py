"""Data checks: the Great Expectations suites on whole tables and shard by shard."""
