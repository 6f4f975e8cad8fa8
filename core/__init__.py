"""The bottom layer: what every other package may use and which uses none of them.

errors (UserError, Stopped), dist (the only importer of torch.distributed), device (device and precision from
config values), files (atomic writes). augment/, data/, losses/, models/ and configs/ import from here and never
from the layers above (tests/test_layers.py keeps it so).
"""
