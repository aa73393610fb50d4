"""Shared fixtures: the trained tiny task model (cached after its first training) and its captured decode step."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    from examples.llama_workload import DECODE_DYNAMIC, decode_inputs
    from examples.models.llama import LlamaDecodeStep
    from examples.models.tiny_task import load_or_train, make_problems
    from lmforge.ir.frontends.torch_export import capture

    model = load_or_train("tiny")
    prompts, _ = make_problems(2, seed=0)
    step = capture(LlamaDecodeStep(model), decode_inputs(model, prompts, 5), dynamic=DECODE_DYNAMIC)
    return model, step


@pytest.fixture(scope="session")
def task():
    from examples.models.tiny_task import make_problems

    return make_problems(24, seed=7)


@pytest.fixture(scope="session", autouse=True)
def addition_checker():
    from examples.test_time_scaling import register_task_functions

    register_task_functions()
    torch.manual_seed(0)
