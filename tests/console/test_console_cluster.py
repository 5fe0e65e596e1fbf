"""Two console nodes and two Triton servers on one PostgreSQL, one of each killed mid-queue.

Everything is real and in its own process: PostgreSQL (the suite's cluster),
two embedded Triton servers, and two consoles under gunicorn sharing the
database and a storage folder, as two pods on a ReadWriteMany volume would.
Both Triton servers are paused (SIGSTOP) while series go to both nodes, so
each node's worker is caught holding a claimed batch, waiting for inference;
then node A and Triton server 0 are killed (SIGKILL, no goodbye) and Triton
server 1 resumes. Every accepted slice must then be classified, exactly once
(a trigger in the database counts every write of a result), node A's batch
must come back when its lease ends, and the screen on the surviving node
must have seen every flag. (A flag crossing from one node's worker to the
other node's screens is tested in test_console_nodes.py.)
"""

import time

import pytest

from benchmarks.bench_time_to_alert import ct_ich_dev_source
from benchmarks.console_api import ConsoleApi
from benchmarks.stack import ConsoleServer, triton_on_free_ports
from build_engines.serve import missing_model_files
from console.db import connect
from tests.console.conftest import ADMIN, ON_POSTGRES, rows_of, wait_for

pytestmark = pytest.mark.skipif(
    not ON_POSTGRES, reason="needs PostgreSQL: run with HEMOTRIAGE_TEST_DATABASE=postgresql"
)

MODEL = "mobilenet_v2"
SERIES_PER_NODE, SLICES = 3, 24
#: Every write of a result, counted by the database itself (one row per UPDATE).
RESULT_LOG = """
CREATE TABLE result_log (slice_id BIGINT NOT NULL, node TEXT);
CREATE FUNCTION log_result() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO result_log VALUES (NEW.id, NEW.claimed_by); RETURN NEW; END $$;
CREATE TRIGGER slices_result AFTER UPDATE OF status ON slices
    FOR EACH ROW WHEN (NEW.status = 'classified') EXECUTE FUNCTION log_result();
"""


@pytest.fixture
def tritons():
    from build_engines.serve import ServeSettings

    if missing_model_files(ServeSettings.from_env(models=(MODEL,))):
        pytest.skip("model.onnx not built; run 'python -m build_engines export'")
    servers = []
    try:
        for _ in range(2):  # one at a time: each takes its free ports before the next looks
            servers.append(triton_on_free_ports((MODEL,)).start())
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_killing_a_node_and_a_triton_mid_queue_loses_and_repeats_nothing(
    postgres_cluster, tritons, tmp_path, shared_data
):
    url = postgres_cluster.create_database()
    shared = tmp_path / "shared-storage"
    settings = {
        "DATABASE_URL": url,
        "STORAGE_DIR": str(shared),
        "TRITON_URL": ",".join(t.grpc_url for t in tritons),
        "MODEL_NAME": MODEL,
        "BATCH_SIZE": "4",
        "CLAIM_LEASE_S": "5",
        "LEASE_CHECK_S": "0.5",
        "INBOX_DIR": "",
    }
    for node in "ab":
        (tmp_path / node).mkdir()  # each node's gunicorn log; the stored files are shared
    node_a = ConsoleServer(tmp_path / "a" / "storage", {**settings, "NODE_ID": "a"}, ADMIN)
    node_b = ConsoleServer(tmp_path / "b" / "storage", {**settings, "NODE_ID": "b"}, ADMIN)
    with node_a, node_b:
        db = connect(url)
        with db:
            for statement in RESULT_LOG.split(";\n"):
                if statement.strip():
                    db.execute(statement)
        db.close()
        token = node_a.token("cluster test")  # one database: valid on both nodes
        apis = {"a": ConsoleApi(node_a.url, token), "b": ConsoleApi(node_b.url, token)}
        with apis["b"].events() as screen_b:
            for triton in tritons:  # inference hangs: each worker keeps the batch it claims
                triton.pause()
            accepted = []
            bleeding = ct_ich_dev_source(shared_data, SLICES)  # a real bleed, flagged
            for _ in range(SERIES_PER_NODE):
                for api in apis.values():
                    series = bleeding.make()  # a new study label each time
                    accepted += api.upload(series.files, series.label)["slice_ids"]
            claimed_by_a = "SELECT id FROM slices WHERE status = 'processing' AND claimed_by = 'a'"
            assert wait_for(lambda: rows_of(url, claimed_by_a), 60), "node a never claimed a batch"
            held = {r["id"] for r in rows_of(url, claimed_by_a)}
            node_a.kill()
            tritons[0].kill()
            tritons[1].resume()
            unfinished = "SELECT 1 FROM slices WHERE status IN ('queued', 'processing')"
            assert wait_for(lambda: not rows_of(url, unfinished), 180), "node b left slices undone"
            flagged = {
                r["id"] for r in rows_of(url, "SELECT id FROM studies WHERE flagged_at IS NOT NULL")
            }
            seen = set()
            deadline = time.monotonic() + 10
            while flagged - seen and time.monotonic() < deadline:
                event = screen_b.get(0.5)
                if event is not None and event.data.get("status") == "flagged":
                    seen.add(event.data["id"])

    slices = rows_of(url, "SELECT id, status, error FROM slices ORDER BY id")
    assert sorted(r["id"] for r in slices) == sorted(accepted)  # 0 lost
    assert {r["status"] for r in slices} == {"classified"}, [r["error"] for r in slices]
    writes = rows_of(url, "SELECT slice_id, COUNT(*) AS n FROM result_log GROUP BY slice_id")
    assert {r["slice_id"]: r["n"] for r in writes} == dict.fromkeys(accepted, 1)  # 0 repeated
    by_node = {
        r["node"]: r["n"]
        for r in rows_of(url, "SELECT node, COUNT(*) AS n FROM result_log GROUP BY node")
    }
    assert by_node.get("b", 0) > 0 and sum(by_node.values()) == len(accepted)
    # The batch node a died holding came back when its lease ran out, and node b did it.
    retaken = rows_of(
        url, "SELECT id, attempts, claimed_by FROM slices WHERE id = ANY(?)", list(held)
    )
    assert len(retaken) == len(held) and held
    assert all(r["claimed_by"] == "b" and r["attempts"] >= 2 for r in retaken)
    assert len(flagged) == 2 * SERIES_PER_NODE  # every series has its bleed
    assert flagged <= seen  # the surviving node's screen saw every flag
