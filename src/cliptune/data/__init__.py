"""Catalogue reading and validation, robust image loading, grouped splits, synthetic catalogues."""
