"""The Textual dashboard (the only part of the project that imports Textual/plotext)."""
