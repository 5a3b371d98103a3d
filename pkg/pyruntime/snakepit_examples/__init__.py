"""Adapters bundled with snakepit."""
