"""Tables served by shards on Ray (``engram-export serve-tables``, ``EngramRuntime(tables="ray://NAME")``).

One local Ray cluster of two nodes for the module, started here (Ray's ``cluster_utils``): every server
of it listens on 127.0.0.1 only (Ray
takes a node's address from its route to the internet unless clusters are off, which
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says; it then binds to loopback), with Ray's token
authentication on. Answers must equal the local runtime's bit for bit for both families (the demo's u4
table, whose packed zero points cross shard boundaries, and DeepSeek-V4.1's FP8 + E8M0), with 2 and 4
shards and replicas; a replica killed while 4 threads make 200 calls; a shard down past the deadline,
then repaired; foreign shards refused; tiered shards; a folder of ONNX served too (the others are
compiled: their shards load no ONNX or PyTorch, and start in about a second).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engram_export.core.errors import EngramError, EngramUnavailable
from engram_export.core.text import token_stream, windows
from engram_export.folders import export_checkpoint
from engram_export.folders.synthetic import write_v41_checkpoint
from engram_export.runtime import EngramRuntime
from engram_export.sharding.layout import Piece, plan_shards
from tests.helpers import package_prose, refused, run_cli
from tests.v41_spec import TINY

# one cluster: every test of this module on one worker; a Ray cluster and its shard processes take a
# while to start: slow
pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    environment = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the node's address is 127.0.0.1: nothing listens outside
        "RAY_AUTH_MODE": "token",
        # Ray keeps the token it read when first imported in this process (a bench of this worker may
        # have started a cluster before): the same token, or the driver cannot speak to the new cluster
        "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    saved = {key: os.environ.get(key) for key in [*environment, "RAY_ADDRESS"]}
    os.environ.update(environment)
    import ray
    from ray.cluster_utils import Cluster

    from engram_export.sharding.names import NAMESPACE

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 128 << 20, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=1, object_store_memory=128 << 20)  # two nodes: replicas go on different ones
    ray.init(address=nodes.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    nodes.wait_for_nodes()
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    os.environ["RAY_ADDRESS"] = address
    try:
        yield ray
    finally:
        ray.shutdown()
        nodes.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def folders(text_folders, tmp_path_factory):
    """The demo's u4 and f32 IR and DeepSeek-V4.1's FP8 tables in f32 IR (``text_folders``), and one V4.1
    layer exported (an ONNX folder of its own small checkpoint)."""
    checkpoint = write_v41_checkpoint(
        tmp_path_factory.mktemp("sharding") / "ckpt",
        {**TINY, "engram_layer_ids": [1], "engram_num_embeddings": TINY["engram_num_embeddings"][:1]},
        seed=2,
        tokenizer=True,
    )
    return {
        "demo u4": text_folders["demo u4"],
        "demo f32": text_folders["demo f32"],
        "v41 fp8": text_folders["v41 f32"],
        "one layer onnx": export_checkpoint(checkpoint, checkpoint.parent / "one_layer_onnx"),
    }


@pytest.fixture(scope="module")
def u4_tables(cluster, folders):
    """The demo u4 folder served as ``u4``: 4 shards, 2 replicas each, on different nodes."""
    from engram_export.sharding.cluster import describe, serve_tables, stop_tables

    layout = serve_tables(folders["demo u4"], "u4", shards=4, replicas=2)
    assert layout["spread"] and all(layout["nodes"][f"{s}.0"] != layout["nodes"][f"{s}.1"] for s in range(4))
    assert "the replicas of each shard are on different nodes" in describe(layout)
    yield "u4"
    stop_tables("u4")


def _wait_until_gone(ray, name: str, timeout: float = 10.0) -> None:
    """Until no actor goes by ``name`` (a killed actor's name is free a moment after the kill)."""
    from engram_export.sharding.names import NAMESPACE

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # no such actor
            return
        time.sleep(0.02)
    pytest.fail(f"{name} is still there {timeout:g} s after it was killed")


def _inputs(runtime, batch: int, tokens: int, seed: int):
    config, rng = runtime.config, np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (batch, tokens))
    hidden = rng.standard_normal((batch, tokens, config.hc_mult, config.hidden_size)).astype(np.float32)
    mask = rng.random((batch, tokens)) > 0.2 if runtime.info.takes_mask else None
    return ids, hidden, mask


def test_shards_are_cut_at_hash_heads_and_balanced_by_bytes():
    plans = plan_shards({1: [5, 7, 11], 3: [13, 17]}, {1: 10.0, 3: 20.0}, 3)
    assert [plan.pieces for plan in plans] == [
        (Piece(1, 0, 23),),
        (Piece(3, 0, 13),),
        (Piece(3, 13, 30),),
    ]
    assert [plan.nbytes for plan in plans] == [230, 260, 340]
    assert len(plan_shards({1: [5, 7, 11]}, {1: 1.0}, 3)) == 3  # one head each
    with pytest.raises(EngramError, match="shards must be 1 to 3"):
        plan_shards({1: [5, 7, 11]}, {1: 1.0}, 4)


def test_remote_tables_equal_the_local_runtime(cluster, folders, u4_tables, tmp_path, monkeypatch):
    """Both families bit for bit: one-shot calls, prefetches in flight across every shard, lookup,
    decode sessions, the PyTorch module. No replica fails, so no call fails over or hedges (the hedge
    delay is lengthened here: on 2 loaded cores a replica may well take 100 ms, which is timing)."""
    import engram_export.sharding.client as client_module

    monkeypatch.setattr(client_module, "_HEDGE_S", 30.0)
    local, remote = EngramRuntime(folders["demo u4"]), EngramRuntime(folders["demo u4"], tables="ray://u4")
    done = run_cli("serve-tables", folders["v41 fp8"], "--name", "v41", "--shards", "2")
    assert done.returncode == 0, done.stderr
    assert "2 shard(s) x 1 replica(s)" in done.stdout
    try:
        pairs = [(local, remote)]
        for precision in (None, "bf16"):
            pairs.append(
                (
                    EngramRuntime(folders["v41 fp8"], precision=precision),
                    EngramRuntime(folders["v41 fp8"], precision=precision, tables="ray://v41"),
                )
            )
        # a client without the table files at all (the shards hold them): the same answers
        client = tmp_path / "client"
        client.mkdir()
        for file in folders["v41 fp8"].iterdir():
            if not file.name.endswith(".safetensors"):
                os.link(file, client / file.name)
        assert len(list(client.iterdir())) < len(list(folders["v41 fp8"].iterdir()))
        pairs.append((EngramRuntime(folders["v41 fp8"]), EngramRuntime(client, tables="ray://v41")))
        with pytest.raises(EngramError, match="safetensors"):  # a local runtime still needs them
            EngramRuntime(client)
        for here, there in pairs:
            for batch, tokens in ((50, 14), (1, 1), (3, 17)):
                ids, hidden, mask = _inputs(here, batch, tokens, seed=batch)
                handles = [there.prefetch(ids, mask) for _ in range(3)]  # in flight together
                for layer in here:
                    expected = here[layer](ids, hidden, mask)
                    assert np.array_equal(there[layer](ids, hidden, mask), expected, equal_nan=True)
                    for handle in handles:
                        assert np.array_equal(there[layer].fuse(handle, hidden), expected, equal_nan=True)
                    assert np.array_equal(there[layer].lookup(ids, mask), here[layer].lookup(ids, mask), equal_nan=True)
            ids, hidden, mask = _inputs(here, 2, 6, seed=7)
            sessions = [runtime.session(2) for runtime in (here, there)]
            per_layer = {layer: hidden[:, :3] for layer in here}
            first, second = (s.prefill(ids[:, :3], per_layer, None if mask is None else mask[:, :3]) for s in sessions)
            assert all(np.array_equal(first[layer], second[layer], equal_nan=True) for layer in here)
            for step in range(3, 6):
                step_hidden = {layer: hidden[:, step : step + 1] for layer in here}
                step_mask = None if mask is None else mask[:, step : step + 1]
                sessions[1].prefetch(ids[:, step : step + 1], step_mask)
                first, second = (s.step(ids[:, step : step + 1], step_hidden, step_mask) for s in sessions)
                assert all(np.array_equal(first[layer], second[layer], equal_nan=True) for layer in here)
        import torch

        layer = next(iter(local))
        ids, hidden, _ = _inputs(local, 2, 5, seed=3)
        module = remote.as_torch()[layer]
        assert np.array_equal(
            module(torch.from_numpy(ids), torch.from_numpy(hidden)).numpy(), local[layer](ids, hidden)
        )
        stats = remote[layer].table_stats()
        assert stats["calls"] > 0 and stats["requests"] >= stats["calls"] and stats["bytes"] > 0
        assert stats["prefetched_calls"] > 0 and stats["failovers"] == 0 and stats["hedges"] == 0
    finally:
        done = run_cli("serve-tables", "--stop", "--name", "v41")
        assert done.returncode == 0 and "2 shard replica(s) ended" in done.stdout, done


def test_the_row_api_reads_shards_as_local_tables(cluster, folders, u4_tables):
    """``EngramRows(tables="ray://...")``: every form, -1 and a rank's share (``owned``), bit for bit as
    the local folder's rows (u4 codes with zero points: the packed form carries them a byte a group)."""
    from engram_export.runtime.rows import EngramRows

    local, remote = EngramRows(folders["demo u4"]), EngramRows(folders["demo u4"], tables="ray://u4")
    for layer in local:
        size = local[layer].table_rows
        ids = np.random.default_rng(layer).integers(-1, size, (50, 14, 8))
        for form in ("f32", "bf16", "packed", "codes", "scales"):
            for owned in (None, (size // 4, size // 2)):
                expected = local.read(layer, ids, form=form, owned=owned)
                assert np.array_equal(remote.read(layer, ids, form=form, owned=owned), expected), (form, owned)
        assert np.array_equal(
            remote.start(layer, ids[:1], form="packed").wait(), local.read(layer, ids[:1], form="packed")
        )
        stats = remote[layer].stats()
        assert stats["reads"] == 11 and stats["remote_calls"] == 11 and stats["remote_rows"] > 0, stats
        with pytest.raises(EngramError, match=f"row id {size} "):
            remote.read(layer, np.array([size]), form="packed")


def test_tiered_shards_equal_the_local_runtime(cluster, folders, tmp_path):
    """Shards of a calibrated folder keep their hot rows in memory and read the rest from the file;
    the rows of a call, some hot and some not, come back merged in order (u4 zero points too)."""
    from engram_export.folders.calibration import calibrate
    from engram_export.sharding.cluster import serve_tables, stop_tables

    (tmp_path / "prose.txt").write_text(package_prose()[:60_000])
    calibrated = tmp_path / "calibrated"
    report = calibrate(folders["demo u4"], calibrated, [tmp_path / "prose.txt"], "30%")
    assert all(0 < entry["hot_rows"] < entry["rows_reached"] + 1 for entry in report["layers"].values())
    serve_tables(calibrated, "tiered", shards=3, replicas=1, table_memory="tiered")
    try:
        local, remote = EngramRuntime(calibrated), EngramRuntime(calibrated, tables="ray://tiered")
        stream = token_stream(local.config.tokenizer, [tmp_path / "prose.txt"])
        for batch, tokens in ((50, 14), (2, 3)):
            _, hidden, _ = _inputs(local, batch, tokens, seed=batch)
            ids = windows(stream, tokens, batch)  # the calibration text: hot rows and others in one call
            for layer in local:
                assert np.array_equal(remote[layer](ids, hidden), local[layer](ids, hidden))
    finally:
        stop_tables("tiered")
    refused(
        run_cli("serve-tables", folders["demo u4"], "--name", "t2", "--table-memory", "tiered"),
        "--table-memory tiered serves a folder made by engram-export calibrate",
    )


def test_a_replica_killed_during_200_calls_from_4_threads(cluster, folders, u4_tables, monkeypatch):
    """Every answer right: the calls in flight on the killed replica fail over to the other one. The
    actor calls alone (a kill under the compiled graph: ``test_a_shard_killed_under_the_fast_path...``):
    the graph, on either replica, would take most calls and leave the kill none to reach."""
    from engram_export.sharding.client import ShardedTables
    from engram_export.sharding.names import NAMESPACE, replica_name

    monkeypatch.setattr(ShardedTables, "_fast_read", lambda self, layer, rows: None)

    local, remote = EngramRuntime(folders["demo u4"]), EngramRuntime(folders["demo u4"], tables="ray://u4")
    layer = next(iter(local))
    inputs = [_inputs(local, 4, 3, seed) for seed in range(8)]
    expected = [local[layer](ids, hidden) for ids, hidden, _ in inputs]
    victim = cluster.get_actor(replica_name("u4", 1, 0), namespace=NAMESPACE)
    pid = cluster.get(victim.identity.remote())["pid"]
    wrong, errors, calls = [], [], [0]
    lock = threading.Lock()

    def work(thread: int) -> None:
        for call in range(50):
            index = (thread + call) % len(inputs)
            try:
                got = remote[layer](inputs[index][0], inputs[index][1])
            except Exception as exc:  # a wrong answer or an error fails the test below
                errors.append(exc)
                continue
            with lock:
                calls[0] += 1
            if not np.array_equal(got, expected[index]):
                wrong.append(index)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    while calls[0] < 40:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join()
    assert not errors and not wrong and calls[0] == 200, (errors[:1], wrong[:5])
    stats = remote[layer].table_stats()
    assert stats["failovers"] + stats["hedges"] >= 1  # the kill did reach calls
    deadline = time.monotonic() + 60  # Ray starts the killed replica again
    while time.monotonic() < deadline:
        try:
            if cluster.get(victim.identity.remote(), timeout=5)["pid"] != pid:
                break
        except Exception:
            time.sleep(0.2)
    else:
        pytest.fail("Ray did not restart the killed replica")


def test_a_shard_down_past_the_deadline_is_one_line_then_repaired(cluster, folders, u4_tables):
    from engram_export.sharding.names import NAMESPACE, replica_name

    local = EngramRuntime(folders["demo u4"])
    remote = EngramRuntime(folders["demo u4"], tables="ray://u4", shard_deadline=1)
    ids, hidden, _ = _inputs(local, 50, 14, seed=11)
    layers = list(local)
    for replica in range(2):  # shard 2 holds rows of the second layer
        cluster.kill(cluster.get_actor(replica_name("u4", 2, replica), namespace=NAMESPACE), no_restart=True)
    began = time.monotonic()
    with pytest.raises(
        EngramUnavailable, match=r"shard 2 of tables 'u4' \(layer \d+ rows .*\) is down: no replica answered within 1 s"
    ):
        remote[layers[1]](ids, hidden)
    assert 1 <= time.monotonic() - began < 10
    handle = remote.prefetch(ids)
    with pytest.raises(EngramUnavailable, match="shard 2 of tables 'u4'"):
        remote[layers[1]].fuse(handle, hidden)
    done = run_cli("serve-tables", "--repair", "--name", "u4")
    assert done.returncode == 0 and "2 replica(s) started again" in done.stdout, done
    for layer in layers:  # the same runtime, recovered
        assert np.array_equal(remote[layer](ids, hidden), local[layer](ids, hidden))


def test_foreign_tables_and_shards_are_refused(cluster, folders, u4_tables):
    from engram_export.sharding.cluster import repair_tables, served_layout
    from engram_export.sharding.layout import ShardPlan
    from engram_export.sharding.names import NAMESPACE, replica_name
    from engram_export.sharding.shard import TableShard

    with pytest.raises(EngramError, match="ray://u4 serves another table for layer 1 than") as foreign:
        EngramRuntime(folders["demo f32"], tables="ray://u4")
    assert not isinstance(foreign.value, EngramUnavailable)  # the user's mistake: exit 2, not 3
    with pytest.raises(EngramError, match="ray://u4 serves another table for layer 1 than"):
        EngramRuntime(folders["v41 fp8"], tables="ray://u4")
    with pytest.raises(EngramError, match=r"ray://u4 serves layers \[1, 3\]; .* has layers \[1\]"):
        EngramRuntime(folders["one layer onnx"], tables="ray://u4")
    with pytest.raises(EngramError, match="no tables named 'nothing' are served on this Ray cluster") as unknown:
        EngramRuntime(folders["demo u4"], tables="ray://nothing")
    assert not isinstance(unknown.value, EngramUnavailable)
    # an actor under a replica's name that serves another shard's rows
    layout = served_layout("u4")
    for replica in range(2):
        cluster.kill(cluster.get_actor(replica_name("u4", 0, replica), namespace=NAMESPACE), no_restart=True)
    other = ShardPlan.from_dict(layout["shards"][1])
    impostor = (
        cluster.remote(TableShard)
        .options(name=replica_name("u4", 0, 0), namespace=NAMESPACE, lifetime="detached", num_cpus=0)
        .remote(layout["folder"], "u4", other.to_dict(), layout["identities"], "mmap")
    )
    cluster.get(impostor.identity.remote())
    with pytest.raises(
        EngramError, match=r"u4.shard0.replica0 serves another table or rows than the layout"
    ) as impostor_error:
        EngramRuntime(folders["demo u4"], tables="ray://u4")
    assert not isinstance(impostor_error.value, EngramUnavailable)
    cluster.kill(impostor, no_restart=True)
    _wait_until_gone(cluster, replica_name("u4", 0, 0))
    assert sorted(repair_tables("u4")) == ["u4.shard0.replica0", "u4.shard0.replica1"]
    remote = EngramRuntime(folders["demo u4"], tables="ray://u4")
    ids, hidden, _ = _inputs(remote, 3, 4, seed=5)
    local = EngramRuntime(folders["demo u4"])
    assert all(np.array_equal(remote[layer](ids, hidden), local[layer](ids, hidden)) for layer in local)


def test_a_folder_of_onnx_is_served_too(cluster, folders):
    """The shards of an exported (ONNX) folder convert its models as a runtime does (and load PyTorch and
    ONNX for that: the shards of a compiled folder start sooner)."""
    from engram_export.sharding.cluster import serve_tables, stop_tables

    serve_tables(folders["one layer onnx"], "onnx", shards=1)
    try:
        local = EngramRuntime(folders["one layer onnx"])
        remote = EngramRuntime(folders["one layer onnx"], tables="ray://onnx")
        ids, hidden, mask = _inputs(local, 3, 17, seed=4)
        assert np.array_equal(remote[1](ids, hidden, mask), local[1](ids, hidden, mask), equal_nan=True)
    finally:
        stop_tables("onnx")


def test_a_shard_of_a_compiled_folder_loads_neither_onnx_nor_pytorch(u4_tables):
    """What a replica's process imports to start (``shard.py``, then the folder's models): no ONNX (its
    ml_dtypes alone takes a second to import), PyTorch or NNCF."""
    from engram_export.sharding.cluster import served_layout

    code = (
        "import json, sys\n"
        "from engram_export.sharding.shard import TableShard\n"
        "layout = json.loads(sys.argv[1])\n"
        "shard = TableShard(layout['folder'], layout['name'], layout['shards'][0], layout['identities'], 'mmap')\n"
        "print(sorted({'onnx', 'onnx_ir', 'torch', 'nncf'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(served_layout(u4_tables))], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_refusals(cluster, folders, u4_tables, tmp_path):
    refused(run_cli("serve-tables", folders["demo u4"], "--name", "u4"), "tables named 'u4' are already served")
    refused(run_cli("serve-tables", folders["demo u4"], "--name", "x y"), "a tables name is 1-64 letters")
    refused(run_cli("serve-tables", folders["demo u4"], "--name", "x", "--shards", "0"), "shards must be a positive")
    refused(run_cli("serve-tables", folders["demo u4"], "--name", "x", "--shards", "999"), "shards must be 1 to")
    refused(
        run_cli("serve-tables", folders["demo u4"], "--name", "x", "--replicas", "100000000"),
        "need",  # more memory than the cluster has, with both numbers
    )
    refused(run_cli("serve-tables", "--stop", "--name", "x"), "no tables named 'x' are served")
    refused(run_cli("serve-tables", tmp_path, "--name", "x"), "manifest")
    with pytest.raises(EngramError, match="tables must be ray://NAME"):
        EngramRuntime(folders["demo u4"], tables="u4")
    with pytest.raises(EngramError, match="need the OpenVINO runtime"):
        EngramRuntime(folders["demo u4"], tables="ray://u4", runtime="ort")
    with pytest.raises(EngramError, match="the shards place theirs"):
        EngramRuntime(folders["demo u4"], tables="ray://u4", table_memory="populate")
    with pytest.raises(EngramError, match="shard_deadline must be seconds"):
        EngramRuntime(folders["demo u4"], tables="ray://u4", shard_deadline=0)
    with pytest.raises(EngramError, match="serves the layers of a folder"):
        EngramRuntime(folders["demo u4"] / "layer_1.xml", tables="ray://u4")
    with pytest.raises(EngramError, match="profile times the stages of a local table"):
        runtime = EngramRuntime(folders["demo u4"], tables="ray://u4", ov_config={"PERF_COUNT": True})
        ids, hidden, _ = _inputs(runtime, 1, 2, seed=0)
        runtime[1].profile(ids, hidden)


def test_an_unreachable_cluster_is_one_line(folders):
    """The address given is tried before Ray's own connection, which retries for minutes (a process of
    its own: this one is joined to the test cluster); a resource not there, not a mistake: exit 3."""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_export.cli",
            "serve-tables",
            folders["demo u4"],
            "--name",
            "x",
            "--address",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr.count("\n")) == (3, "", 1), done
    assert done.stderr.startswith("engram-export: error: cannot reach a Ray cluster at '127.0.0.1:1'"), done.stderr


def test_the_manual_runs(cluster, tmp_path):
    """docs/sharding.md's example, in this module's cluster (it starts one of its own elsewhere)."""
    from pathlib import Path

    from tests.helpers import run_examples

    run_examples(Path(__file__).parents[1] / "docs" / "sharding.md", tmp_path)


def _fast_calls(rows, layer: int, ids, timeout: float = 120.0) -> int:
    """Read until the compiled graph served a call (it is built on a thread of its own); its fast_calls."""
    deadline = time.monotonic() + timeout
    while (calls := rows[layer].stats()["remote_fast_calls"]) == 0 or rows[layer]._remote._fast is None:
        error = rows[layer]._remote.fast_path_error
        assert time.monotonic() < deadline, f"the compiled graph served no call in {timeout:g} s: {error}"
        rows.read(layer, ids[:1], form="packed")
        time.sleep(0.05)
    return calls


def _close_graphs(rows) -> None:
    """Tear down a client's compiled graph before its tables are stopped (a graph whose actors are killed
    under it is torn down by Ray's monitor thread, which logs each actor's death)."""
    for layer in rows:
        rows[layer]._remote.close()


def test_the_fast_path_reads_rows_equal_to_local_tables(cluster, folders, monkeypatch):
    """V4.1's FP8 rows through the compiled graph (opt-in), bit for bit, every form; every read counted there."""
    from engram_export.runtime.rows import EngramRows
    from engram_export.sharding.client import GRAPH_SWITCH
    from engram_export.sharding.cluster import serve_tables, stop_tables

    monkeypatch.setenv(GRAPH_SWITCH, "1")

    serve_tables(folders["v41 fp8"], "fast", shards=2, replicas=1)
    remote = None
    try:
        local, remote = EngramRows(folders["v41 fp8"]), EngramRows(folders["v41 fp8"], tables="ray://fast")
        for layer in local:
            ids = np.random.default_rng(layer).integers(-1, local[layer].table_rows, (64, 24))
            before = _fast_calls(remote, layer, ids)
            for form in ("f32", "bf16", "packed", "codes", "scales"):
                for shape in ((1, 24), (8, 24), (64, 24)):
                    got = remote.read(layer, ids[: shape[0]], form=form)
                    assert np.array_equal(got, local.read(layer, ids[: shape[0]], form=form)), (form, shape)
            stats = remote[layer].stats()
            assert stats["remote_fast_calls"] == before + 15 and stats["remote_fast_failures"] == 0, stats
    finally:
        if remote is not None:
            _close_graphs(remote)
        stop_tables("fast")


def test_a_shard_killed_under_the_fast_path_falls_back_then_rebuilds(cluster, folders, monkeypatch):
    """Both replicas of a shard killed (SIGKILL; Ray starts them again) while reads run on the compiled
    graph: every read right (through the actor calls, waiting for the restart), then the graph built again.
    Tables of its own: none of their replicas was killed before."""
    from engram_export.runtime.rows import EngramRows
    from engram_export.sharding.client import GRAPH_SWITCH
    from engram_export.sharding.cluster import serve_tables, stop_tables
    from engram_export.sharding.names import NAMESPACE, replica_name

    monkeypatch.setenv(GRAPH_SWITCH, "1")
    serve_tables(folders["v41 fp8"], "fastkill", shards=2, replicas=2)
    remote = None
    try:
        local, remote = EngramRows(folders["v41 fp8"]), EngramRows(folders["v41 fp8"], tables="ray://fastkill")
        layer = next(iter(local))
        ids = np.random.default_rng(3).integers(0, local[layer].table_rows, (8, 24))
        expected = local.read(layer, ids, form="packed")
        before = _fast_calls(remote, layer, ids)
        victims = [cluster.get_actor(replica_name("fastkill", 0, r), namespace=NAMESPACE) for r in range(2)]
        pids = [cluster.get(victim.identity.remote())["pid"] for victim in victims]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for _ in range(20):
            assert np.array_equal(remote.read(layer, ids, form="packed"), expected)
        stats = remote[layer].stats()
        assert stats["remote_fast_failures"] >= 1, stats
        deadline = time.monotonic() + 120
        while remote[layer].stats()["remote_fast_calls"] <= stats["remote_fast_calls"]:
            error = remote[layer]._remote.fast_path_error
            assert time.monotonic() < deadline, f"the compiled graph was not built again: {error}"
            assert np.array_equal(remote.read(layer, ids, form="packed"), expected)
            time.sleep(0.05)
        assert remote[layer].stats()["remote_fast_calls"] > before
    finally:
        if remote is not None:
            _close_graphs(remote)
        stop_tables("fastkill")


def test_tables_made_again_under_the_fast_path(cluster, folders, monkeypatch):
    """Every replica killed for good, then made again (``repair_tables``: new actors under the same names)
    while a client reads through the compiled graph: past the deadline each read fails in one line, never a
    wrong row; after the repair the same client reads right, through a graph built again over the new
    actors (resolved by name and checked, not the handles it kept)."""
    from engram_export.runtime.rows import EngramRows
    from engram_export.sharding.client import GRAPH_SWITCH
    from engram_export.sharding.cluster import repair_tables, serve_tables, stop_tables
    from engram_export.sharding.names import NAMESPACE, replica_name

    monkeypatch.setenv(GRAPH_SWITCH, "1")
    serve_tables(folders["v41 fp8"], "fastrepair", shards=2, replicas=2)
    remote = None
    try:
        local = EngramRows(folders["v41 fp8"])
        # a deadline that a loaded host's reads keep (1 s was missed while the graph was being built)
        remote = EngramRows(folders["v41 fp8"], tables="ray://fastrepair", shard_deadline=10)
        layer = next(iter(local))
        ids = np.random.default_rng(5).integers(0, local[layer].table_rows, (8, 24))
        expected = local.read(layer, ids, form="packed")
        before = _fast_calls(remote, layer, ids)
        for shard in range(2):
            for replica in range(2):
                victim = cluster.get_actor(replica_name("fastrepair", shard, replica), namespace=NAMESPACE)
                cluster.kill(victim, no_restart=True)
        with pytest.raises(EngramUnavailable, match="of tables 'fastrepair'.* is down") as refused:
            remote.read(layer, ids, form="packed")
        assert "\n" not in str(refused.value)
        assert len(repair_tables("fastrepair")) == 4
        deadline = time.monotonic() + 120
        while remote[layer].stats()["remote_fast_calls"] <= before:
            error = remote[layer]._remote.fast_path_error
            assert time.monotonic() < deadline, f"the compiled graph was not built again: {error}"
            assert np.array_equal(remote.read(layer, ids, form="packed"), expected)
            time.sleep(0.05)
        assert np.array_equal(remote.read(layer, ids, form="packed"), expected)
    finally:
        if remote is not None:
            _close_graphs(remote)
        stop_tables("fastrepair")
