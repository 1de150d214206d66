"""CLI-layer command modules; each exposes register(app), wired in cliptune.cli."""
