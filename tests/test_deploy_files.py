"""Static checks of the deployment files: Dockerfile, docker-compose.yml and .dockerignore.

No Docker engine is needed: the files are parsed and compared with pyproject.toml, the settings model and
the command-line interface.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("migrate", "api", "worker")
SERVE_COMMAND = ["serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


# --- helpers -------------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), with comments dropped and continuations joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\[ \t]*\n", "", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _arg_defaults() -> dict[str, str]:
    """ARG defaults of the whole Dockerfile, each expanded with the ARGs declared before it."""
    values: dict[str, str] = {}
    for keyword, rest in _instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            values[name.strip()] = _expand(value.strip().strip('"'), values)
    return values


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def _final_stage() -> list[tuple[str, str]]:
    return _stages()[-1]


def _json_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    matches = [rest for kw, rest in stage if kw == keyword]
    assert matches, f"the final stage has no {keyword}"
    return json.loads(matches[-1])


def _run_commands() -> list[str]:
    return [rest for keyword, rest in _instructions() if keyword == "RUN"]


def _shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line, split on &&, ||, ; and |, each as a list of words."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*", dep)
        if match:
            pins[match[1].lower().replace("_", "-")] = match[3]
    return pins


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: ${VAR:-default} gives the default."""
    return INTERPOLATION.sub(lambda m: m[2] or "", value)


def _mount_targets(service: dict) -> dict[str, str]:
    """Container path -> short-syntax mount (source:target[:mode])."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mode = ":ro" if volume.get("read_only") else ""
            mounts[volume["target"]] = f"{volume.get('source', '')}:{volume['target']}{mode}"
        else:
            parts = volume.rsplit(":", 2) if volume.endswith((":ro", ":rw")) else volume.rsplit(":", 1)
            mounts[parts[1]] = volume
    return mounts


# --- docker-compose.yml --------------------------------------------------------------------------------


def test_compose_has_the_four_services(compose):
    assert set(compose.get("services", {})) == {"postgres", "migrate", "api", "worker"}


def test_postgres_is_16_with_healthcheck_and_named_volume(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    sources = [str(v).split(":")[0] if isinstance(v, str) else v["source"] for v in postgres["volumes"]]
    assert any(source in (compose.get("volumes") or {}) for source in sources), "no named volume"


def test_app_services_build_and_share_the_image(compose):
    for name in APP_SERVICES:
        service = compose["services"][name]
        assert service.get("build") in (".", {"context": "."}), name
        assert service.get("image") == "llmatch:latest", name


def test_commands_match_the_roles(compose):
    services = compose["services"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["api"]["command"] == SERVE_COMMAND
    assert services["worker"]["command"][0] == "worker"
    assert services["migrate"]["restart"] == "no"


def test_startup_order(compose):
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_worker_reserves_an_nvidia_gpu(compose):
    deploy = compose["services"]["worker"]["deploy"]
    assert deploy.get("replicas", 1) == 1
    devices = deploy["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and device.get("count") == 1 and "gpu" in device.get("capabilities", [])
        for device in devices
    ), devices


def test_api_publishes_8000_and_checks_health(compose):
    api = compose["services"]["api"]
    assert any(str(port).endswith(":8000") for port in api["ports"]), api["ports"]
    test = " ".join(api["healthcheck"]["test"])
    assert re.search(r"127\.0\.0\.1:8000/(healthz|readyz)", test), test


def test_shared_data_volume_and_read_only_models(compose):
    named_volumes = set(compose.get("volumes") or {})
    for name in APP_SERVICES:
        service = compose["services"][name]
        data_dir = _environment(service)["LLMATCH_DATA_DIR"]
        mounts = _mount_targets(service)
        assert data_dir in mounts, f"{name}: nothing mounted at {data_dir}"
        assert mounts[data_dir].split(":")[0] in named_volumes, f"{name}: {data_dir} is not a named volume"
    for name in ("api", "worker"):
        mounts = _mount_targets(compose["services"][name])
        assert "/models" in mounts and mounts["/models"].endswith(":ro"), f"{name}: {mounts}"
        assert "LLMATCH_MODEL_DIR" in mounts["/models"], mounts["/models"]


def test_app_services_run_offline_with_the_same_encoders(compose):
    envs = {name: _environment(compose["services"][name]) for name in APP_SERVICES}
    for name, env in envs.items():
        assert env.get("HF_HUB_OFFLINE") == "1", name
        assert env.get("TRANSFORMERS_OFFLINE") == "1", name
        assert env.get("LLMATCH_DATABASE_URL", "").startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["LLMATCH_DATABASE_URL"], name
    assert envs["api"]["LLMATCH_ENCODERS"] == envs["worker"]["LLMATCH_ENCODERS"]
    encoders = json.loads(envs["worker"]["LLMATCH_ENCODERS"])
    assert encoders, "LLMATCH_ENCODERS is empty"
    for spec in encoders.values():
        for key in ("model", "adapter"):
            if key in spec:
                assert PurePosixPath(spec[key]).is_relative_to("/models"), spec


def test_llmatch_variables_are_settings_fields(compose, monkeypatch):
    settings_module = pytest.importorskip("llmatch.settings")
    settings_cls = settings_module.Settings
    prefix = settings_cls.model_config.get("env_prefix", "")
    assert prefix == "LLMATCH_"
    fields = set(settings_cls.model_fields)

    used: dict[str, str] = {}
    for service in compose["services"].values():
        used.update({k: v for k, v in _environment(service).items() if k.startswith(prefix)})
    for keyword, rest in _final_stage():
        if keyword == "ENV":
            used.update(dict(re.findall(r"(LLMATCH_\w+)=(\S+)", rest)))
    assert used, "no LLMATCH_ variable found"
    unknown = sorted(name for name in used if name[len(prefix) :].lower() not in fields)
    assert not unknown, f"not fields of llmatch.settings.Settings: {unknown}"

    for name in list(os.environ):
        if name.startswith(prefix):
            monkeypatch.delenv(name)
    for name, value in used.items():
        monkeypatch.setenv(name, _interpolate(value))
    settings = settings_cls()
    registry = pytest.importorskip("encoding.registry")
    specs = registry.configured_specs(settings)
    assert settings.default_encoder in specs, f"{settings.default_encoder!r} is not a configured encoder"
    for name in settings.encoders:
        assert specs[name].kind in ("sentence-transformers", "llm2vec"), specs[name]


def test_inline_encodes_go_to_the_workers_gpu(compose):
    """The API has no GPU: its inline encodes go to the worker, which serves them on the internal network."""
    services = compose["services"]
    command = services["worker"]["command"]
    port = command[command.index("--serve-inline") + 1]
    assert command[command.index("--serve-inline-host") + 1] == "0.0.0.0", command
    assert _environment(services["api"])["LLMATCH_INLINE_ENCODER_URL"] == f"http://worker:{port}"
    assert "LLMATCH_INLINE_ENCODER_URL" not in _environment(services["worker"])
    assert "ports" not in services["worker"], "the inline endpoint has no authentication: keep it unpublished"
    assert "deploy" not in services["api"], "the API needs no GPU reservation"


# --- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_stages_use_a_cuda_12_runtime_image():
    args = _arg_defaults()
    app_stages = [s for s in _stages() if "astral-sh/uv" not in s[0][1]]
    assert app_stages, "no stage"
    for stage in app_stages:
        image = _expand(stage[0][1].split()[0], args)
        assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn\d*-)?runtime-ubuntu(22|24)\.04", image), image


def test_dockerfile_torch_is_a_cuda_12_build_of_the_pinned_version():
    args = _arg_defaults()
    assert args["TORCH_VERSION"] == _pyproject_pins()["torch"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["TORCH_INDEX_URL"])
    torch_runs = [run for run in _run_commands() if "torch==${TORCH_VERSION}" in run]
    assert torch_runs and all("--index-url" in run for run in torch_runs), torch_runs


def test_dockerfile_installs_faiss_gpu_and_not_faiss_cpu():
    args = _arg_defaults()
    pins = _pyproject_pins()
    assert args["FAISS_GPU_VERSION"] == pins["faiss-cpu"], "faiss-gpu must match the faiss-cpu pin"
    runs = _run_commands()
    gpu_runs = [run for run in runs if "faiss-gpu==${FAISS_GPU_VERSION}" in run]
    assert gpu_runs, "faiss-gpu is never installed"
    for run in gpu_runs:
        excluded = "--excludes" in run and re.search(r"echo\s+\"?faiss-cpu\"?\s*>", run)
        uninstalled = re.search(r"pip uninstall (-y )?faiss-cpu", run)
        assert excluded or uninstalled, f"faiss-cpu is not kept out: {run}"
    # Installing the project with its dependencies would bring faiss-cpu back.
    for run in runs:
        for tokens in _shell_commands(run):
            if "pip" in tokens and "install" in tokens and tokens[-1] in (".", "/src"):
                assert "--no-deps" in tokens, " ".join(tokens)
    assert any('"faiss-cpu" not in names' in run for run in runs), "no build-time check for faiss-cpu"


def test_dockerfile_runtime_contract():
    stage = _final_stage()
    keywords = [keyword for keyword, _ in stage]
    assert _json_form(stage, "ENTRYPOINT") == ["llmatch"]
    assert _json_form(stage, "CMD") == SERVE_COMMAND
    assert "8000" in " ".join(rest for keyword, rest in stage if keyword == "EXPOSE")
    assert "WORKDIR" in keywords

    user = [rest for keyword, rest in stage if keyword == "USER"]
    assert user and _expand(user[-1], _arg_defaults()).split(":")[0] not in ("root", "0"), user

    healthcheck = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    assert healthcheck, "no HEALTHCHECK"
    probe = json.loads(healthcheck[-1][healthcheck[-1].index("CMD") + 3 :].strip())
    assert probe[0] == "python" and "/healthz" in " ".join(probe), probe

    env = " ".join(rest for keyword, rest in stage if keyword == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "LLMATCH_DATA_DIR=/data"):
        assert setting in env, setting


def test_dockerfile_layers_dependencies_before_source():
    copies = [(i, rest) for i, (keyword, rest) in enumerate(_instructions()) if keyword == "COPY"]
    pyproject_at = next(i for i, rest in copies if rest.startswith("pyproject.toml"))
    source_at = next(i for i, rest in copies if rest.split()[0] == ".")
    deps_at = next(i for i, (kw, rest) in enumerate(_instructions()) if kw == "RUN" and "pyproject.toml" in rest)
    assert pyproject_at < deps_at < source_at


def test_image_python_satisfies_requires_python():
    specifiers = pytest.importorskip("packaging.specifiers")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    text = " ".join(_run_commands())
    installed = re.findall(r"uv python install (?:--\S+ )*(3\.\d+)\b", text)
    venv = re.findall(r"uv venv --python (3\.\d+)\b", text)
    assert installed and venv == installed, (installed, venv)
    allowed = specifiers.SpecifierSet(requires)
    assert f"{installed[0]}.0" in allowed and f"{installed[0]}.99" in allowed, (installed[0], requires)


# --- .dockerignore -------------------------------------------------------------------------------------


def _ignored(name: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            pattern = pattern[3:]
        if fnmatch.fnmatchcase(name, pattern):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_build_inputs_and_drops_local_state():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    needed_paths = (
        "pyproject.toml",
        "README.md",
        "llmatch",
        "service",
        "encoding",
        "matching",
        "learning",
        "encoder_worker",
    )
    for needed in (*needed_paths, "migrations"):
        assert not _ignored(needed, patterns), f"{needed} is excluded from the build context"
    for local in (".venv", ".git", ".data", "__pycache__", "bench/out", "llmatch.egg-info"):
        assert _ignored(local, patterns), f"{local} is sent to the build context"


# --- command-line interface ----------------------------------------------------------------------------


def _subcommands_used(compose: dict) -> set[str]:
    used = {_json_form(_final_stage(), "CMD")[0]}
    for name in APP_SERVICES:
        command = compose["services"][name]["command"]
        used.add((command if isinstance(command, list) else shlex.split(command))[0])
    return used


def _cli_help(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "llmatch.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _cli_missing() -> bool:
    try:
        return importlib.util.find_spec("llmatch.cli") is None
    except ImportError:
        return True


@pytest.mark.skipif(
    _cli_missing(),
    reason="llmatch.cli does not exist yet (the command-line interface is written separately)",
)
def test_cli_offers_the_subcommands_used_by_the_deploy_files(compose):
    used = _subcommands_used(compose)
    assert used == {"serve", "worker", "migrate"}
    top = _cli_help("--help")
    missing = sorted(cmd for cmd in used if not re.search(rf"(?<![\w-]){cmd}(?![\w-])", top))
    assert not missing, f"`llmatch --help` does not list {missing}:\n{top}"
    serve = _cli_help("serve", "--help")
    for option in ("--host", "--port", "--no-worker"):
        assert option in serve, f"`llmatch serve --help` has no {option}:\n{serve}"


@pytest.mark.skipif(_cli_missing(), reason="llmatch.cli does not exist yet")
def test_cli_offers_the_worker_options_compose_uses(compose):
    options = [word for word in compose["services"]["worker"]["command"] if word.startswith("--")]
    worker = _cli_help("worker", "--help")
    missing = [option for option in options if option not in worker]
    assert not missing, f"`llmatch worker --help` has no {missing}:\n{worker}"


# --- access control ------------------------------------------------------------------------------------


def test_deployments_ship_with_auth_on(compose):
    """The API binds every interface without --insecure-no-auth, so `serve` refuses to start until a key
    exists; compose gives it one from a secret file (never a literal key in the file or the image)."""
    api = compose["services"]["api"]
    for command in (api["command"], _json_form(_final_stage(), "CMD")):
        assert command[command.index("--host") + 1] == "0.0.0.0", command
        assert "--insecure-no-auth" not in command, command
    env = _environment(api)
    secret_path = env.get("LLMATCH_ADMIN_KEY_FILE", "")
    assert secret_path.startswith("/run/secrets/"), env
    secret = secret_path.removeprefix("/run/secrets/")
    assert secret in api.get("secrets", []), api.get("secrets")
    assert compose["secrets"][secret]["file"], compose["secrets"]
    for name, service in compose["services"].items():
        assert "LLMATCH_ADMIN_KEY" not in _environment(service), f"{name}: a key written into the compose file"
        if name != "api":
            assert not service.get("secrets"), f"{name} does not need the admin key"
    image_env = " ".join(rest for keyword, rest in _final_stage() if keyword == "ENV")
    assert "LLMATCH_ADMIN_KEY=" not in image_env
    assert not [rest for _, rest in _instructions() if "--insecure-no-auth" in rest]


def test_secrets_stay_out_of_the_image():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert _ignored("secrets", patterns), "the secrets folder would be sent to the build context"


@pytest.mark.skipif(_cli_missing(), reason="llmatch.cli does not exist yet")
def test_cli_offers_the_key_commands_the_deploy_files_name():
    assert "--insecure-no-auth" in _cli_help("serve", "--help")
    keys = _cli_help("keys", "--help")
    for action in ("create", "list", "revoke"):
        assert action in keys, keys
    create = _cli_help("keys", "create", "--help")
    for option in ("--name", "--scope", "--expires"):
        assert option in create, create
