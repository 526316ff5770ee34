"""Joining a plan, as pure decisions (who may be taken in, when; where a request goes
while a plan is on its way) and as the Join RPC on a real node."""

from __future__ import annotations

import time

import grpc
import pytest

from node.membership import Joiners, check_join, remember_plan, remembered, settled
from node.resume import Loading, NoEntry, Replanning, entry_of
from protos import cluster_pb2 as pb
from protos import cluster_pb2_grpc as pb_grpc
from tests.conftest import spawn_node

PLAN = pb.Plan(model="synthetic:tiny", epoch=3, auto_rejoin=True, rejoin_settle_s=10.0,
               shards=[pb.PlanShard(node_id="a", address="10.0.0.1:1"),
                       pb.PlanShard(node_id="b", address="10.0.0.2:1")])


def info(node_id: str, uptime_s: float = 20.0, epoch: int = 0, **kw) -> pb.NodeInfo:
    i = pb.NodeInfo(node_id=node_id, uptime_s=uptime_s, protocol_version=1, **kw)
    if epoch:
        i.shard.epoch = epoch
    return i


def test_a_joiner_is_taken_once_it_has_stayed_up_and_holds_no_newer_plan():
    joiners = Joiners()
    joiners.knock(pb.JoinRequest(node_id="c", address="10.0.0.3:9", name="c"))
    (c,) = joiners.pending(PLAN)
    assert settled(c, info("c"), PLAN, 1)
    assert not settled(c, info("c", uptime_s=9.0), PLAN, 1)  # flapping: not yet
    assert not settled(c, info("x"), PLAN, 1)  # another node answers at that address
    assert not settled(c, info("c"), PLAN, 2)  # another protocol
    assert not settled(c, info("c", epoch=4), PLAN, 1)  # serves a newer plan elsewhere
    assert settled(c, info("c", epoch=1), PLAN, 1)  # an old plan of its own is fine
    assert not settled(c, None, PLAN, 1)


def test_members_are_not_joiners_and_held_out_joiners_wait():
    joiners = Joiners()
    joiners.knock(pb.JoinRequest(node_id="a", address="10.0.0.9:1"))  # a member, restarted
    joiners.knock(pb.JoinRequest(node_id="c", address="10.0.0.3:1"))
    assert [j.node_id for j in joiners.pending(PLAN)] == ["c"]
    joiners.hold_out({"c"}, 60)
    assert joiners.pending(PLAN) == []
    joiners.forget({"c"})
    joiners.knock(pb.JoinRequest(node_id="d", address="10.0.0.4:1"))
    joiners._by_id["d"].knocked = time.monotonic() - 60  # stopped knocking long ago
    assert joiners.pending(PLAN) == []


def test_join_requests_are_checked():
    assert check_join(pb.JoinRequest(node_id="c", address="10.0.0.3:50051")) == ""
    assert "node id" in check_join(pb.JoinRequest(address="10.0.0.3:50051"))
    for bad in ("", "10.0.0.3", "10.0.0.3:0", "10.0.0.3:x", ":5"):
        assert "host:port" in check_join(pb.JoinRequest(node_id="c", address=bad)), bad


def test_a_node_remembers_its_plans_other_members(tmp_path):
    remember_plan(tmp_path, PLAN, "a")
    assert remembered(tmp_path) == ["10.0.0.2:1"]
    (tmp_path / "last_plan.json").write_text("{not json")
    assert remembered(tmp_path) == [] and remembered(None) == []


def holding(node_id: str, plan: pb.Plan, **kw) -> pb.NodeInfo:
    i = pb.NodeInfo(node_id=node_id, **kw)
    i.shard.epoch = plan.epoch
    i.plan.CopyFrom(plan)
    return i


def test_a_lost_entry_is_a_re_plan_on_its_way_not_a_reason_to_reload():
    survivor = holding("b", PLAN)
    with pytest.raises(Replanning, match="re-planning"):
        entry_of([survivor])
    failed = pb.Recovery(from_epoch=3, error="the model no longer fits: 2.0 GiB short")
    with pytest.raises(NoEntry, match="no longer fits") as e:
        entry_of([holding("b", PLAN, recoveries=[failed])])
    assert not isinstance(e.value, Replanning)
    alone = pb.Plan(model="m", epoch=2, shards=[pb.PlanShard(node_id="a")])
    with pytest.raises(NoEntry, match="reload the model"):
        entry_of([holding("b", alone)])  # a one-node plan has no survivors to re-plan
    loading = pb.NodeInfo(node_id="b", loading_epoch=4, loading_model="m")
    with pytest.raises(Loading):
        entry_of([survivor, loading])
    assert entry_of([holding("a", PLAN), survivor]).node_id == "a"


async def test_the_join_rpc_answers_bad_input_and_nodes_without_a_plan(tmp_path):
    proc, ready = spawn_node(tmp_path / "ready.json", "--no-advertise", "--state-dir",
                             str(tmp_path / "state"))
    try:
        async with grpc.aio.insecure_channel(ready["address"]) as channel:
            stub = pb_grpc.NodeServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Join(pb.JoinRequest(node_id="c", address="nowhere"), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            reply = await stub.Join(pb.JoinRequest(node_id="c", address="127.0.0.1:9"),
                                    timeout=5)
            assert not reply.accepted and reply.epoch == 0 and "no plan" in reply.detail
            assert (await stub.Heartbeat(pb.HeartbeatRequest(), timeout=5)).node_id
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
