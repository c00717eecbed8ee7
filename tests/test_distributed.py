"""distributed.py's pure parts: the sharding choice, each rank's share of the work (no processes needed)."""
import pytest
import torch

from machinery import distributed
from machinery.distributed import Dist
from machinery.flags import UsageError
from machinery.memory_plan import LLAMA_2, Lengths, plan_memory
from model import LlamaConfig

SEVEN_B = LlamaConfig()  # Llama-2-7B's shape: 6.74e9 parameters


def test_base_bytes_counts_the_llama_2_7b_weights():
    assert distributed.base_bytes(SEVEN_B, torch.bfloat16) == 2 * 6_738_415_616


def test_auto_replicates_what_fits_and_shards_what_does_not(monkeypatch):
    assert distributed.choose_sharding("auto", SEVEN_B, torch.float32, Dist())[0] == "replicate"  # one process
    monkeypatch.setattr(distributed, "device_memory", lambda device: 80 * 2**30)  # an 80 GB GPU
    eight = Dist(rank=3, world=8)
    choice, why = distributed.choose_sharding("auto", SEVEN_B, torch.float32, eight)  # 25.1 GiB <= 40 GiB
    assert choice == "replicate" and "25.10 GiB <= 0.5 x 80.0 GiB" in why
    thirteen = LlamaConfig(hidden_size=5120, intermediate_size=13824, n_layers=40, n_heads=40, n_kv_heads=40)
    assert distributed.choose_sharding("auto", thirteen, torch.float32, eight)[0] == "shard"  # 48.5 GiB
    assert distributed.choose_sharding("auto", thirteen, torch.bfloat16, eight)[0] == "replicate"
    assert distributed.choose_sharding("replicate", thirteen, torch.float32, eight) == ("replicate",
                                                                                        "--sharding replicate")


def test_auto_with_a_training_plan_replicates_what_the_plan_fits(monkeypatch):
    """train.py passes its memory plan: auto replicates when a replicated step fits, not by FIT_FRACTION."""
    monkeypatch.setattr(distributed, "device_memory", lambda device: 1 / 0)  # the plan's memory is used instead
    eight = Dist(rank=3, world=8)

    def plan_for(shape, dtype):
        return lambda sharding: plan_memory(LlamaConfig(**LLAMA_2[shape]), lengths=Lengths(76, 35), batch=8,
                                            dtype=dtype, sharding=sharding, world=8, gpu_memory_gib=80)
    choice, why = distributed.choose_sharding("auto", SEVEN_B, torch.float32, eight, plan_for("7B", "float32"))
    assert choice == "replicate" and "29.3 GiB per process fits in 80.0 GiB" in why
    # 13B fp32: 48.5 GiB of weights is more than half of 80 GiB, yet the replicated step fits (53.3 GiB)
    assert distributed.choose_sharding("auto", SEVEN_B, torch.float32, eight, plan_for("13B", "float32"))[0] \
        == "replicate"
    choice, why = distributed.choose_sharding("auto", SEVEN_B, torch.float32, eight, plan_for("70B", "bfloat16"))
    assert choice == "shard" and "135.4 GiB per process does not fit in 80.0 GiB" in why
    assert distributed.choose_sharding("auto", SEVEN_B, torch.float32, Dist(), plan_for("70B", "float32")) == \
        ("replicate", "one process")  # sharding one GPU saves nothing; train.py's plan check refuses it
    assert distributed.pick_sharding("replicate", 8, None) == ("replicate", "--sharding replicate")


@pytest.mark.parametrize("requested, env, expected", [
    ("cpu", {}, "cpu"), ("cuda:1", {}, "cuda:1"),  # no torchrun: as asked
    ("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "2"}, "cuda:2"),  # one GPU per process
    ("cuda:1", {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "cuda:1"),  # one process: honoured, not cuda:0
    ("cpu", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu"),
])
def test_process_device_honours_the_flag(requested, env, expected):
    assert distributed.process_device(requested, env) == torch.device(expected)


def test_numbered_gpu_with_several_processes_is_refused():
    with pytest.raises(UsageError, match="--device cuda:1: under torchrun each process uses cuda:LOCAL_RANK"):
        distributed.process_device("cuda:1", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_shard_needs_torchrun():
    with pytest.raises(UsageError, match="--sharding shard needs torchrun"):
        distributed.choose_sharding("shard", SEVEN_B, torch.float32, Dist())


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (817, 8), (3, 4)])
def test_rank_slices_cover_every_item_once_in_order(n, world):
    slices = [distributed.rank_slice(n, Dist(rank=r, world=world)) for r in range(world)]
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    assert max(len(range(n)[s]) for s in slices) == -(-n // world)


def test_rank_share_gives_every_rank_the_same_number_of_micro_batches():
    batch = [7, 3, 9, 1, 4]
    shares = [distributed.rank_share(batch, Dist(rank=r, world=2), micro=2) for r in range(2)]
    assert shares[0] == [([7, 3], 1.0), ([9], 1.0)] and shares[1] == [([1, 4], 1.0), ([7], 0.0)]
