"""The sequential transformer's study, refit and scores.

In one process, or from a sample of users with scores by shard.
"""
