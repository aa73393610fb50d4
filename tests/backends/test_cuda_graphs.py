"""CUDA-graph replay of a compiled model gives the same outputs as direct calls (GPU only)."""
import pytest
import torch

import lmforge


@pytest.mark.gpu
def test_cuda_graph_replay_matches_direct_calls():
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8)).cuda()
    x = torch.randn(4, 64, device="cuda")
    compiled = lmforge.compile(m, (x,), device="cuda")
    compiled(x)  # direct call first, as a user would
    graphed = lmforge.compile(m, (x,), device="cuda").use_cuda_graphs()
    for _ in range(3):
        x = torch.randn(4, 64, device="cuda")
        torch.testing.assert_close(graphed(x), compiled(x))
    assert graphed(torch.randn(2, 64, device="cuda")).shape == (2, 8), "a new shape captures a new graph"


def test_cuda_graphs_need_a_gpu_model():
    compiled = lmforge.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(lmforge.LmforgeError, match="CUDA device"):
        compiled.use_cuda_graphs()
