"""An expert group on CUDA (run on a GPU machine: `pytest tests/gpu`): its slots' weights live on the
GPU, and its expert FFN there gives what the same group gives on the CPU."""

import pytest
import torch

from checkpoints import build_checkpoint
from moeray.actors.expert_group import ExpertGroup
from moeray.actors.placement import PlacementPlan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_group_on_cuda_computes_on_cuda_what_it_computes_on_the_cpu(tmp_path):
    folder = build_checkpoint(tmp_path, "mixtral_swa")  # 2 MoE layers, 6 experts
    plan = PlacementPlan.default(2, 6, 2, redundant_slots=1)
    on_gpu, on_cpu = ExpertGroup(folder, 1, plan, device="cuda"), ExpertGroup(folder, 1, plan)
    assert on_gpu.w13[0].device.type == "cuda"
    counts = [3, 0, 2, 4]
    rows = torch.randn(sum(counts), on_cpu.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        got = on_gpu.compute(layer, rows, counts)  # rows arrive on the host (a gloo world): moved in
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), on_cpu.compute(layer, rows, counts), rtol=1e-4, atol=1e-4)
