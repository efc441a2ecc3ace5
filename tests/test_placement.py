"""Placement: bundles pinned to node resources, checks against each node's resources before any actor
starts (CPUs, whole and fractional GPUs, custom resources), and torch threads = the CPUs an actor got."""

import time
from contextlib import contextmanager

import pytest

from distpg.config import ConfigError
from distpg.orchestrator import NODE_RESOURCE_UNIT, Trainer, plan_placement, train
from tests.conftest import small_config

# three 2-CPU nodes as cluster/local-cluster.sh starts them; the last one has a GPU
NODES = [{"CPU": 2, "distpg_node_0": 1, "memory": 1e9}, {"CPU": 2, "distpg_node_1": 1},
         {"CPU": 2, "GPU": 1, "distpg_node_2": 1}]


def test_workers_are_pinned_round_robin_and_the_learner_where_asked():
    cfg = small_config("rollout.num_workers=3", "rollout.num_cpus_per_worker=1", "run.device=cpu",
                       "rollout.node_resource=[distpg_node_1, distpg_node_2]", "learner.node_resource=distpg_node_0")
    p = plan_placement(cfg, cpus=6, gpus=1, nodes=NODES)
    u = NODE_RESOURCE_UNIT
    assert p.bundles(3) == [{"CPU": 1.0, "distpg_node_0": u}, {"CPU": 1.0, "distpg_node_1": u},
                            {"CPU": 1.0, "distpg_node_2": u}, {"CPU": 1.0, "distpg_node_1": u}]
    one = plan_placement(small_config("rollout.node_resource=distpg_node_2", "run.device=cpu"), 6, 1, NODES)
    assert [b.get("distpg_node_2") for b in one.bundles(2)] == [None, u, u]
    free = plan_placement(small_config("run.device=cpu"), 6, 1, NODES)
    assert free.bundles(2) == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]  # no pinning: Ray decides


def test_a_node_resource_the_cluster_lacks_is_named_with_the_ones_it_has():
    with pytest.raises(ConfigError, match=r"rollout.node_resource='gpu_pool': no alive node .* distpg_node_0, "
                                          r"distpg_node_1, distpg_node_2"):
        plan_placement(small_config("rollout.node_resource=gpu_pool", "run.device=cpu"), 6, 1, NODES)
    with pytest.raises(ConfigError, match="learner.node_resource='x'"):
        plan_placement(small_config("learner.node_resource=x", "run.device=cpu"), 6, 1, NODES)


def test_pinned_actors_must_fit_on_the_nodes_they_are_pinned_to():
    # 3 one-CPU workers on the one 2-CPU node with distpg_node_1: 6 CPUs in the cluster, but not there
    cfg = small_config("rollout.num_workers=3", "rollout.num_cpus_per_worker=1", "run.device=cpu",
                       "rollout.node_resource=distpg_node_1")
    with pytest.raises(ConfigError, match="3 actor.* pinned to node resource 'distpg_node_1'.* need 3 CPUs, but "
                                          "the nodes with it have 2; allowed: at most 2 rollout workers there at "
                                          "this size: .*a list of node resources"):
        plan_placement(cfg, cpus=6, gpus=0, nodes=NODES)
    # the learner pinned there too takes its share of the room
    with pytest.raises(ConfigError, match="allowed: at most 1 rollout worker there at this size beside the learner"):
        plan_placement(small_config("rollout.num_workers=2", "rollout.num_cpus_per_worker=1", "run.device=cpu",
                                    "rollout.node_resource=distpg_node_1", "learner.node_resource=distpg_node_1"),
                       cpus=6, gpus=0, nodes=NODES)


def test_an_actor_must_fit_on_one_node():
    with pytest.raises(ConfigError, match=r"learner.num_cpus=3: no single node has that many CPUs \(the largest "
                                          r"has 2\)"):
        plan_placement(small_config("learner.num_cpus=3", "run.device=cpu"), cpus=6, gpus=0, nodes=NODES)
    # workers too big for any node, and too many for the total: the node is what to fix (the total's "at most 1
    # worker at this size" would be refused in turn)
    with pytest.raises(ConfigError, match=r"rollout.num_cpus_per_worker=3: no single node has that many CPUs"):
        plan_placement(small_config("rollout.num_cpus_per_worker=3", "run.device=cpu"), cpus=6, gpus=0, nodes=NODES)


def test_strict_spread_needs_a_node_per_actor_where_it_fits():
    spread = ("ray.placement_strategy=STRICT_SPREAD", "rollout.num_cpus_per_worker=1", "run.device=cpu")
    plan_placement(small_config(*spread), cpus=6, gpus=0, nodes=NODES)  # learner + 2 workers on 3 nodes
    with pytest.raises(ConfigError, match=r"ray.placement_strategy=STRICT_SPREAD puts each of the learner and 3 "
                                          r"rollout worker actor\(s\) on a node of its own, but only 3 of them fit "
                                          r"on distinct nodes of the cluster's 3 alive node\(s\); allowed: "
                                          r"rollout.num_workers <= 2"):
        plan_placement(small_config(*spread, "rollout.num_workers=3"), 6, 0, NODES)
    # with worker 0 in the learner, 3 workers need 3 nodes
    plan_placement(small_config(*spread, "rollout.num_workers=3", "rollout.colocate=true"), 6, 0, NODES)
    # the matching, not first come first served: the learner (2 CPUs) fits anywhere, the worker pinned to
    # distpg_node_1 only there, and a greedy pass that gave node 1 to the learner would fail
    pinned = small_config(*spread, "rollout.num_workers=1", "learner.num_cpus=2", "rollout.node_resource=distpg_node_1")
    plan_placement(pinned, 6, 0, [NODES[1], NODES[0]])
    # two actors pinned to the one node with distpg_node_1 cannot be on distinct nodes (each fits alone)
    with pytest.raises(ConfigError, match=r"only 2 of them fit .* allowed: rollout.num_workers <= 1"):
        plan_placement(small_config(*spread, "rollout.node_resource=distpg_node_1"), 6, 0, NODES)
    # a local runtime is one node: more than one actor is refused before Ray starts
    with pytest.raises(ConfigError, match="STRICT_SPREAD .* only 1 of them fit .* allowed: a cluster with room"):
        plan_placement(small_config(*spread), 8, 0, nodes=[{"CPU": 8}])


def test_strict_spread_names_a_worker_count_that_fits():
    """Workers pinned round-robin: 4 bundles of 5 fit on distinct nodes, but the first 3 workers (a, b, a) do
    not, with one node holding a; the allowed count is the longest run of first workers that fits."""
    nodes = [{"CPU": 2}, {"CPU": 2, "a": 1}, {"CPU": 2, "b": 1}, {"CPU": 2, "b": 1}]
    spread = ("ray.placement_strategy=STRICT_SPREAD", "rollout.num_cpus_per_worker=1", "run.device=cpu",
              "rollout.node_resource=[a, b]")
    with pytest.raises(ConfigError, match=r"only 4 of them fit .* allowed: rollout.num_workers <= 2,"):
        plan_placement(small_config(*spread, "rollout.num_workers=4"), 8, 0, nodes)
    with pytest.raises(ConfigError, match=r"only 3 of them fit .* allowed: rollout.num_workers <= 2,"):
        plan_placement(small_config(*spread, "rollout.num_workers=3"), 8, 0, nodes)
    plan_placement(small_config(*spread, "rollout.num_workers=2"), 8, 0, nodes)


def test_strict_pack_needs_one_node_that_holds_every_actor():
    pack = ("ray.placement_strategy=STRICT_PACK", "run.device=cpu")
    plan_placement(small_config(*pack), cpus=6, gpus=0, nodes=NODES)  # 1 + 2 x 0.5 CPUs on a 2-CPU node
    with pytest.raises(ConfigError, match=r"ray.placement_strategy=STRICT_PACK puts the learner and 2 rollout "
                                          r"worker actor\(s\) on one node: they need 3 CPUs, and no node of the "
                                          r"cluster has that \(the largest has 2 CPUs\); allowed: fewer or smaller"):
        plan_placement(small_config(*pack, "rollout.num_cpus_per_worker=1"), 6, 0, NODES)
    # pinned to two different nodes: no one node has both resources
    with pytest.raises(ConfigError, match=r"STRICT_PACK .* need 2 CPUs and the node resource\(s\) distpg_node_0, "
                                          r"distpg_node_1, .*\(the largest has 2 CPUs; no node has all of "
                                          r"distpg_node_0, distpg_node_1\)"):
        plan_placement(small_config(*pack, "learner.node_resource=distpg_node_0",
                                    "rollout.node_resource=distpg_node_1"), 6, 0, NODES)
    # GPUs short while CPUs are not: the message says what the nodes have of both
    with pytest.raises(ConfigError, match=r"need 2 CPUs and 2 GPUs, and no node of the cluster has that \(the "
                                          r"largest has 2 CPUs; the most GPUs on one node: 1\)"):
        plan_placement(small_config(*pack, "run.device=cuda", "learner.num_gpus=1",
                                    "rollout.num_gpus_per_worker=0.5"), 6, 3, NODES)


def test_a_replacement_names_a_strict_placement_the_live_nodes_cannot_hold(ray_session):
    """After a node loss the totals can still suffice while STRICT_SPREAD lacks a node: the wait for a
    replacement says so (here the one local node, of which STRICT_SPREAD could use only one)."""
    from types import SimpleNamespace

    def shortage(*sets):
        cfg = small_config("run.device=cpu", *sets)
        return Trainer.room_shortage(SimpleNamespace(cfg=cfg, placement=plan_placement(cfg, 2, 0)))

    assert shortage() is None and shortage("ray.placement_strategy=STRICT_PACK") is None
    why = shortage("ray.placement_strategy=STRICT_SPREAD")
    assert why.startswith("no room for the replacement on the cluster's live nodes: ray.placement_strategy="
                          "STRICT_SPREAD puts each of the learner and 2 rollout worker actor(s) on a node of its own, "
                          "but only 1 of them fit"), why


def test_a_replacement_names_a_node_resource_that_only_the_lost_node_had(ray_session):
    """Workers (or the learner) pinned to a node resource whose node is lost: the CPUs of the live nodes can
    still suffice, but no live node has the resource, so the wait for a replacement says so (the local runtime
    here stands for the live nodes: it has no distpg_node_1)."""
    from types import SimpleNamespace

    def shortage(*sets):
        cfg = small_config("run.device=cpu", *sets)
        return Trainer.room_shortage(SimpleNamespace(cfg=cfg, placement=plan_placement(cfg, 6, 0, NODES)))

    assert shortage() is None
    why = shortage("rollout.node_resource=distpg_node_1")
    assert why and why.startswith("no room for the replacement on the cluster's live nodes: rollout.node_resource="
                                  "'distpg_node_1': no alive node of the cluster has this resource"), why
    assert "learner.node_resource='distpg_node_0': no alive node" in shortage("learner.node_resource=distpg_node_0")


@pytest.mark.ray
def test_a_placement_group_that_no_live_node_can_hold_is_named_while_the_run_waits(ray_session, tmp_path, capsys):
    """The fit is checked before the group is asked for; a node lost between the check and the placement (Ray
    declares it dead a while later) left the run waiting ray.timeout_s in silence, then saying 'the cluster had
    room when it was asked'. The wait now says what no live node has (here the local runtime lacks the node
    resource the plan, made against three nodes, pins the workers to)."""
    from distpg.orchestrator import TrainingError

    cfg = small_config("run.device=cpu", "rollout.node_resource=distpg_node_1", "ray.timeout_s=2")
    with pytest.raises(TrainingError, match=r"reserving the placement group did not finish within 2s .*; no room "
                       r"for the placement group on the cluster's live nodes: rollout.node_resource='distpg_node_1': "
                       r"no alive node"):
        Trainer(cfg, tmp_path, plan_placement(cfg, 6, 0, NODES))
    out = capsys.readouterr().out
    assert "distpg: no room for the placement group on the cluster's live nodes: rollout.node_resource=" in out, out
    assert "waiting up to ray.timeout_s=2s for a node to join" in out, out


def test_the_gpu_actors_must_fit_together_on_the_gpu_nodes_cpus():
    """A cluster whose one GPU node has 1 CPU: each GPU actor of the default config fits there alone, but the
    learner (1 CPU) and two workers (0.5 each) do not fit together, and Ray waited ray.timeout_s for the group
    (then 'the cluster had room when it was asked')."""
    nodes = [{"CPU": 2, "distpg_node_0": 1}, {"CPU": 2, "distpg_node_1": 1}, {"CPU": 1, "GPU": 1}]
    with pytest.raises(ConfigError, match=r"3 actor\(s\) use a GPU .* need 2 CPUs beside it, but the nodes with "
                                          r"GPUs have 1 CPUs; allowed: .*run.device=cpu"):
        plan_placement(small_config(), cpus=5, gpus=1, nodes=nodes)
    assert plan_placement(small_config("run.device=cpu"), cpus=5, gpus=1, nodes=nodes).use_gpu is False
    plan_placement(small_config("rollout.num_cpus_per_worker=0.25", "learner.num_cpus=0.5"), 5, 1, nodes)


def test_gpu_requests_whole_and_fractional_are_checked_per_node():
    two_gpu_nodes = [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    # fractional: learner 0.5 + 2 workers x 0.25 = 1 GPU; fits on either node
    p = plan_placement(small_config("learner.num_gpus=0.5"), cpus=8, gpus=2, nodes=two_gpu_nodes)
    assert p.use_gpu and p.learner["GPU"] == 0.5 and p.worker["GPU"] == 0.25
    # whole: 2 GPUs for the learner; the cluster has 2, but no node has 2
    with pytest.raises(ConfigError, match=r"learner.num_gpus=2: no single node has that many GPUs"):
        plan_placement(small_config("learner.num_gpus=2", "rollout.num_gpus_per_worker=0"), 8, 2, two_gpu_nodes)
    # workers pinned to a node resource whose nodes have no GPU
    with pytest.raises(ConfigError, match=r"rollout.num_gpus_per_worker=0.25: no single node with 'distpg_node_1' "):
        plan_placement(small_config("rollout.node_resource=distpg_node_1", "learner.num_gpus=0.5"), 6, 1, NODES)
    with pytest.raises(ConfigError, match="need 1.25 GPUs, but the Ray cluster has 1"):  # the total comes first
        plan_placement(small_config("rollout.num_workers=3"), cpus=6, gpus=1, nodes=NODES)


@pytest.mark.parametrize("override, message", [
    ("rollout.node_resource=[]", "name at least one resource"),
    ("rollout.node_resource=GPU", "built-in Ray resource"),
    ("rollout.node_resource=[distpg_node_1, 3]", "3 is not a resource name"),
    ("learner.node_resource=[a, b]", "expected str or null"),
    ("learner.num_gpus=1.5", "a fraction below 1 or a whole number"),
])
def test_node_resource_and_gpu_fields_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        small_config(override)


@pytest.mark.ray
def test_a_missing_node_resource_fails_before_any_actor_starts(ray_session, tmp_path):
    with pytest.raises(ConfigError, match="rollout.node_resource='distpg_node_7': no alive node"):
        train(small_config("rollout.node_resource=distpg_node_7"), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert ray_session.available_resources().get("CPU") == 2  # nothing was reserved


@pytest.mark.ray
def test_torch_threads_are_the_cpus_each_actor_was_given(ray_session, tmp_path):
    import torch  # noqa: F401  (imported in the actors)

    cfg = small_config("rollout.num_workers=1", "rollout.num_cpus_per_worker=1.5", "learner.num_cpus=0.5",
                       "run.device=cpu")
    trainer = Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))
    try:
        threads = lambda actor: ray_session.get(  # noqa: E731
            actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()), timeout=60)
        assert threads(trainer.workers[0]) == 2  # round(1.5)
        assert threads(trainer.learner) == 1  # a fraction of a CPU still gets one thread
    finally:
        trainer.close()


@contextmanager
def another_job_holding_a_cpu(ray_session):
    """An actor of another job holding one CPU of the tests' runtime while the block runs."""
    @ray_session.remote(num_cpus=1)
    class Other:
        def ready(self):
            return True

    other = Other.remote()
    try:
        ray_session.get(other.ready.remote(), timeout=60)
        yield
    finally:
        ray_session.kill(other)


@pytest.mark.ray
def test_a_busy_cluster_is_named_when_the_run_cannot_reserve_its_share(ray_session, tmp_path, capsys):
    """Another job holds a CPU of the two: the run says at once what it waits for, and the timeout names it."""
    from distpg.orchestrator import TrainingError

    with another_job_holding_a_cpu(ray_session):
        cfg = small_config("ray.timeout_s=2")
        with pytest.raises(TrainingError, match=r"reserving the placement group did not finish within 2s .*; the run "
                           r"reserves 2 CPUs and 1 of the cluster's 2 are free \(other jobs or actors hold the rest\)"):
            Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))
        assert "waiting up to ray.timeout_s=2s for room: the run reserves 2 CPUs and 1 of" in capsys.readouterr().out
    deadline = time.time() + 30  # the group it asked for is given up, not left to take the CPUs later
    while ray_session.available_resources().get("CPU") != 2 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    assert ray_session.available_resources().get("CPU") == 2



@pytest.mark.ray
def test_a_sigterm_while_the_run_waits_for_room_is_said_as_a_sigterm(ray_session, tmp_path):
    """SIGTERM (a scheduler's stop, `timeout`) inside a blocking Ray call, here the wait for the placement group
    on a busy cluster: Ray raises its own bare KeyboardInterrupt there, so the run ended as a Ctrl-C ('interrupted',
    exit 130) instead of 'stopped by SIGTERM' (143)."""
    import os
    import signal
    import threading

    with another_job_holding_a_cpu(ray_session):
        cfg = small_config("ray.timeout_s=60")
        timer = threading.Timer(3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt) as raised:
                train(cfg, tmp_path / "run")
        finally:
            timer.cancel()
        assert raised.value.args == ("SIGTERM",)
        assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_a_run_right_after_another_does_not_call_its_predecessors_share_busy(ray_session):
    """Ray reports the resources of a removed placement group as free a little late: a run started at once after
    another (as distpg scale and distpg bench do) said other jobs held them and that it was waiting for room."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from distpg.orchestrator import _busy_note

    @ray_session.remote
    class Actor:
        def ready(self):
            return True

    cfg = small_config("rollout.num_cpus_per_worker=0.5")  # 2 workers + the learner: both CPUs
    placement = plan_placement(cfg, cpus=2, gpus=0)
    bundles = placement.bundles(2)
    for _ in range(3):  # what Trainer.__init__ and Trainer.close do with the group and the actors
        pg = placement_group(bundles)
        actors = [Actor.options(num_cpus=b["CPU"], scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))
                  .remote() for i, b in enumerate(bundles)]
        ray_session.get([a.ready.remote() for a in actors], timeout=60)
        for a in actors:
            ray_session.kill(a)
        remove_placement_group(pg)
        assert _busy_note(placement, 2) is None
