"""Backbone loading, layer freezing and LoRA, the Siamese fusion head, feature caching."""
