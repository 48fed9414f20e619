"""examples/kubernetes and examples/compose, checked without a cluster or a Docker engine: the
YAML parses, the sidecar configuration they carry passes ``sidecar check``, the Postfix
settings are the README's recipe, and the container settings fit the sidecar's own (stop
grace, probes, the directory mount, the files the Compose builds COPY)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "examples" / "kubernetes" / "sidecar.yaml"
COMPOSE = ROOT / "examples" / "compose"
README = (ROOT / "README.md").read_text(encoding="utf-8")
SIDECAR_TRANSPORT = "sidecar   unix  -       -       n       -       -       smtp"


def readme_postfix_recipe() -> list[str]:
    """The main.cf lines of the README's Postfix recipe (its first code block after
    "**Postfix**"), and the master.cf line."""
    section = README.split("**Postfix**", 1)[1]
    block = section.split("```", 2)[1]
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert SIDECAR_TRANSPORT in lines
    return [line for line in lines if "=" in line and not line.startswith("#")]


def settings(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def kubernetes() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERNETES.read_text(encoding="utf-8")) if doc]


def kind(name: str, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == name]


def check(tmp_path: Path, text: str) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output


def test_readme_recipe_is_what_the_tests_prove() -> None:
    assert readme_postfix_recipe() == [
        "relayhost = [127.0.0.1]:2525",
        "default_transport = sidecar",
        "sidecar_destination_recipient_limit = 1",
    ]


def test_kubernetes_parses_and_its_sidecar_config_checks(tmp_path: Path) -> None:
    documents = kubernetes()
    configs = {doc["metadata"]["name"]: doc for doc in kind("ConfigMap", documents)}
    text = configs["sidecar-config"]["data"]["sidecar.toml"]
    check(tmp_path, text)
    config = parse_config(tomllib.loads(text))
    assert [str(item.address) for item in config.listeners] == ["127.0.0.1:2525"]
    assert config.status.address is not None and config.status.address.port == 9925

    (deployment,) = kind("Deployment", documents)
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] > config.server.shutdown_grace
    assert spec["terminationGracePeriodSeconds"] == 45
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.status.address.port)
    assert annotations["prometheus.io/path"] == "/metrics"

    containers = {container["name"]: container for container in spec["containers"]}
    assert set(containers) == {"postfix", "sidecar"}  # one pod: one network namespace
    sidecar = containers["sidecar"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"] == {"path": "/healthz", "port": "status"}
    assert sidecar["ports"] == [{"name": "status", "containerPort": 9925}]
    assert sidecar["securityContext"]["runAsUser"] == 2525
    assert sidecar["resources"]["requests"]["memory"] == "64Mi"
    # The config directory is mounted (no subPath), so an update reaches SIGHUP.
    mounts = {mount["mountPath"]: mount for mount in sidecar["volumeMounts"]}
    assert set(mounts) == {"/etc/sidecar", config.delivery.state_dir}
    mount = mounts["/etc/sidecar"]
    assert "subPath" not in mount and mount["readOnly"] is True
    assert sidecar["args"][-1] == "/etc/sidecar/sidecar.toml"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == "sidecar-config"
    # The root file system is read-only: state_dir (MTA-STS cache, TLS-RPT) needs a writable
    # volume of its own.
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    state = mounts[config.delivery.state_dir]
    assert not state.get("readOnly", False)
    assert {"emptyDir", "persistentVolumeClaim"} & set(volumes[state["name"]])

    postfix = settings(configs["postfix-sidecar"]["data"]["sidecar.cf"])
    assert postfix == readme_postfix_recipe()
    assert SIDECAR_TRANSPORT in KUBERNETES.read_text(encoding="utf-8")
    (postfix_mount,) = containers["postfix"]["volumeMounts"]
    assert postfix_mount["mountPath"] == "/etc/postfix-sidecar"


def test_compose_parses_and_its_sidecar_config_checks(tmp_path: Path) -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) == {"postfix", "sidecar", "haproxy", "mx"}
    text = (COMPOSE / "sidecar" / "sidecar.toml").read_text(encoding="utf-8")
    check(tmp_path, text)
    config = parse_config(tomllib.loads(text))

    sidecar = services["sidecar"]
    assert sidecar["network_mode"] == "service:postfix"
    # The directory (not the file), and a named volume for state_dir, which outlives the
    # container.
    assert sidecar["volumes"] == [
        "./sidecar:/etc/sidecar:ro",
        f"sidecar-state:{config.delivery.state_dir}",
    ]
    assert "sidecar-state" in compose["volumes"]
    grace = re.fullmatch(r"(\d+)s", sidecar["stop_grace_period"])
    assert grace is not None and int(grace[1]) > config.server.shutdown_grace

    # The sidecar reaches HAProxy and writes the MX address HAProxy lets through.
    addresses = {
        name: service["networks"]["egress"]["ipv4_address"]
        for name, service in services.items()
        if "networks" in service
    }
    (binding,) = config.bindings.values()
    assert [str(server) for server in binding.ha_proxy_server] == [f"{addresses['haproxy']}:5000"]
    assert str(binding.ha_proxy_src_addr) == addresses["haproxy"]
    for hosts in config.dns.static.values():
        assert [str(host) for host in hosts] == [addresses["mx"]]
    haproxy = (COMPOSE / "haproxy" / "haproxy.cfg").read_text(encoding="utf-8")
    assert f"bind {addresses['haproxy']}:5000 accept-proxy" in haproxy
    assert f"dst {addresses['mx']}" in haproxy and "usesrc clientip" in haproxy

    postfix = settings((COMPOSE / "postfix" / "sidecar.cf").read_text(encoding="utf-8"))
    assert postfix == readme_postfix_recipe()
    assert SIDECAR_TRANSPORT in (COMPOSE / "postfix" / "Dockerfile").read_text(encoding="utf-8")
    assert services["postfix"]["volumes"] == [
        "./postfix/sidecar.cf:/etc/postfix-sidecar/sidecar.cf:ro"
    ]


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping, as Docker Compose v2 does
    (its YAML parser, go-yaml v3: "mapping key ... already defined"); PyYAML, docker-compose
    1.29 and podman-compose keep the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {duplicates}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def test_compose_file_loads_in_compose_v2_and_docker_compose_1() -> None:
    text = (COMPOSE / "compose.yaml").read_text(encoding="utf-8")
    compose = yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no arbitrary objects
    # docker-compose 1.29 (Debian 12's) refuses a top-level `name` ("'name' does not match any
    # of the regexes: '^x-'"); the project name is the directory's, or -p NAME.
    assert set(compose) <= {"services", "volumes", "networks"}


@pytest.mark.parametrize("service", ["postfix", "haproxy", "mx", "sidecar"])
def test_compose_builds_copy_files_that_exist(service: str) -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text(encoding="utf-8"))
    build = compose["services"][service]["build"]
    context = COMPOSE / (build if isinstance(build, str) else build["context"])
    dockerfile = (
        context / build["dockerfile"] if isinstance(build, dict) and "dockerfile" in build
        else context / "Dockerfile"
    )  # fmt: skip
    text = dockerfile.read_text(encoding="utf-8")
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    # Debian-based only (the ARG of the sidecar's Dockerfile names python:3.11-slim-bookworm).
    assert bases and all(
        base in ("debian:bookworm-slim", "python:3.11-slim-bookworm", "${PYTHON_IMAGE}")
        for base in bases
    ), bases
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (context / source).exists(), f"{dockerfile}: {source}"


def test_compose_postfix_main_cf_is_one_postfix_starts_with(tmp_path: Path) -> None:
    # The Postfix image starts from a main.cf the Dockerfile copies. main.cf.dist (the
    # commented upstream sample) leaves the install-time settings blank (setgid_group =, ...):
    # `postfix start-fg` then exits 1 without a word and sendmail fails. Checked with this
    # host's Postfix (scripts/lib.sh installs Debian's, the image's).
    dockerfile = (COMPOSE / "postfix" / "Dockerfile").read_text(encoding="utf-8")
    (source,) = re.findall(r"cp (/usr/share/postfix/\S+) /etc/postfix/main\.cf", dockerfile)
    if not Path(source).exists() or not Path("/usr/sbin/postconf").exists():
        pytest.skip(f"no Debian Postfix here ({source})")
    (tmp_path / "main.cf").write_bytes(Path(source).read_bytes())
    names = ["setgid_group", "sendmail_path", "mail_owner", "command_directory"]
    values = subprocess.run(
        ["/usr/sbin/postconf", "-c", str(tmp_path), "-h", *names],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(values) == len(names) and all(values), dict(zip(names, values, strict=False))


def test_example_haproxies_keep_health_checks_out_of_the_log() -> None:
    # The sidecar's health checks connect and close before any PROXY header; an egress that
    # logs needs `option dontlognull`, or it logs one line per check (every 5 s per server).
    configs = [ROOT / "examples" / "haproxy.cfg", COMPOSE / "haproxy" / "haproxy.cfg"]
    for path in configs:
        lines = settings(path.read_text(encoding="utf-8"))
        if any(line.startswith("log ") for line in lines) and any(
            "accept-proxy" in line for line in lines
        ):
            assert "option dontlognull" in lines, path
