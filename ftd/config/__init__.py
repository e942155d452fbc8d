"""ftd's one configuration: a typed schema loaded from YAML and checked at load.

``load_config(path, host=None, env=None)`` returns a frozen :class:`Config` or raises
:class:`~ftd.errors.ConfigError` listing every issue by key path; ``validate_file`` returns the
issues instead; ``schema_reference()`` renders the reference documentation.
"""

from ftd.config.load import (
    MAX_CONFIG_BYTES,
    config_from_data,
    load_config,
    loads_config,
    validate_file,
)
from ftd.config.schema import (
    ENV_HOST,
    PORT_SPAN,
    Boot,
    Broker,
    Bus,
    Checkpoint,
    Cluster,
    Config,
    Control,
    Disk,
    Fence,
    Group,
    Host,
    Libvirt,
    Log,
    Nic,
    Paths,
    Ports,
    Qemu,
    Tls,
    Vm,
    schema_reference,
)
from ftd.errors import ConfigError, ConfigIssue

__all__ = [
    "ENV_HOST",
    "MAX_CONFIG_BYTES",
    "PORT_SPAN",
    "Boot",
    "Broker",
    "Bus",
    "Checkpoint",
    "Cluster",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Control",
    "Disk",
    "Fence",
    "Group",
    "Host",
    "Libvirt",
    "Log",
    "Nic",
    "Paths",
    "Ports",
    "Qemu",
    "Tls",
    "Vm",
    "config_from_data",
    "load_config",
    "loads_config",
    "schema_reference",
    "validate_file",
]
