"""The application layer: what a command does, composed from the layers below.

``workflow`` (solve, evaluate and export a placement), ``comparison`` and ``sweep`` (simulate
several placements, or a grid of cluster sizes and rates, and write the results layout),
``report`` (the HTML report), ``demo`` (the main job on the embedded default) and ``serve``
(the re-balancing service). The CLI calls these; nothing below imports them.
"""
