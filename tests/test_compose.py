"""docker-compose.yml is valid Compose and refers only to things the repository has.

No Docker engine runs here, so the file is checked the way `docker compose config`
would check it: variables interpolated from `.env.example`, then the Compose
Specification's JSON schema (vendored by check-jsonschema), then what each service
names (build contexts, bind mounts, env files, variables, commands) against the repo.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib import resources

import jsonschema
import pytest
import yaml

from rec.config import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
SHELL_VARIABLE = re.compile(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)")
# Set by Docker in every container.
CONTAINER_VARIABLES = {"HOSTNAME"}
# Commands of the public images the file uses, by image name.
IMAGE_CLIS = {"postgres": {"pg_isready", "postgres"}, "redis": {"redis-server", "redis-cli"}}


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _interpolate(value, env: dict[str, str], missing: set[str]):
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $$ escapes."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        if name in env and not (op and op.startswith(":") and env[name] == ""):
            return env[name]
        if op in {"-", ":-"}:
            return arg
        missing.add(name)
        return ""

    return VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def resolved(raw) -> dict:
    missing: set[str] = set()
    document = _interpolate(raw, _env_example(), missing)
    assert not missing, f"variables used in docker-compose.yml but not in .env.example: {missing}"
    return document


def test_file_matches_the_compose_specification(resolved):
    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    # The schema names draft-07 without the trailing '#' that jsonschema looks up.
    assert "draft-07" in schema["$schema"]
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(resolved)]
    assert errors == []

    broken = dict(resolved, services={"x": {"image": "postgres:16", "ports": "8080"}})
    assert list(validator.iter_errors(broken)), "the schema must catch a malformed service"


def test_stack_has_the_airflow_3_services(resolved):
    services = resolved["services"]
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert {"postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer"} <= default
    assert {name for name, s in services.items() if "celery" in s.get("profiles", [])} == {
        "redis", "airflow-worker"}
    assert services["postgres"]["image"] == "postgres:16"
    assert "8080:8080" in services["airflow-apiserver"]["ports"]
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == (
        "LocalExecutor")
    for name, service in services.items():
        if name not in {"airflow-init"}:
            assert "healthcheck" in service, f"{name} has no health check"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if dependency == "airflow-init":
                assert condition["condition"] == "service_completed_successfully"
    assert "redis" in services["airflow-worker"]["depends_on"]


def test_builds_mounts_and_env_files_exist(resolved):
    declared_volumes = set(resolved.get("volumes") or {})
    built_images = {s["image"] for s in resolved["services"].values() if "build" in s}
    for name, service in resolved["services"].items():
        build = service.get("build")
        if build:
            context = REPO_ROOT / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        else:
            image = service["image"]
            assert image in built_images or ":" in image and not image.endswith(":latest"), (
                f"{name}: {image} is neither built here nor pinned to a tag")

        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"

        for env_file in service.get("env_file", []):
            assert env_file == ".env", f"{name} reads {env_file}"
    assert (REPO_ROOT / ".env.example").is_file()
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()


def _project_clis() -> set[str]:
    """What the project image provides: the base image, its apt packages, pip packages."""
    dockerfile = DOCKERFILE.read_text()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = " ".join(project["dependencies"] + project["optional-dependencies"]["celery"])
    available = {"python", "bash", "/bin/bash", *project["scripts"]}
    for cli, package in {"psql": "postgresql-client", "curl": "curl"}.items():
        if re.search(rf"apt-get install[^\n]*\b{package}\b", dockerfile):
            available.add(cli)
    if "apache-airflow==" in requirements:
        available.add("airflow")
    if "providers-celery" in requirements and "[celery]" in dockerfile:
        available.add("celery")
    return available


def _commands(service: dict) -> list[list[str]]:
    """Each command line the service runs: command, entrypoint, health check, bash -c body."""
    lines = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if isinstance(value, str):
            lines.append(shlex.split(value))
        elif value:
            lines.append([str(v) for v in value])
    test = (service.get("healthcheck") or {}).get("test")
    if test and test[0] == "CMD":
        lines.append(test[1:])
    elif test and test[0] == "CMD-SHELL":
        lines.append(shlex.split(test[1]))
    script = service.get("command")
    if isinstance(script, list) and script[:1] == ["-c"]:
        lines = [line for line in lines if line[:1] != ["-c"]]
        for line in script[1].replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if words and words[0] in {"airflow", "rec"}:
                lines.append(words)
    return lines


def test_commands_use_clis_the_images_have(resolved):
    from rec.cli import build_parser

    project_clis = _project_clis()
    project_image = next(s["image"] for s in resolved["services"].values() if "build" in s)
    for name, service in resolved["services"].items():
        image = service["image"]
        clis = (project_clis if image == project_image
                else IMAGE_CLIS[image.split(":")[0].split("/")[-1]])
        for words in _commands(service):
            assert words[0] in clis, f"{name} runs {words[0]!r}, which its image lacks"
            if words[0] == "rec":
                build_parser().parse_args(words[1:])  # exits on an unknown subcommand


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_shell_variables_come_from_the_env_file(raw):
    known = set(_env_example()) | CONTAINER_VARIABLES
    for name, service in raw["services"].items():
        text = "\n".join(_strings(service))
        used = set(SHELL_VARIABLE.findall(text))
        assigned = set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=", text, re.MULTILINE))
        defined = known | assigned | set(service.get("environment") or {})
        assert used <= defined, f"{name} reads unset variables {used - defined}"


def test_image_gets_cpu_torch_and_the_project():
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cpu torch==2\.13\.0",
                     dockerfile)
    assert "pip install -e '.[celery]'" in dockerfile
    for folder in ("rec", "data_checks", "dags", "dbt_project"):
        assert f"COPY --chown=airflow:0 {folder} ./{folder}" in dockerfile
