"""Per-client expert load, the concentration score, token buckets and client identity."""

import torch

from moeray.actors.client_load import ClientLoad, TokenBucket, concentration
from moeray.cluster.identity import client_identity


def test_pairs_are_attributed_to_the_token_owners():
    load = ClientLoad(num_layers=2, num_experts=4)
    load.set_owners(["a", "b", "a"], [2, 1, 1])  # tokens: a a b a
    load.add(0, torch.tensor([[0, 1], [0, 2], [3, 1], [0, 1]]))
    load.add(1, torch.tensor([[2, 3], [2, 3], [2, 3], [1, 0]]))
    load.end_step()
    load.add(0, torch.tensor([[0, 1]]))  # no owners set: ignored
    counts = load.counts()
    assert counts["a"].tolist() == [[3, 2, 1, 0], [1, 1, 2, 2]]
    assert counts["b"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 1]]


def test_a_replayed_step_is_counted_once():
    load = ClientLoad(num_layers=1, num_experts=3)
    for _attempt in range(2):  # the first attempt broke before end_step; the replay sets owners again
        load.set_owners(["a"], [2])
        load.add(0, torch.tensor([[0, 1], [2, 1]]))
    load.end_step()
    assert load.counts()["a"].tolist() == [[1, 2, 1]]


def test_the_least_recently_seen_client_is_evicted_when_full():
    load = ClientLoad(1, 2, capacity=2)
    for client in ("a", "b", "a", "c"):  # c evicts b (a was seen again)
        load.set_owners([client], [1])
        load.add(0, torch.tensor([[0]]))
        load.end_step()
    counts = load.counts()
    assert set(counts) == {"a", "c"} and counts["a"].tolist() == [[2, 0]] and counts["c"].tolist() == [[1, 0]]


def test_a_concentrated_client_scores_high_and_ordinary_ones_near_one():
    spread = torch.tensor([[25, 25, 25, 25, 25, 25, 25, 25]] * 2)  # [L=2, E=8]
    attacker = torch.tensor([[100, 100, 0, 0, 0, 0, 0, 0]] * 2)
    counts = {"ordinary-1": spread.clone(), "ordinary-2": spread.clone(), "attacker": attacker}
    scores = concentration(counts, top=2)
    assert scores["attacker"]["score"] == 4.0  # all of its pairs on 2 experts; the rest put 1/4 on their top 2
    assert scores["attacker"]["hot_experts"] == [[0, 1], [0, 1]] and scores["attacker"]["pairs"] == 200
    assert scores["ordinary-1"]["score"] < 1.0  # the attacker makes the rest *more* concentrated, not it
    alone = concentration({"only": torch.tensor([[10, 0, 0, 0]])}, top=1)
    assert alone["only"]["score"] == 4.0  # no one else: compared with an even spread


def test_token_bucket_refuses_past_the_rate_and_refills():
    bucket = TokenBucket(rate=10.0, burst=100.0)
    assert bucket.take("a", 80, now=0.0) is None
    assert bucket.take("a", 30, now=0.0) == 1.0  # 20 left, 10 short at 10/s
    assert bucket.take("b", 90, now=0.0) is None  # buckets are per client
    assert bucket.take("a", 30, now=1.0) is None


def test_client_identity_from_headers_or_metadata():
    assert client_identity({"X-Moeray-Client": "team-a"}) == "team-a"
    key = client_identity({"Authorization": "Bearer sk-secret"})
    assert key.startswith("key:") and "secret" not in key and len(key) == 16
    assert client_identity({"x-moeray-client": "x" * 100}) == "x" * 64
    assert client_identity({}) == "anonymous"
