"""``python -m torch_ext``: print what was built and what runs now (torch_ext.show_config())."""
from . import show_config

print(show_config())
