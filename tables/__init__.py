"""Paper tables: specs (configs/tables/*.yaml), the runs they need, matching runs by config, rendering.

``reproduce.py`` is the command line; ``spec`` reads a table, ``plan`` resolves its runs and commands, ``collect``
finds them on disk or in W&B, ``render`` writes Markdown, CSV and a plot.
"""
