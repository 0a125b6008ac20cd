"""The run configuration (``load_config`` → ``Config``).

- ``sections``: the sections and their fields, each with its default, rule and help side by side
  (``fed-plora config`` lists them);
- ``rules``: the rules (``Check``) and ``ConfigError``;
- ``loading``: ``Config``, read from a file, overrides or a ``config.json`` (fields that moved or were added
  since read as before), and the checks of fields that depend on each other;
- ``compare``: TOML literals, dotted fields, and the differences between two configs.
"""

from .compare import ABSENT, config_differences, flatten, toml_literal
from .loading import ADDED, MOVED, Config, load_config, reference_rows, task_kind
from .rules import ConfigError, is_plain_name
from .sections import FIELDS, REFERENCES, SECTIONS, field_rows

__all__ = [
    "ABSENT",
    "ADDED",
    "FIELDS",
    "MOVED",
    "REFERENCES",
    "SECTIONS",
    "Config",
    "ConfigError",
    "config_differences",
    "field_rows",
    "flatten",
    "is_plain_name",
    "load_config",
    "reference_rows",
    "task_kind",
    "toml_literal",
]
