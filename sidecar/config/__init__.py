"""TOML configuration -> frozen dataclasses.

- :mod:`sidecar.config.schema`: the dataclasses, each key's meaning and unit in its field;
- :mod:`sidecar.config.load`: reading and validating a file (keys derived from the fields);
- :mod:`sidecar.config.dump`: the effective configuration back in the file's shape.

Every validation error names the key path (``binding.b1.ha_proxy_src_addr``).
"""

from sidecar.config.dump import config_to_dict
from sidecar.config.load import (
    load_ca_file,
    load_config,
    load_config_bytes,
    parse_config,
    parse_host_port,
    verifying_context,
)
from sidecar.config.schema import (
    DEFAULT_DNS_PORT,
    MAX_WORKERS,
    SELECTIONS,
    TLS_POLICIES,
    Binding,
    BindingGroup,
    Config,
    ConfigError,
    DeliveryConfig,
    DnsConfig,
    DomainPolicy,
    HealthConfig,
    HostPort,
    Listener,
    Selection,
    ServerConfig,
    StatusConfig,
    TlsPolicy,
)

__all__ = [
    "DEFAULT_DNS_PORT",
    "MAX_WORKERS",
    "SELECTIONS",
    "TLS_POLICIES",
    "Binding",
    "BindingGroup",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DnsConfig",
    "DomainPolicy",
    "HealthConfig",
    "HostPort",
    "Listener",
    "Selection",
    "ServerConfig",
    "StatusConfig",
    "TlsPolicy",
    "config_to_dict",
    "load_ca_file",
    "load_config",
    "load_config_bytes",
    "parse_config",
    "parse_host_port",
    "verifying_context",
]
