from __future__ import annotations

import pytest

from slurm.resources import RESOURCES, Resources, parse_time_min, resources_for


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("2:00:00", 120), ("1-12:00:00", 2160), ("0:30", 1), ("1-2", 1560), ("1-0:30", 1470), ("10:01", 11)],
)
def test_parse_time(text, minutes):
    assert parse_time_min(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "0"])
def test_parse_time_rejects(text):
    with pytest.raises(ValueError):
        parse_time_min(text)


def test_table_covers_every_preset_and_kind():
    for preset in ("tiny", "paper"):
        for kind in ("rl", "static"):
            assert resources_for(preset, kind) is RESOURCES[(preset, kind)]
    paper = resources_for("paper", "rl")
    assert paper.rollout_nodes > 0 and paper.servers_per_node * paper.server_tp <= paper.gpus_per_node
    assert resources_for("tiny", "rl").gpus_per_node == 0 and resources_for("tiny", "rl").tasks_per_node == 1


def test_validation_names_the_numbers():
    with pytest.raises(ValueError, match=r"3 servers x tp 4 need 12 GPUs per rollout node, but gpus_per_node is 8"):
        Resources(train_nodes=1, rollout_nodes=1, gpus_per_node=8, servers_per_node=3, server_tp=4)
    with pytest.raises(ValueError, match="train_nodes must be >= 1"):
        Resources(train_nodes=0)


def test_replace_ignores_none():
    r = Resources(train_nodes=2, gpus_per_node=8)
    assert r.replace(train_nodes=None, gpus_per_node=4) == Resources(train_nodes=2, gpus_per_node=4)
    assert r.nodes == 2 and r.tasks_per_node == 8
