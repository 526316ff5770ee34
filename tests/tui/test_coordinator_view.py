"""The dashboard shows who coordinates: the monitor reads it from the nodes holding the
newest plan, the nodes table stars it, and a recovery's event says who noticed, who took
over, the new plan and how many requests resumed (once, however many nodes report it)."""

from __future__ import annotations

from console.monitor import ClusterMonitor, NodeView, recovery_event
from console.tui.app import ClusterApp
from protos import cluster_pb2 as pb
from tests.tui.fake import FakeMonitor

LABELS = {"aaa": "local-0", "bbb": "local-1", "ccc": "local-2"}


def plan(epoch: int, *shards: tuple[str, int, int]) -> pb.Plan:
    return pb.Plan(model="synthetic:tiny", epoch=epoch, n_layers=8, shards=[
        pb.PlanShard(node_id=n, start_layer=a, end_layer=b) for n, a, b in shards])


def view(node_id: str, state: str = "up", coordinator: str = "",
         held: pb.Plan | None = None) -> NodeView:
    info = pb.NodeInfo(node_id=node_id, name=LABELS[node_id], coordinator=coordinator)
    if held is not None:
        info.plan.CopyFrom(held)
    return NodeView(f"127.0.0.1:{ord(node_id[0])}", node_id, LABELS[node_id], state, info)


def monitor_of(*views: NodeView) -> ClusterMonitor:
    monitor = ClusterMonitor(["127.0.0.1:1"])
    monitor.nodes = {v.address: v for v in views}
    return monitor


def test_a_takeover_names_who_noticed_the_new_coordinator_the_plan_and_resumed_requests():
    new = plan(4, ("bbb", 0, 3), ("ccc", 4, 7))
    kind, text = recovery_event(pb.Recovery(
        from_epoch=3, to_epoch=4, lost=["aaa"], coordinator="bbb", noticed_by="ccc",
        resumed_requests=2, detect_s=0.5, replan_s=0.01, reload_s=0.3, first_token_s=0.1),
        LABELS, new, previous="aaa")
    assert kind == "recovery"
    assert text.startswith("local-0 lost: noticed by local-2, local-1 took over as "
                           "coordinator; epoch 3->4 local-1 0-3, local-2 4-7; "
                           "2 requests resumed; detect 0.50 s")
    assert "first token 0.10 s" in text


def test_losing_another_node_keeps_the_coordinator():
    _, text = recovery_event(pb.Recovery(from_epoch=3, to_epoch=4, lost=["ccc"],
                                         coordinator="aaa", noticed_by="aaa",
                                         resumed_requests=1), LABELS)
    assert "noticed by local-0, coordinator local-0" in text and "took over" not in text
    assert "1 request resumed" in text


def test_the_old_plans_coordinator_decides_whether_it_was_a_takeover():
    lost_first = pb.Recovery(from_epoch=3, to_epoch=4, lost=["aaa"], coordinator="bbb")
    assert "coordinator local-1;" in recovery_event(lost_first, LABELS, previous="bbb")[1]
    lost_it = pb.Recovery(from_epoch=3, to_epoch=4, lost=["ccc"], coordinator="aaa")
    assert "local-0 took over as coordinator" in recovery_event(lost_it, LABELS,
                                                                previous="ccc")[1]
    unknown = recovery_event(lost_first, LABELS)[1]  # not seen: no claim of a takeover
    assert "coordinator local-1;" in unknown and "took over" not in unknown


def test_a_recovery_from_nodes_that_report_no_coordinator_still_reads_well():
    _, text = recovery_event(pb.Recovery(from_epoch=1, to_epoch=2, lost=["ccc"]), LABELS)
    assert text.startswith("local-2 lost; epoch 1->2; 0 requests resumed")


def test_a_failed_recovery_is_an_error():
    assert recovery_event(pb.Recovery(lost=["ccc"], error="does not fit"), LABELS) == (
        "error", "recovery from the loss of local-2 failed: does not fit")


def test_the_coordinator_is_what_the_newest_plans_nodes_report():
    old, new = plan(1, ("aaa", 0, 7)), plan(2, ("bbb", 0, 3), ("ccc", 4, 7))
    monitor = monitor_of(view("aaa", "down", "aaa", old), view("bbb", "up", "bbb", new),
                         view("ccc", "up", "bbb", new))
    assert monitor.coordinator() == "bbb"
    assert monitor_of(view("bbb", held=new), view("ccc", held=new)).coordinator() == ""
    assert monitor_of(view("aaa")).coordinator() == ""  # nothing loaded


def test_a_recovery_every_survivor_reports_is_logged_once():
    new = plan(2, ("bbb", 0, 3), ("ccc", 4, 7))
    b, c = view("bbb", held=new), view("ccc", held=new)
    monitor = monitor_of(view("aaa", "down"), b, c)
    for v in (b, c):  # what was there when watching began: epoch 1 coordinated by aaa
        monitor._note_recoveries(v, pb.NodeInfo(coordinator="aaa", plan=plan(1)))
    record = pb.Recovery(from_epoch=1, to_epoch=2, lost=["aaa"], coordinator="bbb",
                         noticed_by="ccc")
    for v in (b, c):
        v.info.recoveries.append(record)
        monitor._note_recoveries(v, v.info)
    recoveries = [e.text for e in monitor.events if e.kind == "recovery"]
    assert len(recoveries) == 1
    assert "local-1 took over as coordinator; epoch 1->2 local-1 0-3, local-2 4-7" in (
        recoveries[0])


async def test_the_nodes_table_stars_the_coordinator():
    fake = FakeMonitor(takeover=True)
    app = ClusterApp(fake, start_monitor=False)
    async with app.run_test(size=(120, 40)):
        table = app.query_one("#nodes")
        names = {a: str(table.get_cell(a, "node")) for a in fake.nodes}
        assert [n for n in names.values() if "★" in n] == ["local-1 ★"]
        assert table.border_subtitle == "★ coordinator"
        assert any("took over as coordinator" in e.text for e in fake.events)


def test_a_join_names_who_joined_the_new_plan_and_no_loss():
    new = plan(5, ("aaa", 0, 2), ("bbb", 3, 5), ("ccc", 6, 7))
    kind, text = recovery_event(pb.Recovery(
        from_epoch=4, to_epoch=5, joined=["ccc"], coordinator="aaa", replan_s=0.01,
        reload_s=0.3), LABELS, new)
    assert kind == "join"
    assert text.startswith("local-2 joined: coordinator local-0; epoch 4->5 ")
    assert "local-2 6-7" in text and "lost" not in text
