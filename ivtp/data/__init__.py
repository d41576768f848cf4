"""Prompts, conversation templates and synthetic images."""
