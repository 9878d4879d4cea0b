"""Data for Otter: synthetic images, instruction datasets and prompt building."""
