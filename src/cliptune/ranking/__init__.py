"""Ranking maths every layer above shares: per-query metrics, the one exact top-k, bootstrap intervals."""
